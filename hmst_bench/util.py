"""Small shared helpers: atomic file writes, JSON output, the cache/home directory.

Every file the tool writes goes through `atomic_write` (temp file in the same folder, fsync,
rename), so an interrupted process never leaves a half-written run.json, tokenizer or checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def home() -> Path:
    """`$HMST_BENCH_HOME`, default `~/.cache/hmst-bench` (benchmark store and corpus caches)."""
    return Path(os.environ.get("HMST_BENCH_HOME") or Path.home() / ".cache" / "hmst-bench")


@contextlib.contextmanager
def atomic_path(path: os.PathLike | str) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600, and some savers recreate the file
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: os.PathLike | str, data: bytes | str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data.encode() if isinstance(data, str) else data)


def atomic_write_json(path: os.PathLike | str, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_save(path: os.PathLike | str, save: Callable[[str], None]) -> None:
    """Atomically write a file produced by a library saver that takes a filename."""
    with atomic_path(path) as tmp:
        save(str(tmp))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=_json_default, sort_keys=False)


@contextlib.contextmanager
def atomic_dir(path: os.PathLike | str) -> Iterator[Path]:
    """Yield a fresh temp folder beside `path`; on success it replaces `path` (two renames: the
    old folder is moved aside first, so a crash leaves either the old or the new one whole)."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        for file in tmp.rglob("*"):  # library savers (safetensors) may create files as 0600
            if file.is_file():
                os.chmod(file, 0o666 & ~_umask())
        old = path.with_name(f".{path.name}.old")
        if old.exists() and not path.exists():  # an earlier swap was cut between its renames
            os.replace(old, path)
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def unwritable(folder: os.PathLike | str) -> str | None:
    """Why files cannot be created in `folder` (made if missing), or None when they can.

    Commands that compute for minutes check this before starting, so nothing is computed and
    then lost. It is tried for real with a temp file, since permission bits do not bind root
    while a read-only mount, a full disk or a file in the folder's place do."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None
