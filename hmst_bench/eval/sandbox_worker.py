"""Inside the code sandbox: the worker that runs jobs, and the launcher that starts it unprivileged.

`hmst_bench.eval.sandbox` starts `python -I -S sandbox_worker.py serve ...` inside bubblewrap and
talks to it over stdin/stdout, one JSON object per line each way. Standard library only: inside
the sandbox nothing else is mounted. Processes, from the host down:

    launcher (root callers only)  maps a fresh user namespace onto unused host uids, then execs bwrap
    worker   PID 1 of the sandbox; uid 0 of that user namespace, an unprivileged uid on the host,
             holding only CAP_SETUID/SETGID/SYS_ADMIN/KILL inside its own namespaces
    zygote   forked by the worker before it reads any job, so its memory never holds a test or
             an expected answer; it starts each candidate
    judge    one per job, forked by the worker: uid JUDGE, no capabilities, runs the trusted test
             (sandbox_judge.run_judge) and writes the verdict on a pipe only the worker reads
    candidate one per job, forked by the zygote through a short-lived intermediate: uid PROGRAM,
             no capabilities, PID 1 of its own PID namespace, its own mount and IPC namespaces with
             a fresh size-bounded /tmp and /dev/shm and a read-only /proc showing only itself;
             runs the program (sandbox_judge.serve_candidate)

Judge and candidate also get rlimits and a seccomp filter (no new processes, no exec, no ptrace or
process_vm_*, no keyring, no namespace or mount calls). The worker kills both at the wall-clock
timeout. Nothing of a candidate survives it: its namespaces, files and shared memory go with it.

When the caller is not root, bubblewrap can map only the caller's uid, so judge, candidate and
worker share one uid inside the namespace: the candidate still cannot name the worker or the
judge (its own PID namespace) and holds no capabilities. Without bubblewrap (`--allow-unsandboxed`)
the worker runs directly: rlimits, seccomp and the two-process judge still apply; namespaces do not.
"""

import ctypes
import json
import os
import platform
import resource
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time

PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, PR_SET_DUMPABLE = 38, 22, 4
PR_SET_CHILD_SUBREAPER, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 36, 47, 4
SECCOMP_MODE_FILTER = 2
CLONE_THREAD = 0x00010000
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x20000000, 0x10000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 4096, 1 << 14, 1 << 18

# Inside the user namespace: the worker is 0; judge and candidate get their own ids (root callers).
JUDGE_ID, PROGRAM_ID = 1000, 2000

# Denied system calls: (name, x86_64 number, aarch64 number). Threads stay allowed (clone with
# CLONE_THREAD); everything that makes a process, replaces the image, reaches another process's
# memory, the kernel keyrings, namespaces or mounts is refused with EPERM.
_DENIED = [
    ("fork", 57, None), ("vfork", 58, None), ("execve", 59, 221), ("execveat", 322, 281),
    ("ptrace", 101, 117), ("process_vm_readv", 310, 270), ("process_vm_writev", 311, 271),
    ("kcmp", 312, 272), ("pidfd_getfd", 438, 438),
    ("add_key", 248, 217), ("request_key", 249, 218), ("keyctl", 250, 219),
    ("unshare", 272, 97), ("setns", 308, 268), ("mount", 165, 40), ("umount2", 166, 39),
    ("pivot_root", 155, 41), ("chroot", 161, 51), ("open_tree", 428, 428), ("move_mount", 429, 429),
    ("fsopen", 430, 430), ("fsconfig", 431, 431), ("fsmount", 432, 432), ("fspick", 433, 433),
    ("mount_setattr", 442, 442), ("bpf", 321, 280), ("perf_event_open", 298, 241),
    ("userfaultfd", 323, 282), ("io_uring_setup", 425, 425), ("io_uring_enter", 426, 426),
    ("io_uring_register", 427, 427),
]
_ARCH = {"x86_64": (0xC000003E, 0, 56, 435), "aarch64": (0xC00000B7, 1, 220, 435)}  # audit arch, column, clone, clone3
EPERM, ENOSYS = 1, 38
RET_ALLOW = 0x7FFF0000
RET_KILL = 0x80000000


