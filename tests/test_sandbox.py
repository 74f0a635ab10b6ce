"""The code sandbox against hostile programs: each is contained, scored as failing, and leaves the
host, the judge and the next program untouched; plus the pass rules and the no-bubblewrap path.

Every program is a "solution" that would only pass if the sandbox let it do what it tries: either
its own asserts check that an escape worked (a plain string), or a trusted test judges it from a
separate process (a `Program`) and it tries to forge that verdict. Each runs through the real
bubblewrap worker pool (tests skip where bubblewrap is missing; CI and `make test` install it).
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hmst_bench.eval import sandbox
from hmst_bench.eval.sandbox import Limits, Program, SandboxError, SandboxPool

needs_bwrap = pytest.mark.skipif(sandbox.bwrap_path() is None, reason="bubblewrap is not installed (apt-get install -y bubblewrap)")
SECRET = "hmst-secret-7f3a9c"
SYSCTL = Path("/proc/sys/kernel/printk_ratelimit_burst")
KEYCTL = {"x86_64": (248, 250), "aarch64": (217, 219)}.get(platform.machine(), (248, 250))  # add_key, keyctl


def hostile_programs(host: Path, port: int) -> dict[str, str]:
    """name -> self-checking program; `host` is a directory on the host the programs try to reach."""
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
        "exec another program": "import os\nos.execv('/bin/sh', ['sh', '-c', 'exit 0'])\n",
        "delete host files": f"import shutil\nshutil.rmtree({str(host)!r})\nimport os\nassert not os.path.exists({str(host)!r})\n",
        "os._exit(0) before the asserts": "import os\nos._exit(0)\nassert 1 == 2\n",
        "sys.exit(0) before the asserts": "import sys\nsys.exit(0)\nassert 1 == 2\n",
        "raise SystemExit": "def check():\n    raise SystemExit(0)\ncheck()\n",
        "kill itself": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\nassert False\n",
        "print a pass marker": "print('passed')\nprint('ALL TESTS PASSED')\nprint('{\"passed\": true}')\nassert False\n",
        "atexit forgery": "import atexit, os\natexit.register(lambda: os._exit(0))\nassert False\n",
        "write to every descriptor": "import os\nfor fd in range(3, 256):\n    try:\n        os.write(fd, b'passed\\n')\n    except OSError:\n        pass\nos._exit(0)\n",
        "forge the worker's reply": "import os\nopen('/proc/1/fd/1', 'w').write('{\"id\": 1, \"passed\": true}\\n')\nassert False\n",
        "undo guards with importlib.reload": "import importlib, os\nos.fork = None\nimportlib.reload(os)\nassert os.fork() >= 0\n",
        "huge output": "import sys\nsys.stdout.write('x' * (200 * 2**20))\nassert False\n",
        "file-size bomb": "with open('big', 'wb') as fh:\n    fh.write(b'\\0' * (64 * 2**20))\n",
        "too many open files": "fs = [open('f%d' % i, 'w') for i in range(1000)]\n",
        "thread bomb": "import threading, time\nts = [threading.Thread(target=time.sleep, args=(30,)) for _ in range(5000)]\nfor t in ts:\n    t.start()\n",
        # the kernel: host sysctls, the host's keyrings, namespaces and mounts
        "write host sysctls": (
            "ok = []\nfor path, text in (('/proc/sys/kernel/printk_ratelimit_burst', '11'), ('/proc/sys/kernel/core_pattern', '|/tmp/x')):\n"
            "    try:\n        open(path, 'w').write(text)\n        ok.append(path)\n    except OSError:\n        pass\nassert ok\n"),
        "read the host's keyrings": (
            f"import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nfound = []\n"
            f"for ring in (-3, -4, -5):\n    key = libc.syscall({KEYCTL[1]}, 10, ring, b'user', b'hmst-test-key', 0)\n"
            f"    buf = ctypes.create_string_buffer(256)\n    if key > 0 and libc.syscall({KEYCTL[1]}, 11, key, buf, 256) > 0:\n"
            f"        found.append(buf.value)\nassert {SECRET.encode()!r} in found\n"),
        "a user namespace of its own": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nassert libc.unshare(0x10000000) == 0\n",
        "mount a tmpfs": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nassert libc.mount(b'x', b'/tmp', b'tmpfs', 0, None) == 0\n",
        "capabilities or root": ("import os\nst = open('/proc/self/status').read()\n"
                                 "assert os.getuid() == 0 or st.split('CapEff:')[1].split()[0] != '0000000000000000'\n"),
        "see other processes": "import os\npids = [p for p in os.listdir('/proc') if p.isdigit()]\nassert len(pids) > 1, pids\n",
    }


HUMANEVAL_CHECK = "def check(candidate):\n    assert candidate(2) == 5\n\ncheck(f)\n"


def forgeries() -> dict[str, Program]:
    """name -> a wrong program (f(2) is never 5) that tries to make its judge say it passed."""
    wrong = "def f(x=2):\n    return 1\n"
    return {
        "an object equal to everything": Program(
            "class A:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
            "def f(x=2):\n    return A()\n", HUMANEVAL_CHECK, rebind=("f",)),
        "an int subclass equal to everything": Program(
            "class I(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
            "def f(x=2):\n    return I(1)\n", HUMANEVAL_CHECK, rebind=("f",)),
        "a list subclass equal to everything": Program(
            "class L(list):\n    def __eq__(self, other):\n        return True\n"
            "def f(x=2):\n    return L([1])\n", "assert f(2) == [5]\n"),
        "sys.settrace replaces check": Program(
            wrong + "import sys, threading\ndef tracer(frame, event, arg):\n"
            "    if frame.f_code.co_name == 'check':\n        frame.f_globals['check'] = lambda c: None\n"
            "    return tracer\nsys.settrace(tracer)\nthreading.settrace(tracer)\n", HUMANEVAL_CHECK, rebind=("f",)),
        "rebind a builtin, restore it in a profile hook": Program(
            "import builtins, sys\nreal = builtins.abs\nbuiltins.abs = lambda x: 0\n"
            "def prof(frame, event, arg):\n    if event == 'return' and frame.f_code.co_name == 'check':\n"
            "        builtins.abs = real\nsys.setprofile(prof)\ndef f(x=2):\n    return 3\n",
            "def check(candidate):\n    assert abs(candidate(2) - 5) < 1e-9\n\ncheck(f)\n", rebind=("f",)),
        "shadow a builtin the test uses": Program(
            "def abs(x):\n    return 0\ndef f(x=2):\n    return 3\n",
            "def check(candidate):\n    assert abs(candidate(2) - 5) < 1e-9\n\ncheck(f)\n", rebind=("f",)),
        "a fake math module": Program(
            "class math:\n    @staticmethod\n    def isclose(a, b, **kw):\n        return True\ndef f(x=2):\n    return 3\n",
            "assert math.isclose(f(2), 5)\n"),
        "read the pass token from the frames": Program(
            wrong + "import sys, os\nfound, frame = [], sys._getframe(0)\nwhile frame is not None:\n"
            "    found += [v for v in frame.f_locals.values() if isinstance(v, (str, bytes))]\n    frame = frame.f_back\n"
            "for fd in range(3, 64):\n    for v in found:\n        try:\n"
            "            os.write(fd, v if isinstance(v, bytes) else v.encode())\n        except OSError:\n            pass\n",
            HUMANEVAL_CHECK, rebind=("f",)),
        "a thread reading sys._current_frames()": Program(
            "import sys, os, threading, time\nfound = []\ndef spy():\n    for _ in range(200):\n"
            "        for frame in sys._current_frames().values():\n            while frame is not None:\n"
            "                found.extend(repr(v) for v in frame.f_locals.values())\n                frame = frame.f_back\n"
            "        time.sleep(0.001)\nthreading.Thread(target=spy, daemon=True).start()\n"
            "def f(x=2):\n    time.sleep(0.05)\n    return next((v for v in found if 'assert' in v), 1)\n",
            HUMANEVAL_CHECK, rebind=("f",)),
        "read the test through /proc": Program(
            "import os\ndef f(x=2):\n    text = []\n    for pid in os.listdir('/proc'):\n"
            "        for name in ('cmdline', 'environ', 'mem'):\n            try:\n"
            "                text.append(open(f'/proc/{pid}/{name}', 'rb').read(1 << 20).decode('latin-1'))\n"
            "            except OSError:\n                pass\n    return 5 if any('hmst-marker' in t for t in text) else 1\n",
            "# hmst-marker\n" + HUMANEVAL_CHECK, rebind=("f",)),
        "kill or stop the judge": Program(
            wrong + "import os, signal\nfor pid in [-1] + list(range(2, 4096)):\n"
            "    for sig in (signal.SIGSTOP, signal.SIGKILL):\n        try:\n            os.kill(pid, sig)\n"
            "        except OSError:\n            pass\n", HUMANEVAL_CHECK, rebind=("f",)),
        "ptrace the judge": Program(
            "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "attached = [pid for pid in range(1, 64) if libc.ptrace(16, pid, 0, 0) == 0]\n"
            "def f(x=2):\n    return 5 if attached else 1\n", HUMANEVAL_CHECK, rebind=("f",)),
        "garbage on the judge's socket": Program(
            wrong + "import os\nfor fd in range(3, 64):\n    try:\n"
            "        os.write(fd, b'\\x00\\x00\\x00\\x0d[\"ok\", 5]   ' * 4)\n    except OSError:\n        pass\n",
            HUMANEVAL_CHECK, rebind=("f",)),
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


def _host_key(secret: str):
    """Add a key holding `secret` to this (host, root) process's session keyring; its id or None."""
    libc = ctypes.CDLL(None, use_errno=True)
    key = libc.syscall(KEYCTL[0], b"user", b"hmst-test-key", secret.encode(), len(secret), -3)
    return key if key > 0 else None


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
    sysctl_before = SYSCTL.read_text() if SYSCTL.exists() else None
    key = _host_key(SECRET)  # None where the host itself may not use keyrings
    programs = {**hostile_programs(host, port), **forgeries()}
    assert len(programs) >= 45
    limits = Limits(timeout=3, output_bytes=4096)
    try:
        with SandboxPool(workers=2, limits=limits) as pool:
            results = pool.run(list(programs.values()))
            after_ok = pool.run(["assert sum(range(4)) == 6\n"] * 2)
    finally:
        if key is not None:
            ctypes.CDLL(None).syscall(KEYCTL[1], 3, key)  # KEYCTL_REVOKE
    for (name, _), res in zip(programs.items(), results):
        assert not res.passed, f"{name}: scored as passing ({res.result})"
        assert res.sandboxed
        assert SECRET not in res.stdout + res.stderr + res.result, f"{name}: leaked the secret"
        assert len(res.stdout) <= limits.output_bytes and len(res.stderr) <= limits.output_bytes, name
    outcome = dict(zip(programs, results))
    assert outcome["infinite loop"].timed_out or "SIGXCPU" in outcome["infinite loop"].result
    assert outcome["sleep forever"].timed_out
    assert outcome["fork bomb"].result.startswith("failed: PermissionError")
    assert outcome["exec another program"].result.startswith("failed: PermissionError")
    assert "MemoryError" in outcome["memory bomb"].result
    assert outcome["huge output"].truncated
    # the forgeries are judged and found wrong: the judge survived each and ran the real test
    for name in forgeries():  # (those writing on every descriptor break the protocol instead)
        expected = ("failed: AssertionError", "failed: CandidateError") if "frames" in name or "socket" in name \
            else ("failed: AssertionError",)
        assert outcome[name].result.startswith(expected), f"{name}: {outcome[name].result}"
    assert _snapshot(host) == before  # nothing written, deleted or created on the host
    assert sorted(os.listdir(Path.home())) == home_before
    assert not Path("/usr/pwned").exists() and not Path("/pwned").exists()
    assert connections == []  # the loopback server never heard from the sandbox
    assert (SYSCTL.read_text() if SYSCTL.exists() else None) == sysctl_before
    assert all(r.passed for r in after_ok), after_ok  # the pool survives (or replaced its worker)


