"""Advisory file locks (fcntl.flock) for folders that one process at a time may write.

Used for run directories (one `train` per run; `train/rundir.py`) and for the benchmark store
(one import of a benchmark at a time; `eval/store/write.py`). The lock belongs to an open file: the
kernel drops it when its holder exits, however it exits (`kill -9` included), so a lock left by a
dead process never blocks anyone and there is nothing stale to clean up. A process refused the
lock names its holder from the kernel's table of locks (/proc/locks), so the file need not be
rewritten by each holder (a refused session then changes nothing), or from a `pid N` line a
holder chose to `record`.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class Locked(Exception):
    """Another process holds the lock; `pid` is the pid it recorded (None if not yet written)."""

    def __init__(self, path: Path, pid: int | None):
        super().__init__(f"{path} is locked by {'pid ' + str(pid) if pid else 'another process'}")
        self.path = path
        self.pid = pid


def holder_pid(text: str) -> int | None:
    """The pid a holder recorded in the lock file's text (a line `pid N`), or None."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "pid" and value.strip().isdigit():
            return int(value)
    return None


def kernel_holder(st: os.stat_result) -> int | None:
    """The pid holding a flock on the file of `st`, from /proc/locks (Linux); None if unknown."""
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    same_inode = None
    for line in table.splitlines():
        parts = line.split()  # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:2147300 0 EOF"; waiters have "->"
        if len(parts) < 6 or parts[1] != "FLOCK" or not parts[4].isdigit():
            continue
        if parts[5] == where:
            return int(parts[4])
        if parts[5].rsplit(":", 1)[-1] == str(st.st_ino):  # overlay file systems may show another device
            same_inode = int(parts[4])
    return same_inode


class FileLock:
    """An exclusive flock on `path`, held until `release()` (or the process's end).

    `created` says whether this acquisition created the file, so a caller that must leave a
    folder as it found it knows to `remove()` it."""

    def __init__(self, path: Path, fd: int, created: bool):
        self.path, self.fd, self.created = path, fd, created

    @classmethod
    def acquire(cls, path: str | os.PathLike, blocking: bool = False) -> "FileLock":
        """Lock `path` (created if absent, with the umask's permissions). Raises `Locked` when
        another process holds it and `blocking` is False; OSError when it cannot be opened."""
        path = Path(path)
        while True:
            created = True
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            except FileExistsError:
                created = False
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                pid = kernel_holder(os.fstat(fd)) or holder_pid(os.pread(fd, 4096, 0).decode(errors="replace"))
                os.close(fd)
                raise Locked(path, pid) from None
            except BaseException:
                os.close(fd)
                raise
            # A holder that removes the file on its way out (`remove`) may have unlinked it
            # between our open and our flock: we would then hold a lock on an orphan that the
            # next process, creating a fresh file, does not see. Only a lock on the file that
            # is at `path` now counts.
            try:
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    return cls(path, fd, created)
            except FileNotFoundError:
                pass
            os.close(fd)

    def record(self, text: str) -> None:
        """Replace the file's text with `text` plus this process's pid (what `Locked` reports)."""
        data = f"{text}pid {os.getpid()}\n".encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = -1

    def remove(self) -> None:
        """Delete the file, then release: a process that opened it meanwhile finds it gone."""
        if self.fd >= 0:
            self.path.unlink(missing_ok=True)
        self.release()

    def __enter__(self) -> "FileLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