def _errno(code):
    return 0x00050000 | code


def seccomp_program(machine=None):
    """A classic-BPF seccomp filter (list of (code, jt, jf, k)) for judges and candidates."""
    machine = machine or platform.machine()
    arch, column, clone, clone3 = _ARCH[machine]
    ld_abs, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    prog = [(ld_abs, 0, 0, 4),            # A = seccomp_data.arch
            (jeq, 1, 0, arch),
            (ret, 0, 0, RET_KILL),        # another ABI: kill
            (ld_abs, 0, 0, 0)]            # A = seccomp_data.nr
    if machine == "x86_64":
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, RET_KILL)]  # x32 numbers: kill
    prog += [(jeq, 0, 1, clone3), (ret, 0, 0, _errno(ENOSYS))]   # glibc falls back from clone3 to clone
    for row in _DENIED:
        nr = row[1 + column]
        if nr is not None:
            prog += [(jeq, 0, 1, nr), (ret, 0, 0, _errno(EPERM))]
    prog += [(jeq, 0, 4, clone),                 # clone: allowed only to make a thread
             (ld_abs, 0, 0, 16),                 # A = low 32 bits of args[0] (flags; little-endian)
             (jset, 0, 1, CLONE_THREAD),
             (ret, 0, 0, RET_ALLOW),
             (ret, 0, 0, _errno(EPERM)),
             (ret, 0, 0, RET_ALLOW)]             # every other system call
    return prog


_libc = ctypes.CDLL(None, use_errno=True)


def _check(result, what):
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def install_seccomp():
    prog = seccomp_program()
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "prctl(PR_SET_SECCOMP)")


def drop_privileges(uid):
    """Become `uid` (when given) and hold no capabilities at all, whatever the uid."""
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)   # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()                  # effective, permitted, inheritable: all empty
    _check(_libc.capset(header, data), "capset")


def apply_limits(limits):
    def set_(kind, soft, hard=None):
        resource.setrlimit(kind, (int(soft), int(soft if hard is None else hard)))

    set_(resource.RLIMIT_AS, limits["memory_bytes"])
    set_(resource.RLIMIT_CPU, limits["cpu_seconds"], int(limits["cpu_seconds"]) + 1)
    set_(resource.RLIMIT_NPROC, limits["processes"])
    set_(resource.RLIMIT_FSIZE, limits["file_bytes"])
    set_(resource.RLIMIT_NOFILE, limits["open_files"])
    set_(resource.RLIMIT_CORE, 0)


def _redirect(stdout_fd, stderr_fd, keep):
    """stdin from /dev/null, stdout/stderr to the given descriptors, every other one closed."""
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(stdout_fd, 1)
    os.dup2(stderr_fd, 2)
    keep = set(keep) | {0, 1, 2}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _mount(source, target, fstype, flags, options):
    _check(_libc.mount(source, target, fstype, flags, options), f"mount {target.decode()}")


# --- the candidate -------------------------------------------------------------------------------