# Programs that try to break the programs after them in the same worker; each is followed by
# FOLLOWER, which passes only with a fresh, empty, writable /tmp and /dev/shm and intact limits.
SABOTEURS = {
    "replace /tmp/job and /tmp with dangling symlinks": (
        "import os, shutil\nfor p in ('/tmp/job', '/tmp/job/work', '/tmp/x'):\n"
        "    shutil.rmtree(p, ignore_errors=True)\n    try:\n        os.symlink('/nonexistent', p)\n"
        "    except OSError:\n        pass\nos.chdir('/')\nshutil.rmtree('/tmp', ignore_errors=True)\nassert False\n"),
    "fill /tmp": ("i = 0\ntry:\n    while True:\n        with open(f'/tmp/fill{i}', 'wb') as fh:\n"
                  "            fh.write(b'0' * (8 << 20))\n        i += 1\nexcept OSError:\n    pass\nassert False\n"),
    "leave files for the next program": (
        "open('/tmp/leftover', 'w').write('x')\nopen('/dev/shm/leftover', 'w').write('x')\nassert False\n"),
    "take 320 MiB of /dev/shm": ("with open('/dev/shm/big', 'wb') as fh:\n    for _ in range(40):\n"
                                 "        fh.write(b'0' * (8 << 20))\n"),
    "prlimit the worker": (
        "import os, resource\nhit = []\nfor pid in [os.getppid()] + list(range(1, 4096)):\n"
        "    if pid in (0, os.getpid()):\n        continue\n    try:\n"
        "        resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, 0))\n        hit.append(pid)\n"
        "    except (OSError, ValueError):\n        pass\nassert hit\n"),
    "raise the worker's oom_score_adj": (
        "import os\nhit = []\nfor pid in os.listdir('/proc'):\n    try:\n"
        "        open(f'/proc/{pid}/oom_score_adj', 'w').write('1000')\n        hit.append(pid)\n"
        "    except OSError:\n        pass\nassert hit\n"),
    "System V shared memory left behind": (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nshm = libc.shmget(0x484d53, 8 << 20, 0o1666)\n"
        "assert shm < 0\n"),
}
FOLLOWER = Program(
    "import os, ctypes\ndef state():\n    with open('x', 'wb') as fh:\n        fh.write(b'0' * (4 << 20))\n"
    "    with open('/dev/shm/y', 'wb') as fh:\n        fh.write(b'0' * (4 << 20))\n"
    "    shm = ctypes.CDLL(None).shmget(0x484d53, 0, 0)\n"
    "    return os.getcwd(), sorted(os.listdir('/tmp')), sorted(os.listdir('/dev/shm')), shm\n",
    "assert state() == ('/tmp', ['x'], ['y'], -1)\n")


