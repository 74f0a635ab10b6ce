"""Run untrusted (model-written) Python programs in a bubblewrap sandbox, fast, with verdicts the
program cannot forge.

`SandboxPool(workers=N).run(jobs)` returns one `Result` per job. A job is a `Program`: the
untrusted `candidate` code plus the trusted test (`setup`, `test`, the names to `rebind` to the
program's own). The test runs in a separate judge process that reaches the program only through a
socket carrying plain values (`sandbox_judge.py`); a plain string is a self-checking program whose
own asserts decide, which suits containment tests but is only as honest as the program.

Each worker is one long-lived `bwrap` process (`sandbox_worker.py` says what happens inside):
- new user, network, PID, IPC, UTS and cgroup namespaces; when the caller is root, the user
  namespace maps onto unused host uids (`uid_base`), so nothing inside is root on the host, and the
  judge and the candidate get uids of their own, different from the worker's;
- a read-only file system holding only what the interpreter needs (/usr, /bin, /lib*, the Python
  installation) and the two sandbox files -- no /home, /root, /etc, project or data folders --
  plus a minimal /dev and /proc;
- a clean environment, `--die-with-parent`, `--new-session`; per job a fresh candidate with its own
  PID, mount and IPC namespaces, a private bounded /tmp and /dev/shm, rlimits, a seccomp filter, and
  a wall-clock timeout.

Without bubblewrap, execution is refused (`SandboxError`) unless `allow_unsandboxed=True`: then
the same worker runs directly (rlimits, seccomp and the separate judge still apply; namespaces and
the file-system view do not) and every result says `sandboxed: False`.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import select
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

HERE = Path(__file__).parent
WORKER_SOURCE = HERE / "sandbox_worker.py"
JUDGE_SOURCE = HERE / "sandbox_judge.py"
INSIDE = "/sandbox"  # where the two files appear inside the sandbox (read-only)
INSTALL_HINT = "install bubblewrap (Debian/Ubuntu: apt-get install -y bubblewrap) or pass --allow-unsandboxed"
WORKER_CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_SYS_ADMIN", "CAP_KILL")  # in the worker's own user namespace only


class SandboxError(RuntimeError):
    """The sandbox cannot run; the message is one line naming the fix."""


@dataclass(frozen=True)
class Program:
    """One job: untrusted `candidate` code, judged by trusted code in another process.

    The judge binds the candidate's top-level names as remote proxies, runs `setup`, rebinds each
    name in `rebind` to the candidate's (HumanEval's entry point after its prompt), then runs
    `test`. The job passes when `test` finishes without an exception."""

    candidate: str
    test: str = ""
    setup: str = ""
    rebind: tuple[str, ...] = ()


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0               # wall-clock seconds per program
    memory_bytes: int = 1 << 30         # RLIMIT_AS
    cpu_seconds: Optional[int] = None   # RLIMIT_CPU; default: the timeout rounded up
    processes: int = 16                 # RLIMIT_NPROC of the program's own uid: bounds its threads
                                        # (seccomp refuses new processes anyway)
    file_bytes: int = 16 << 20          # RLIMIT_FSIZE
    open_files: int = 64                # RLIMIT_NOFILE
    output_bytes: int = 16 << 10        # captured stdout and stderr, each
    tmp_bytes: int = 64 << 20           # each program's private /tmp (a fresh tmpfs)
    shm_bytes: int = 16 << 20           # each program's private /dev/shm (a fresh tmpfs)

    def worker(self) -> dict:
        cpu = self.cpu_seconds if self.cpu_seconds is not None else int(-(-self.timeout // 1))
        return {"memory_bytes": self.memory_bytes, "cpu_seconds": max(cpu, 1), "processes": self.processes,
                "file_bytes": self.file_bytes, "open_files": self.open_files, "output_bytes": self.output_bytes,
                "tmp_bytes": self.tmp_bytes, "shm_bytes": self.shm_bytes}


@dataclass
class Result:
    passed: bool
    result: str                 # "passed", "timed out", "failed: <the test's error>", ...
    sandboxed: bool
    exit_code: Optional[int] = None
    timed_out: bool = False
    seconds: float = 0.0
    stdout: str = ""
    stderr: str = ""
    truncated: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def bwrap_path() -> Optional[str]:
    return shutil.which("bwrap")


def _interpreter() -> tuple[str, list[str]]:
    """The base interpreter (not a venv wrapper) and the prefixes it needs mounted."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    prefixes = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}
    return exe, sorted(prefixes)


