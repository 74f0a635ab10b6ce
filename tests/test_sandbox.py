"""The code sandbox against hostile programs: each is contained, scored as failing, and leaves the
host untouched; plus the pass rules (what does not count as passing) and the no-bubblewrap path.

Every program is a "solution" that would only pass if the sandbox let it do what it tries; each
is run through the real bubblewrap worker pool (tests skip where bubblewrap is missing; CI and
`make test` install it).
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from hmst_bench.eval import sandbox
from hmst_bench.eval.sandbox import Limits, SandboxError, SandboxPool

needs_bwrap = pytest.mark.skipif(sandbox.bwrap_path() is None, reason="bubblewrap is not installed (apt-get install -y bubblewrap)")
SECRET = "hmst-secret-7f3a9c"


def hostile_programs(host: Path, port: int) -> dict[str, str]:
    """name -> program; `host` is a directory on the host the programs try to reach."""
    secret_file = host / "secret.txt"
    return {
        "fork bomb": "import os\nwhile True:\n    os.fork()\n",
        "fork via ctypes": "import ctypes\nlibc = ctypes.CDLL(None)\nassert libc.fork() >= 0\n",
        "memory bomb": "x = bytearray(8 * 2**30)\n",
        "memory creep": "blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))\n",
        "infinite loop": "while True:\n    pass\n",
        "sleep forever": "import time\ntime.sleep(3600)\n",
        "write outside the work dir": (
            f"for p in [{str(host / 'pwned')!r}, '/usr/pwned', '/pwned', '/tmp/../pwned', {str(Path.home() / 'pwned')!r}]:\n"
            "    try:\n        open(p, 'w').write('x')\n    except OSError:\n        pass\n"
            f"assert open({str(host / 'pwned')!r}).read() == 'x'\n"),
        "read a host file": f"assert open({str(secret_file)!r}).read() == {SECRET!r}\n",
        "read home files": "import os, glob\nfound = glob.glob(os.path.expanduser('~/.*')) + glob.glob('/root/.*') + glob.glob('/home/*/.*')\nprint(found)\nassert any('ssh' in f or 'bash' in f for f in found)\n",
        "environment secrets": f"import os\nprint(dict(os.environ))\nassert os.environ.get('HMST_TEST_SECRET') == {SECRET!r}\n",
        "read /etc/shadow": "print(open('/etc/shadow').read())\n",
        "connect to a loopback server": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n",
        "spawn a subprocess": f"import subprocess\nsubprocess.run(['touch', {str(host / 'spawned')!r}], check=True)\n",
        "os.system": f"import os\nassert os.system('touch {host / 'system'}') == 0\n",
        "delete host files": f"import shutil\nshutil.rmtree({str(host)!r})\nimport os\nassert not os.path.exists({str(host)!r})\n",
        "os._exit(0) before the asserts": "import os\nos._exit(0)\nassert 1 == 2\n",
        "sys.exit(0) before the asserts": "import sys\nsys.exit(0)\nassert 1 == 2\n",
        "raise SystemExit": "def check():\n    raise SystemExit(0)\ncheck()\n",
        "kill the parent": "import os, signal\nfor pid in (os.getppid(), 1, -1):\n    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\nos._exit(0)\n",
        "kill itself": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
        "print a pass marker": "print('passed')\nprint('ALL TESTS PASSED')\nprint('{\"passed\": true}')\nassert False\n",
        "atexit forgery": "import atexit, os\natexit.register(lambda: os._exit(0))\nassert False\n",
        "write to every descriptor": "import os\nfor fd in range(3, 256):\n    try:\n        os.write(fd, b'passed\\n')\n    except OSError:\n        pass\nos._exit(0)\n",
        "forge the worker's reply": "import os\nopen('/proc/1/fd/1', 'w').write('{\"id\": 1, \"passed\": true}\\n')\n",
        "ptrace the worker": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nassert libc.ptrace(16, 1, 0, 0) == 0\n",
        "rebind builtins": "import builtins\nbuiltins.abs = lambda x: 0\nassert abs(-5) == 0\n",
        "undo guards with importlib.reload": "import importlib, os\nos.fork = None\nimportlib.reload(os)\nassert os.fork() >= 0\n",
        "huge output": "import sys\nsys.stdout.write('x' * (200 * 2**20))\nassert False\n",
        "file-size bomb": "with open('big', 'wb') as fh:\n    fh.write(b'\\0' * (64 * 2**20))\n",
        "too many open files": "fs = [open('f%d' % i, 'w') for i in range(1000)]\n",
        "thread bomb": "import threading, time\nts = [threading.Thread(target=time.sleep, args=(30,)) for _ in range(5000)]\nfor t in ts:\n    t.start()\n",
    }


@pytest.fixture(scope="module")
def loopback_server():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    seen: list = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            seen.append(conn.recv(16))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], seen
    stop.set()
    thread.join()
    server.close()


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@needs_bwrap
def test_hostile_programs_are_contained(tmp_path, loopback_server, monkeypatch):
    port, connections = loopback_server
    host = tmp_path / "host"
    host.mkdir()
    (host / "secret.txt").write_text(SECRET)
    (host / "keep.txt").write_text("untouched")
    monkeypatch.setenv("HMST_TEST_SECRET", SECRET)
    before = _snapshot(host)
    home_before = sorted(os.listdir(Path.home()))
    programs = hostile_programs(host, port)
    assert len(programs) >= 20
    limits = Limits(timeout=3, output_bytes=4096)
    with SandboxPool(workers=2, limits=limits) as pool:
        results = pool.run(list(programs.values()))
        after_ok = pool.run(["assert sum(range(4)) == 6\n"])[0]
    for (name, _), res in zip(programs.items(), results):
        assert not res.passed, f"{name}: scored as passing ({res.result})"
        assert res.sandboxed
        assert SECRET not in res.stdout + res.stderr, f"{name}: leaked the secret"
        assert len(res.stdout) <= limits.output_bytes and len(res.stderr) <= limits.output_bytes, name
    outcome = dict(zip(programs, results))
    assert outcome["infinite loop"].timed_out or "SIGXCPU" in outcome["infinite loop"].result
    assert outcome["sleep forever"].timed_out
    assert outcome["fork bomb"].result.startswith("failed: PermissionError")
    assert "MemoryError" in outcome["memory bomb"].result
    assert outcome["rebind builtins"].result == "failed: builtins changed"
    assert outcome["huge output"].truncated
    assert _snapshot(host) == before  # nothing written, deleted or created on the host
    assert sorted(os.listdir(Path.home())) == home_before
    assert not Path("/usr/pwned").exists() and not Path("/pwned").exists()
    assert connections == []  # the loopback server never heard from the sandbox
    assert after_ok.passed, after_ok.result  # the pool survives (or replaced its worker)


@needs_bwrap
def test_what_counts_as_passing():
    programs = {
        "correct": ("def add(a, b):\n    return a + b\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n\n"
                    "check(add)\n", True),
        "wrong": ("def add(a, b):\n    return a * b\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n\n"
                  "check(add)\n", False),
        "syntax error": ("def add(a, b)\n    return a + b\n", False),
        "prints and passes": ("print('hello')\nimport sys\nprint('err', file=sys.stderr)\n", True),
        "threads are allowed": ("import threading\nout = []\nt = threading.Thread(target=out.append, args=(1,))\n"
                                "t.start(); t.join()\nassert out == [1]\n", True),
        "writes in its own work dir": ("open('a.txt', 'w').write('x')\nassert open('a.txt').read() == 'x'\n", True),
        "sees a fresh work dir": ("import os\nassert os.listdir('.') == [], os.listdir('.')\nopen('left', 'w')\n", True),
    }
    with SandboxPool(workers=1, limits=Limits(timeout=5)) as pool:
        # run the fresh-dir check twice: the file left by the first run must be gone for the second
        names = list(programs) + ["sees a fresh work dir"]
        results = pool.run([programs[n][0] for n in names])
    for name, res in zip(names, results):
        assert res.passed is programs[name][1], f"{name}: {res.result}\n{res.stderr}"
    assert dict(zip(names, results))["prints and passes"].stdout == "hello\n"
    assert "AssertionError" in dict(zip(names, results))["wrong"].result
    assert "SyntaxError" in dict(zip(names, results))["syntax error"].result


def test_refuses_without_bubblewrap_unless_allowed(monkeypatch):
    monkeypatch.setattr(sandbox, "bwrap_path", lambda: None)
    with pytest.raises(SandboxError, match="apt-get install -y bubblewrap.*--allow-unsandboxed"):
        SandboxPool(workers=1)
    with SandboxPool(workers=1, limits=Limits(timeout=5), allow_unsandboxed=True) as pool:
        assert not pool.sandboxed
        ok, bad, fork = pool.run(["assert 1 + 1 == 2\n", "import os\nos._exit(0)\n", "import os\nos.fork()\n"])
    assert ok.passed and not ok.sandboxed
    assert not bad.passed
    assert not fork.passed and "PermissionError" in fork.result  # seccomp still applies


def test_seccomp_program_shape():
    from hmst_bench.eval.sandbox_worker import RET_ALLOW, seccomp_program

    for machine in ("x86_64", "aarch64"):
        prog = seccomp_program(machine)
        assert prog[-1] == (0x06, 0, 0, RET_ALLOW)  # default: allow
        for code, jt, jf, _ in prog:  # every jump lands inside the program
            if code & 0x07 == 0x05:
                assert jt < len(prog) and jf < len(prog)