@needs_bwrap
def test_no_program_affects_the_next():
    jobs = [job for saboteur in SABOTEURS.values() for job in (saboteur, FOLLOWER)]
    with SandboxPool(workers=1, limits=Limits(timeout=5)) as pool:
        results = pool.run([FOLLOWER] + jobs)
    assert results[0].passed, results[0].result
    for name, sabotage, follower in zip(SABOTEURS, results[1::2], results[2::2]):
        assert not sabotage.passed, f"{name}: scored as passing ({sabotage.result})"
        assert follower.passed, f"after {name}: {follower.result}\n{follower.stderr}"


def _descendants(root: int) -> dict[int, int]:
    """pid -> real host uid of every process below `root`, read from the host's /proc."""
    parents, uids = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            parents[int(entry.name)] = int(fields["PPid"])
            uids[int(entry.name)] = int(fields["Uid"].split()[0])
    found, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in found:
                found[child] = uids[child]
                frontier.append(child)
    return found


@needs_bwrap
def test_workers_judges_and_programs_run_on_unprivileged_host_uids():
    sleeper = Program("import time\ntime.sleep(2)\ndef f():\n    return 1\n", "assert f() == 1\n")
    with SandboxPool(workers=1, limits=Limits(timeout=10)) as pool:
        box: list = []
        thread = threading.Thread(target=lambda: box.extend(pool.run([sleeper])))
        thread.start()
        time.sleep(1.0)
        worker = pool._workers[0].proc
        assert worker is not None
        seen = _descendants(worker.pid)
        thread.join()
    assert box and box[0].passed, box
    assert len(seen) >= 4, seen  # bwrap's monitor, the worker, its zygote, the judge, the candidate
    assert 0 not in seen.values(), seen  # nothing in the sandbox is root on the host
    if os.geteuid() == 0:
        base = sandbox.uid_base(0)
        # the worker (and bwrap), the judge and the program on three different unprivileged uids
        assert set(seen.values()) == {base, base + 1, base + 2}, seen