def uid_base(index: int) -> int:
    """Host uids base..base+2 for worker `index` of this process: far above any real account's,
    distinct per worker and (almost surely) per concurrent hmst-bench process."""
    return 1_500_000_000 + (os.getpid() % 100_000) * 64 + (index % 16) * 4


def bwrap_command(limits: Limits, index: int = 0) -> list[str]:
    exe, prefixes = _interpreter()
    root = os.geteuid() == 0
    cmd = [bwrap_path() or "bwrap", "--die-with-parent", "--new-session", "--as-pid-1",
           "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
           "--cap-drop", "ALL", *[arg for cap in WORKER_CAPS for arg in ("--cap-add", cap)], "--clearenv",
           "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8", "--setenv", "HOME", "/tmp"]
    if not root:  # bubblewrap maps the caller's uid to 0 of a new user namespace
        cmd += ["--unshare-user", "--uid", "0", "--gid", "0"]
    mounted = ["/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
            mounted.append(top)
    cmd += ["--ro-bind", "/usr", "/usr"]
    made: set[str] = set()

    def parents(path: str) -> list[str]:  # searchable by everyone inside (bwrap copies a 0700 /root)
        out = []
        for parent in reversed(Path(path).parents[:-1]):
            if str(parent) not in made:
                made.add(str(parent))
                out += ["--perms", "0755", "--dir", str(parent)]
        return out

    for prefix in prefixes:
        if not any(prefix == m or prefix.startswith(m + "/") for m in mounted):
            cmd += parents(prefix) + ["--ro-bind", prefix, prefix]
            mounted.append(prefix)
    for source in (WORKER_SOURCE, JUDGE_SOURCE):
        cmd += parents(f"{INSIDE}/{source.name}") + ["--ro-bind", str(source), f"{INSIDE}/{source.name}"]
    cmd += ["--dev", "/dev", "--proc", "/proc", "--dir", "/tmp", "--chdir", "/",
            "--", exe, "-I", "-S", f"{INSIDE}/{WORKER_SOURCE.name}", "serve", "confined",
            "ids" if root else "noids", "/tmp"]
    if root:  # enter a user namespace mapped onto unprivileged host uids first (sandbox_worker.launch)
        cmd = [exe, "-I", "-S", str(WORKER_SOURCE), "launch", str(uid_base(index))] + cmd
    return cmd


def direct_command(root: str) -> list[str]:
    exe, _ = _interpreter()
    return [exe, "-I", "-S", str(WORKER_SOURCE), "serve", "direct", "noids", root]


class _Worker:
    """One worker process and its pipes; restarted when a program kills or wedges it."""

    def __init__(self, limits: Limits, sandboxed: bool, index: int = 0):
        self.limits, self.sandboxed, self.index = limits, sandboxed, index
        self.proc: Optional[subprocess.Popen] = None
        self.tmp: Optional[str] = None
        self._pending = b""  # bytes read from the worker past the last full line

    def start(self) -> None:
        if self.sandboxed:
            cmd = bwrap_command(self.limits, self.index)
        else:
            import tempfile

            self.tmp = tempfile.mkdtemp(prefix="hmst-bench-unsandboxed-")
            cmd = direct_command(self.tmp)
        env = {} if self.sandboxed else {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": self.tmp or "/tmp"}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, cwd=self.tmp or "/", start_new_session=True)
        self._pending = b""
        if (self._read_reply(60) or {}).get("ready") is not True:
            err = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
            self.stop()
            raise SandboxError(f"the sandbox did not start ({err[-1] if err else 'no output'}); "
                               f"check that bubblewrap can create namespaces here, or {INSTALL_HINT}")

    def stop(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, 9)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
            for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                if pipe:
                    pipe.close()
            self.proc = None
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def run(self, job_id: int, program: Program) -> Result:
        if self.proc is None:
            self.start()
        job = {"id": job_id, "candidate": program.candidate, "setup": program.setup, "test": program.test,
               "rebind": list(program.rebind), "timeout": self.limits.timeout, "limits": self.limits.worker()}
        reply = None
        try:
            self.proc.stdin.write(json.dumps(job).encode() + b"\n")
            self.proc.stdin.flush()
            reply = self._read_reply(self.limits.timeout + 10)
        except (BrokenPipeError, OSError):
            reply = None
        if reply is None or reply.get("id") != job_id:
            self.stop()  # killed or wedged by the program: a fresh worker for the next one
            return Result(False, "failed: the program brought down its sandbox worker", self.sandboxed)
        if reply.get("error"):  # the sandbox itself failed: no program result can be trusted
            raise SandboxError(f"{reply.get('result')}; check that bubblewrap can create user namespaces here "
                               f"(sysctl user.max_user_namespaces), or {INSTALL_HINT}")
        fields = {k: reply.get(k) for k in ("exit_code", "timed_out", "seconds", "stdout", "stderr", "truncated")}
        return Result(bool(reply.get("passed")), str(reply.get("result")), self.sandboxed,
                      **{k: v for k, v in fields.items() if v is not None})

    def _read_reply(self, timeout: float) -> Optional[dict]:
        """The worker's next line as JSON, or None after `timeout` seconds or at its end (select on
        the raw pipe: no thread per reply)."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError:
            return None


class _Batch:
    """The programs of one `SandboxPool.run` call: results in input order, first error, done event."""

    def __init__(self, n: int):
        self.results: list[Optional[Result]] = [None] * n
        self.left = n
        self.error: Optional[BaseException] = None
        self.lock, self.finished = threading.Lock(), threading.Event()
        if n == 0:
            self.finished.set()

    def done(self, i: int, result: Optional[Result], error: Optional[BaseException] = None) -> None:
        with self.lock:
            self.results[i] = result
            self.error = self.error or error
            self.left -= 1
            if self.left == 0:
                self.finished.set()


class SandboxPool:
    """`workers` sandboxed workers running programs concurrently; use as a context manager.

    Each worker is owned by one long-lived thread of the pool, which also (re)starts its process:
    bubblewrap's --die-with-parent is tied to the thread that started it, so workers must never
    be started from a short-lived thread."""

    def __init__(self, workers: int = 0, limits: Limits = Limits(), allow_unsandboxed: bool = False):
        self.limits = limits
        self.sandboxed = bwrap_path() is not None
        if not self.sandboxed and not allow_unsandboxed:
            raise SandboxError(f"refusing to run generated code without a sandbox: {INSTALL_HINT}")
        n = workers or min(os.cpu_count() or 1, 8)
        if n < 1:
            raise SandboxError(f"--workers must be at least 1, got {workers}")
        self._workers = [_Worker(limits, self.sandboxed, k) for k in range(n)]
        self._ids = itertools.count(1)
        self._jobs: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _serve(self, worker: _Worker) -> None:
        try:
            while True:
                item = self._jobs.get()
                if item is None:
                    return
                batch, i, program = item
                if batch.error is not None:
                    batch.done(i, None)
                    continue
                try:
                    batch.done(i, worker.run(next(self._ids), program))
                except BaseException as exc:  # e.g. SandboxError: the sandbox cannot start here
                    batch.done(i, None, exc)
        finally:
            worker.stop()

    def run(self, programs: Sequence[Union[Program, str]]) -> list[Result]:
        """Run every job (a `Program`, or a self-checking program's text); results in input order."""
        programs = [p if isinstance(p, Program) else Program(candidate=p) for p in programs]
        if not self._threads:
            self._threads = [threading.Thread(target=self._serve, args=(w,), daemon=True, name=f"sandbox-{k}")
                             for k, w in enumerate(self._workers)]
            for t in self._threads:
                t.start()
        batch = _Batch(len(programs))
        for i, program in enumerate(programs):
            self._jobs.put((batch, i, program))
        batch.finished.wait()
        if batch.error is not None:
            raise batch.error
        return batch.results  # type: ignore[return-value]

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()
        self._threads = []
        for worker in self._workers:
            worker.stop()


def run_programs(programs: Iterable[Union[Program, str]], workers: int = 0, limits: Limits = Limits(),
                 allow_unsandboxed: bool = False) -> list[Result]:
    with SandboxPool(workers, limits, allow_unsandboxed) as pool:
        return pool.run(list(programs))
