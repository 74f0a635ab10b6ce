"""The long-lived process inside the code sandbox: reads jobs, forks one confined child per program.

`hmst_bench.eval.sandbox` starts this file's source as `python -I -S -c SOURCE` inside bubblewrap
(PID 1 of a fresh PID namespace, so a program cannot kill it) and talks to it over stdin/stdout,
one JSON object per line each way. It imports nothing from hmst_bench and only the standard
library, because inside the sandbox nothing else is mounted.

For each job it makes a fresh directory on the sandbox's private tmpfs and forks a child that:
starts a new session (its own process group), points stdin at /dev/null and stdout/stderr at
files in that directory, closes every other inherited descriptor except a result pipe, applies
the rlimits (address space, CPU seconds, processes, file size, open files, no core files),
installs a seccomp filter that refuses new processes (fork, vfork, clone without CLONE_THREAD,
clone3) and ptrace/process_vm_*, snapshots `builtins`, and executes the program.

A program passes only if executing it returned normally (so every statement ran, the test's
final `check(...)` call included), left `builtins` exactly as it found it, and then the harness
itself wrote this job's random token to the result pipe and exited 0. Exiting early in any way
(`sys.exit`, `SystemExit`, `os._exit(0)`, a signal), printing anything, or writing to the pipe
never produces the token. The worker kills the child's process group at the wall-clock timeout.
Limitation: the token lives in the child's memory until it is written, so a program written to
search the interpreter for it could forge a pass; containment never depends on it.
"""

import ctypes
import json
import os
import platform
import resource
import select
import shutil
import signal
import struct
import sys
import time

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
PR_SET_DUMPABLE = 4
SECCOMP_MODE_FILTER = 2
CLONE_THREAD = 0x00010000

# (audit arch, {syscall: errno}, syscall numbers refused as a whole ABI) per machine
_ARCH = {
    "x86_64": (0xC000003E, {"clone": 56, "fork": 57, "vfork": 58, "clone3": 435, "ptrace": 101,
                            "process_vm_readv": 310, "process_vm_writev": 311}),
    "aarch64": (0xC00000B7, {"clone": 220, "clone3": 435, "ptrace": 117,
                             "process_vm_readv": 270, "process_vm_writev": 271}),
}
EPERM, ENOSYS = 1, 38
RET_ALLOW = 0x7FFF0000
RET_KILL = 0x80000000


def _errno(code):
    return 0x00050000 | code


def seccomp_program(machine=None):
    """A classic-BPF seccomp filter (list of (code, jt, jf, k)) refusing new processes and ptrace."""
    machine = machine or platform.machine()
    arch, calls = _ARCH[machine]
    ld_abs, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    prog = [(ld_abs, 0, 0, 4),            # A = seccomp_data.arch
            (jeq, 1, 0, arch),
            (ret, 0, 0, RET_KILL),        # another ABI: kill
            (ld_abs, 0, 0, 0)]            # A = seccomp_data.nr
    if machine == "x86_64":
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, RET_KILL)]  # x32 numbers: kill
    denied = [n for name, n in calls.items() if name != "clone"]
    for nr in denied:
        code = ENOSYS if nr == calls["clone3"] else EPERM  # glibc falls back from clone3 to clone
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, _errno(code))]
    prog += [(jeq, 0, 4, calls["clone"]),        # clone: allowed only to make a thread
             (ld_abs, 0, 0, 16),                 # A = low 32 bits of args[0] (flags; little-endian)
             (jset, 0, 1, CLONE_THREAD),
             (ret, 0, 0, RET_ALLOW),
             (ret, 0, 0, _errno(EPERM)),
             (ret, 0, 0, RET_ALLOW)]             # every other system call
    return prog


def install_seccomp():
    libc = ctypes.CDLL(None, use_errno=True)
    prog = seccomp_program()
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def _limit(kind, value):
    value = int(value)
    resource.setrlimit(kind, (value, value))