@needs_bwrap
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not Path("/usr/bin/python3").exists(),
                    reason="needs root (to become another user), setpriv and a system /usr/bin/python3")
def test_an_unprivileged_caller_gets_the_same_confinement():
    """hmst-bench run by an ordinary user: bubblewrap maps only that uid, yet the program still has
    its own PID namespace, no capabilities, and cannot forge its verdict."""
    source = Path(sandbox.__file__)
    if any(not os.access(p, os.R_OK | os.X_OK) or not (p.stat().st_mode & 0o005) for p in list(source.parents)[:-1]):
        pytest.skip(f"{source.parent} is not readable by other users here")
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(prefix="hmst-unprivileged-"))  # pytest's tmp is root's alone
    script = tmp_path / "run.py"
    script.write_text(
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('sb', {str(source)!r})\n"
        "sb = importlib.util.module_from_spec(spec); sys.modules['sb'] = sb; spec.loader.exec_module(sb)\n"
        "jobs = [sb.Program('import os\\ndef f():\\n    st = open(\"/proc/self/status\").read()\\n'\n"
        "                   '    return os.getpid(), st.split(\"CapEff:\")[1].split()[0]\\n',\n"
        "                   'assert f() == (1, \"0000000000000000\")\\n'),\n"
        "        sb.Program('class A:\\n    def __eq__(s, o): return True\\ndef f(): return A()\\n', 'assert f() == 5\\n'),\n"
        "        'import os\\nos.fork()\\n']\n"
        "with sb.SandboxPool(workers=1, limits=sb.Limits(timeout=5)) as pool:\n"
        "    print(json.dumps([[r.passed, r.result] for r in pool.run(jobs)]))\n")
    script.chmod(0o644)
    tmp_path.chmod(0o755)
    for parent in tmp_path.parents:
        if not parent.stat().st_mode & 0o001:
            pytest.skip(f"{parent} is not searchable by other users here")
    try:
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
                               str(script)], capture_output=True, text=True, timeout=60, cwd="/")
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr
    import json

    own, forged, fork = json.loads(proc.stdout)
    assert own == [True, "passed"], own  # PID 1 of its own namespace, no capabilities
    assert forged[0] is False and forged[1].startswith("failed: AssertionError"), forged
    assert fork[0] is False and "PermissionError" in fork[1], fork


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
        "judged: correct": (Program("def add(a, b):\n    return a + b\n", "assert add(2, 3) == 5\n"), True),
        "judged: wrong": (Program("def add(a, b):\n    return a * b\n", "assert add(2, 3) == 5\n"), False),
        "judged: raises": (Program("def add(a, b):\n    raise ValueError('no')\n", "assert add(2, 3) == 5\n"), False),
        "judged: the test expects the exception": (Program(
            "def add(a, b):\n    raise ValueError('no')\n",
            "try:\n    add(2, 3)\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError\n"), True),
        "judged: a missing entry point": (Program("def other():\n    pass\n", "check(add)\n", rebind=("add",)), False),
        "judged: objects stay in the program": (Program(
            "class Node:\n    def __init__(self, v):\n        self.v, self.next = v, None\n"
            "def total(n):\n    return 0 if n is None else n.v + total(n.next)\n",
            "a = Node(1)\na.next = Node(2)\nassert total(a) == 3 and a.next.v == 2 and a != Node(1)\n"), True),
        "judged: plain values keep their types": (Program(
            "def f():\n    return [1, (2.5, 'x'), {3: b'y'}, {4}, frozenset([5]), None, True, 1+2j, float('inf')]\n",
            "assert f() == [1, (2.5, 'x'), {3: b'y'}, {4}, frozenset([5]), None, True, 1+2j, float('inf')]\n"
            "assert type(f()[1]) is tuple and type(f()[6]) is bool\n"), True),
        "judged: iterate a returned generator": (Program(
            "def f(n):\n    return (i * i for i in range(n))\n", "assert f(3) != [0, 1, 4]\nassert list(f(3)) == [0, 1, 4]\n"), True),
    }
    with SandboxPool(workers=1, limits=Limits(timeout=5)) as pool:
        # run the fresh-dir check twice: the file left by the first run must be gone for the second
        names = list(programs) + ["sees a fresh work dir"]
        results = pool.run([programs[n][0] for n in names])
    for name, res in zip(names, results):
        assert res.passed is programs[name][1], f"{name}: {res.result}\n{res.stderr}"
    assert dict(zip(names, results))["prints and passes"].stdout == "hello\n"
    outcome = dict(zip(names, results))
    assert "AssertionError" in outcome["wrong"].result
    assert "SyntaxError" in outcome["syntax error"].result
    assert outcome["judged: raises"].result == "failed: ValueError: no"
    assert outcome["judged: a missing entry point"].result == "failed: NameError: the program does not define add"


