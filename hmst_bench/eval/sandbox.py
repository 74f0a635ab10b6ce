"""Run untrusted (model-written) Python programs in a bubblewrap sandbox, fast.

`SandboxPool(workers=N).run(programs)` returns one `Result` per program. Each worker is one
long-lived `bwrap` process (see `sandbox_worker.py` for what happens inside) with:

- new network, PID, IPC, UTS (and, where allowed, user and cgroup) namespaces: no network at
  all, the worker is PID 1 so a program can neither see nor kill anything outside;
- a read-only file system holding only what the interpreter needs (/usr, /bin, /lib*, the
  Python installation) -- no /home, /root, /etc, project or data folders -- plus /dev, /proc and
  a private size-limited tmpfs at /tmp, in which each program gets a fresh working directory;
- a clean environment (no inherited variables), all capabilities dropped, `--die-with-parent`;
- per program: rlimits on address space (default 1 GiB), CPU seconds, processes, file size and
  open files; a seccomp filter refusing new processes and ptrace; a wall-clock timeout that kills
  the program's process group; stdout/stderr captured and truncated to a bound.

Without bubblewrap, execution is refused (`SandboxError`) unless `allow_unsandboxed=True`: then
the same worker runs directly (rlimits, seccomp and fork-per-program still apply; namespaces and
the file-system view do not) and every result says `sandboxed: False`.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

WORKER_SOURCE = Path(__file__).with_name("sandbox_worker.py")
INSTALL_HINT = "install bubblewrap (Debian/Ubuntu: apt-get install -y bubblewrap) or pass --allow-unsandboxed"


class SandboxError(RuntimeError):
    """The sandbox cannot run; the message is one line naming the fix."""


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0               # wall-clock seconds per program
    memory_bytes: int = 1 << 30         # RLIMIT_AS
    cpu_seconds: Optional[int] = None   # RLIMIT_CPU; default: the timeout rounded up
    processes: int = 1                  # RLIMIT_NPROC (seccomp refuses new processes anyway)
    file_bytes: int = 16 << 20          # RLIMIT_FSIZE
    open_files: int = 64                # RLIMIT_NOFILE
    output_bytes: int = 16 << 10        # captured stdout and stderr, each
    tmpfs_bytes: int = 256 << 20        # the worker's whole /tmp

    def worker(self) -> dict:
        cpu = self.cpu_seconds if self.cpu_seconds is not None else int(-(-self.timeout // 1))
        return {"memory_bytes": self.memory_bytes, "cpu_seconds": max(cpu, 1), "processes": self.processes,
                "file_bytes": self.file_bytes, "open_files": self.open_files, "output_bytes": self.output_bytes}


@dataclass
class Result:
    passed: bool
    result: str                 # "passed", "timed out", "failed: <last error line>", ...
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


def bwrap_command(limits: Limits) -> list[str]:
    exe, prefixes = _interpreter()
    cmd = [bwrap_path() or "bwrap", "--die-with-parent", "--new-session", "--as-pid-1",
           "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
           "--cap-drop", "ALL", "--clearenv",
           "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8", "--setenv", "HOME", "/tmp"]
    if os.geteuid() != 0:
        cmd.append("--unshare-user")
    mounted = ["/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
            mounted.append(top)
    cmd += ["--ro-bind", "/usr", "/usr"]
    for prefix in prefixes:
        if not any(prefix == m or prefix.startswith(m + "/") for m in mounted):
            cmd += ["--ro-bind", prefix, prefix]
            mounted.append(prefix)
    cmd += ["--dev", "/dev", "--proc", "/proc", "--size", str(limits.tmpfs_bytes), "--tmpfs", "/tmp",
            "--chdir", "/tmp", "--", exe, "-I", "-S", "-c", WORKER_SOURCE.read_text(), "/tmp"]
    return cmd


def direct_command() -> list[str]:
    exe, _ = _interpreter()
    return [exe, "-I", "-S", "-c", WORKER_SOURCE.read_text()]


class _Worker:
    """One worker process and its pipes; restarted when a program kills or wedges it."""

    def __init__(self, limits: Limits, sandboxed: bool):
        self.limits, self.sandboxed = limits, sandboxed
        self.proc: Optional[subprocess.Popen] = None
        self.tmp: Optional[str] = None

    def start(self) -> None:
        if self.sandboxed:
            cmd = bwrap_command(self.limits)
        else:
            import tempfile

            self.tmp = tempfile.mkdtemp(prefix="hmst-bench-unsandboxed-")
            cmd = direct_command() + [self.tmp]
        env = {} if self.sandboxed else {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": self.tmp or "/tmp"}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, cwd=self.tmp or "/", start_new_session=True)
        line = self.proc.stdout.readline()
        if not line.startswith(b'{"ready"'):
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

    def run(self, job_id: int, program: str) -> Result:
        if self.proc is None:
            self.start()
        job = {"id": job_id, "program": program, "timeout": self.limits.timeout, "limits": self.limits.worker()}
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
        fields = {k: reply.get(k) for k in ("exit_code", "timed_out", "seconds", "stdout", "stderr", "truncated")}
        return Result(bool(reply.get("passed")), str(reply.get("result")), self.sandboxed,
                      **{k: v for k, v in fields.items() if v is not None})

    def _read_reply(self, timeout: float) -> Optional[dict]:
        box: list = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not box or not box[0]:
            return None
        try:
            return json.loads(box[0])
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
        self._workers = [_Worker(limits, self.sandboxed) for _ in range(n)]
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

    def run(self, programs: Sequence[str]) -> list[Result]:
        """Run every program; results in input order."""
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


def run_programs(programs: Iterable[str], workers: int = 0, limits: Limits = Limits(),
                 allow_unsandboxed: bool = False) -> list[Result]:
    with SandboxPool(workers, limits, allow_unsandboxed) as pool:
        return pool.run(list(programs))