def _child(job, workdir, result_fd, token):
    """Runs in the forked child; never returns."""
    write, exit_ = os.write, os._exit  # bound before the program can rebind os
    try:
        os.setsid()
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        for fd, name in ((1, "stdout"), (2, "stderr")):
            out = os.open(os.path.join(workdir, os.pardir, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(out, fd)
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd > 2 and fd != result_fd:
                try:
                    os.close(fd)
                except OSError:
                    pass
        os.chdir(workdir)
        limits = job["limits"]
        _limit(resource.RLIMIT_AS, limits["memory_bytes"])
        resource.setrlimit(resource.RLIMIT_CPU, (int(limits["cpu_seconds"]), int(limits["cpu_seconds"]) + 1))
        _limit(resource.RLIMIT_NPROC, limits["processes"])
        _limit(resource.RLIMIT_FSIZE, limits["file_bytes"])
        _limit(resource.RLIMIT_NOFILE, limits["open_files"])
        _limit(resource.RLIMIT_CORE, 0)
        install_seccomp()
        import builtins

        sys.argv = ["program.py"]
        snapshot = dict(builtins.__dict__)
        code = compile(job["program"], "program.py", "exec")
        namespace = {"__name__": "__main__", "__builtins__": builtins}
        exec(code, namespace)
        current = builtins.__dict__
        if current.keys() != snapshot.keys() or any(current[k] is not v for k, v in snapshot.items()):
            sys.stderr.write("hmst-bench sandbox: the program changed builtins; scored as failed\n")
            sys.stderr.flush()
            exit_(3)
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # SystemExit included: leaving early is not passing
        try:
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
        finally:
            exit_(1)
    write(result_fd, token)
    exit_(0)


def _read_bounded(path, limit):
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError:
        return "", False
    return data[:limit].decode("utf-8", "replace"), len(data) > limit


def run_job(job, root):
    token = os.urandom(16).hex().encode()
    jobdir = os.path.join(root, "job")  # holds the captured output and the program's work dir
    workdir = os.path.join(jobdir, "work")
    shutil.rmtree(jobdir, ignore_errors=True)
    os.mkdir(jobdir, 0o700)
    os.mkdir(workdir, 0o700)
    read_fd, write_fd = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(job, workdir, write_fd, token)
    os.close(write_fd)
    timed_out = False
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], float(job["timeout"]))
        if not ready:
            timed_out = True
            for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
                try:
                    kill()
                except ProcessLookupError:
                    pass
        _, status, usage = os.wait4(pid, 0)
    finally:
        os.close(pidfd)
    seconds = time.monotonic() - started
    os.set_blocking(read_fd, False)
    try:
        message = os.read(read_fd, 64)
    except BlockingIOError:
        message = b""
    os.close(read_fd)
    bound = int(job["limits"]["output_bytes"])
    stdout, cut_out = _read_bounded(os.path.join(jobdir, "stdout"), bound)
    stderr, cut_err = _read_bounded(os.path.join(jobdir, "stderr"), bound)
    shutil.rmtree(jobdir, ignore_errors=True)
    exit_code = os.waitstatus_to_exitcode(status)
    passed = not timed_out and exit_code == 0 and message == token
    if passed:
        result = "passed"
    elif timed_out:
        result = "timed out"
    elif exit_code < 0:
        result = f"killed by {signal.Signals(-exit_code).name}"
    elif exit_code == 3:
        result = "failed: builtins changed"
    else:
        tail = stderr.strip().splitlines()
        result = "failed: " + (tail[-1] if tail else ("exited before finishing" if exit_code == 0 else f"exit status {exit_code}"))
    return {"id": job["id"], "passed": passed, "result": result, "exit_code": exit_code,
            "timed_out": timed_out, "seconds": round(seconds, 4), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 4),
            "stdout": stdout, "stderr": stderr, "truncated": cut_out or cut_err}


def main():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # no /proc/1/fd or ptrace access for the children
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    root = sys.argv[1] if len(sys.argv) > 1 else "/tmp"
    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        job = json.loads(line)
        try:
            reply = run_job(job, root)
        except Exception as exc:  # a harness fault is reported, never mistaken for a pass
            reply = {"id": job.get("id"), "passed": False, "result": f"sandbox error: {exc!r}", "error": True}
        out.write(json.dumps(reply).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    main()