@needs_bwrap
def test_a_sandbox_that_cannot_confine_stops_instead_of_failing_every_program():
    # a tmpfs of -1 bytes cannot be mounted: that is the sandbox's fault, and must not read as a
    # program failing (a pass@k of 0 that means nothing)
    with pytest.raises(SandboxError, match="could not confine the program.*user namespaces"):
        with SandboxPool(workers=1, limits=Limits(timeout=5, tmp_bytes=-1)) as pool:
            pool.run(["assert True\n"])


def test_refuses_without_bubblewrap_unless_allowed(monkeypatch):
    monkeypatch.setattr(sandbox, "bwrap_path", lambda: None)
    with pytest.raises(SandboxError, match="apt-get install -y bubblewrap.*--allow-unsandboxed"):
        SandboxPool(workers=1)
    with SandboxPool(workers=1, limits=Limits(timeout=5), allow_unsandboxed=True) as pool:
        assert not pool.sandboxed
        ok, bad, fork, forged = pool.run(["assert 1 + 1 == 2\n", "import os\nos._exit(0)\n", "import os\nos.fork()\n",
                                          forgeries()["an object equal to everything"]])
    assert ok.passed and not ok.sandboxed
    assert not bad.passed
    assert forged.result.startswith("failed: AssertionError")  # the judge is a separate process here too
    assert not fork.passed and "PermissionError" in fork.result  # seccomp still applies


def test_seccomp_program_shape():
    from hmst_bench.eval.sandbox_worker import RET_ALLOW, seccomp_program

    for machine in ("x86_64", "aarch64"):
        prog = seccomp_program(machine)
        assert prog[-1] == (0x06, 0, 0, RET_ALLOW)  # default: allow
        for code, jt, jf, _ in prog:  # every jump lands inside the program
            if code & 0x07 == 0x05:
                assert jt < len(prog) and jf < len(prog)