def candidate_child(job, sock_fd, out_fd, err_fd, setup_fd, confine):
    """PID 1 of a fresh PID namespace (when confined): private /tmp, /dev/shm, /proc; then the program.
    "ok" on `setup_fd`, closed before the program runs, tells the zygote the confinement is in place;
    anything else there is a fault of the sandbox, never of the program."""
    try:
        os.setsid()
        limits = job["limits"]
        _redirect(out_fd, err_fd, {sock_fd, setup_fd})
        if confine:
            _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWIPC), "unshare")
            _mount(None, b"/", None, MS_REC | MS_PRIVATE, None)
            owner = PROGRAM_ID if job["ids"] else 0
            private = f"uid={owner},gid={owner},mode=0700".encode()
            flags = MS_NOSUID | MS_NODEV
            _mount(b"tmpfs", b"/tmp", b"tmpfs", flags, b"size=%d," % limits["tmp_bytes"] + private)
            _mount(b"tmpfs", b"/dev/shm", b"tmpfs", flags, b"size=%d," % limits["shm_bytes"] + private)
            _mount(b"proc", b"/proc", b"proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
            workdir = "/tmp"
        else:
            workdir = job["workdir"]
        drop_privileges(PROGRAM_ID if job["ids"] else None)
        os.chdir(workdir)  # after the drop: /tmp belongs to the program's uid, mode 0700
        os.environ["TMPDIR"] = workdir
        apply_limits(limits)
        install_seccomp()
        from sandbox_judge import serve_candidate
    except BaseException as exc:
        os.write(setup_fd, f"could not confine the program: {exc!r}".encode()[:4000])
        os._exit(1)
    os.write(setup_fd, b"ok")
    os.close(setup_fd)
    try:
        serve_candidate(socket.socket(fileno=sock_fd), job["candidate"])
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        try:
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(1)
    os._exit(0)


def zygote(channel, confine):
    """Start candidates on the worker's request: one message and three descriptors per job."""
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # candidates are re-parented here, to be reaped
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(channel, 1 << 24, 4)
        except OSError:
            os._exit(0)
        if not data:
            os._exit(0)
        job = json.loads(data)
        sock_fd, out_fd, err_fd = fds
        read_end, write_end = os.pipe()
        setup_r, setup_w = os.pipe()
        middle = os.fork()
        if middle == 0:  # the intermediate: new PID namespace for its one child, then gone
            os.close(read_end)
            os.close(setup_r)
            channel.close()
            try:
                if confine:
                    _check(_libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
                pid = os.fork()
                if pid == 0:
                    os.close(write_end)
                    candidate_child(job, sock_fd, out_fd, err_fd, setup_w, confine)
                os.write(write_end, str(pid).encode())
            except BaseException as exc:
                os.write(setup_w, f"could not start the program: {exc!r}".encode()[:4000])
            finally:
                os._exit(0)
        for fd in (write_end, setup_w, sock_fd, out_fd, err_fd):
            os.close(fd)
        os.waitpid(middle, 0)
        text = os.read(read_end, 32)
        os.close(read_end)
        setup = _read_all(setup_r)  # "ok", or why the confinement failed; EOF once set up or gone
        pid = int(text) if text else -1
        channel.sendall(json.dumps({"pid": pid, "setup": setup.decode("utf-8", "replace")}).encode() + b"\n")
        _await_end(channel)
        status = _finish(pid)
        channel.sendall(json.dumps(status).encode() + b"\n")


def _read_all(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            os.close(fd)
            return b"".join(chunks)
        chunks.append(chunk)


def _await_end(channel):
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = channel.recv(64)
        if not chunk:
            os._exit(0)
        buf += chunk


def _finish(pid):
    """Kill the candidate (and so its PID namespace) if it still runs; its exit as the job saw it."""
    if pid <= 0:
        return {"exit_code": None, "ended_before": False, "cpu_seconds": 0.0}
    ended = False
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        ended = info is not None
    except ChildProcessError:
        pass
    if not ended:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, status, usage = os.wait4(pid, 0)
    return {"exit_code": os.waitstatus_to_exitcode(status), "ended_before": ended,
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 4)}


# --- the judge -----------------------------------------------------------------------------------

def judge_child(job, sock_fd, verdict_fd, err_fd):
    try:
        _redirect(err_fd, err_fd, {sock_fd, verdict_fd})
        os.chdir("/")
        drop_privileges(JUDGE_ID if job["ids"] else None)
        apply_limits(job["limits"])
        install_seccomp()
        from sandbox_judge import run_judge

        passed, message = run_judge(socket.socket(fileno=sock_fd), job["setup"], job["test"], job["rebind"])
        os.write(verdict_fd, json.dumps({"passed": bool(passed), "message": str(message)[:2000]}).encode())
    except BaseException:
        os._exit(1)
    os._exit(0)


# --- the worker ----------------------------------------------------------------------------------

def _read_fd(fd, limit):
    data = os.pread(fd, limit + 1, 0)
    os.close(fd)
    return data[:limit].decode("utf-8", "replace"), len(data) > limit


class Worker:
    def __init__(self, confine, ids, root):
        self.confine, self.ids, self.root = confine, ids, root
        mine, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            mine.close()
            zygote(theirs, confine)
        theirs.close()
        self.zygote, self.zygote_pid = mine, pid
        self.replies = mine.makefile("rb")

    def run(self, job):
        limits = job["limits"]
        job = {**job, "ids": self.ids}
        workdir = None
        if not self.confine:
            workdir = tempfile.mkdtemp(prefix="job-", dir=self.root)
            job["workdir"] = workdir
        judge_sock, cand_sock = socket.socketpair()
        out_fd, err_fd, judge_err = (os.memfd_create(n, os.MFD_CLOEXEC) for n in ("out", "err", "judge"))
        started = time.monotonic()
        message = {"candidate": job["candidate"], "limits": limits, "ids": self.ids, "workdir": workdir}
        socket.send_fds(self.zygote, [json.dumps(message).encode()], [cand_sock.fileno(), out_fd, err_fd])
        cand_sock.close()
        read_end, write_end = os.pipe()
        judge = os.fork()  # while the zygote sets the candidate up
        if judge == 0:
            os.close(read_end)
            judge_child(job, judge_sock.fileno(), write_end, judge_err)
        os.close(write_end)
        judge_sock.close()
        started_reply = json.loads(self.replies.readline())  # {"pid", "setup"}: the candidate runs
        if started_reply.get("setup") != "ok":  # a fault of the sandbox: the host stops the evaluation
            os.kill(judge, signal.SIGKILL)
            os.waitpid(judge, 0)
            self.zygote.sendall(b"end\n")
            self.replies.readline()
            for fd in (out_fd, err_fd, judge_err, read_end):
                os.close(fd)
            return {"id": job["id"], "passed": False, "error": True,
                    "result": f"sandbox error: {started_reply.get('setup') or 'the program did not start'}"}
        timed_out = not _wait(judge, float(job["timeout"]) - (time.monotonic() - started))
        if timed_out:
            os.kill(judge, signal.SIGKILL)
        _, judge_status, _ = os.wait4(judge, 0)
        self.zygote.sendall(b"end\n")
        candidate = json.loads(self.replies.readline())
        seconds = time.monotonic() - started
        os.set_blocking(read_end, False)
        try:
            verdict = os.read(read_end, 4096)
        except BlockingIOError:
            verdict = b""
        os.close(read_end)
        bound = int(limits["output_bytes"])
        stdout, cut_out = _read_fd(out_fd, bound)
        stderr, cut_err = _read_fd(err_fd, bound)
        judge_text, _ = _read_fd(judge_err, bound)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        return _reply(job["id"], verdict, judge_status, candidate, timed_out, seconds,
                      stdout, stderr, judge_text, cut_out or cut_err)


def _wait(pid, timeout):
    """True when `pid` exits within `timeout` seconds."""
    fd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([fd], [], [], max(timeout, 0.0))
        return bool(ready)
    finally:
        os.close(fd)


def _reply(job_id, verdict, judge_status, candidate, timed_out, seconds, stdout, stderr, judge_text, truncated):
    try:
        decided = json.loads(verdict) if verdict else None
    except ValueError:
        decided = None
    judged = os.waitstatus_to_exitcode(judge_status) == 0 and isinstance(decided, dict)
    passed = bool(not timed_out and judged and decided.get("passed") is True)
    code = candidate.get("exit_code")
    if passed:
        result = "passed"
    elif timed_out:
        result = "timed out"
    elif candidate.get("ended_before") and code is not None and code < 0:
        result = f"killed by {signal.Signals(-code).name}"
    elif judged:
        result = "failed: " + (decided.get("message") or "the test failed")
    else:
        tail = judge_text.strip().splitlines()
        result = "failed: the judge ended without a verdict (" + (tail[-1] if tail else f"status {judge_status}") + ")"
    return {"id": job_id, "passed": passed, "result": result,
            "exit_code": code if candidate.get("ended_before") else None, "timed_out": timed_out,
            "seconds": round(seconds, 4), "cpu_seconds": candidate.get("cpu_seconds"),
            "stdout": stdout, "stderr": stderr, "truncated": truncated}


def serve(confine, ids, root):
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # no /proc/1/fd or /proc/1/mem for anyone but root here
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    worker = Worker(confine, ids, root)
    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        job = json.loads(line)
        try:
            reply = worker.run(job)
        except Exception as exc:  # a harness fault is reported, never mistaken for a pass
            reply = {"id": job.get("id"), "passed": False, "result": f"sandbox error: {exc!r}", "error": True}
        out.write(json.dumps(reply).encode() + b"\n")
        out.flush()


# --- the launcher (host side, root callers) --------------------------------------------------------

def launch(base, argv):
    """Enter a new user namespace mapping 0, JUDGE_ID and PROGRAM_ID onto unused host ids
    base, base+1, base+2, then exec bubblewrap (argv) as uid 0 of that namespace. Only a process
    that is root outside may write such a map, so a helper child writes it for us."""
    argv = _stage_binds(argv)
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    helper = os.fork()
    if helper == 0:
        os.read(ready_r, 1)
        target = os.getppid()
        try:
            with open(f"/proc/{target}/setgroups", "w") as fh:
                fh.write("allow")
        except OSError:
            pass
        lines = f"0 {base} 1\n{JUDGE_ID} {base + 1} 1\n{PROGRAM_ID} {base + 2} 1\n"
        for kind in ("uid_map", "gid_map"):
            with open(f"/proc/{target}/{kind}", "w") as fh:
                fh.write(lines)
        os.write(done_w, b"1")
        os._exit(0)
    _check(_libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
    os.write(ready_w, b"1")
    ok = os.read(done_r, 1)
    os.waitpid(helper, 0)
    if ok != b"1":
        sys.stderr.write("could not write the sandbox's uid map\n")
        os._exit(111)
    os.setresgid(0, 0, 0)
    os.setgroups([])
    os.setresuid(0, 0, 0)
    _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # the id change cleared it; bwrap reads /proc/self/fd
    os.execv(argv[0], argv)


def _stage_binds(argv):
    """Re-point each `--ro-bind SRC DEST` of bwrap's arguments at a copy of the mount made here, as
    host root, in a private mount namespace: inside the new user namespace bubblewrap is not root on
    the host and could not walk a path such as /root/.pyenv (mode 0700) to the Python installation.
    The staging tmpfs covers /dev/shm in this private namespace only; bubblewrap makes its own /dev."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, b"/", None, MS_REC | MS_PRIVATE, None)
    stage = "/dev/shm" if os.path.isdir("/dev/shm") else "/mnt"
    _mount(b"tmpfs", stage.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755,size=64k")
    out, i, n = [], 0, 0
    while i < len(argv):
        if argv[i] == "--ro-bind" and i + 2 < len(argv):
            source, target = argv[i + 1], f"{stage}/{n}"
            if os.path.isdir(source):
                os.mkdir(target, 0o755)
            else:
                os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
            _mount(source.encode(), target.encode(), None, MS_BIND | MS_REC, None)
            out += ["--ro-bind", target, argv[i + 2]]
            i, n = i + 3, n + 1
        elif argv[i] == "--":
            out += argv[i:]
            break
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv):
    mode = argv[1]
    if mode == "launch":  # launch BASE bwrap ARGS...
        launch(int(argv[2]), argv[3:])
    elif mode == "serve":  # serve confined|direct ids|noids ROOT
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import sandbox_judge  # noqa: F401  (imported once here, inherited by every fork)

        serve(argv[2] == "confined", argv[3] == "ids", argv[4])
    else:
        sys.exit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv)
