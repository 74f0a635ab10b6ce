"""Reading the files a benchmark is imported from: their sha256s, line numbers for every error,
and the record formats they come in (jsonl, a JSON array, CSV), each record checked on the way."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any, Iterator

from hmst_bench.eval.store.common import RowError, StoreError, check_row


class Sources:
    """Reads input files once, remembering each one's sha256 under its path relative to `base`."""

    def __init__(self, base: Path):
        self.base = base
        self.digests: dict[str, str] = {}

    def read(self, path: Path) -> bytes:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from None
        rel = path.name if path == self.base else path.relative_to(self.base).as_posix()
        self.digests[rel] = hashlib.sha256(data).hexdigest()
        return data

    def text(self, path: Path, encoding: str = "utf-8-sig") -> str:
        data = self.read(path)
        if path.name.endswith(".gz"):
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError) as exc:
                raise StoreError(f"{path}: not a readable gzip file ({exc})") from None
        try:
            return data.decode(encoding)
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise StoreError(f"{path} line {line}: not UTF-8 text") from None


def jsonl(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """(line number, record) for each non-blank line of a jsonl text."""
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            raise StoreError(f"{path} line {n}: invalid JSON ({exc.msg})") from None


_SPACE = re.compile(r"\s*")


def json_array(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """(line number, item) for each item of a JSON array, parsed item by item to know the lines."""
    decoder = json.JSONDecoder()
    counted, line = 0, 1

    def line_at(pos: int) -> int:
        nonlocal counted, line
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    def fail(pos: int, what: str):
        raise StoreError(f"{path} line {line_at(pos)}: invalid JSON ({what})")

    pos = _SPACE.match(text, 0).end()
    if not text.startswith("[", pos):
        fail(pos, "expected a JSON array of records")
    pos = _SPACE.match(text, pos + 1).end()
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            try:
                item, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise StoreError(f"{path} line {exc.lineno}: invalid JSON ({exc.msg})") from None
            yield line_at(pos), item
            pos = _SPACE.match(text, end).end()
            if text.startswith(",", pos):
                pos = _SPACE.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                fail(pos, "expected ',' or ']'")
    if text[pos:].strip():
        fail(_SPACE.match(text, pos).end(), "extra data after the array")


def csv_rows(path: Path, text: str) -> Iterator[tuple[int, list[str]]]:
    """(first line number, cells) for each non-empty CSV record (a record may span lines)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    start = 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise StoreError(f"{path} line {reader.line_num}: bad CSV ({exc})") from None
        line, start = start, reader.line_num + 1
        if cells:
            yield line, cells


def checked(path: Path, line: int, build, schema: dict[str, str]) -> dict:
    try:
        return check_row(build(), schema)
    except RowError as exc:
        raise StoreError(f"{path} line {line}: {exc}") from None


def find_files(path: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """The files called `names` in folder `path`: top level first, else anywhere below it."""
    found = {}
    for name in names:
        top = path / name
        check_link(top)
        if top.is_file():
            found[name] = top
            continue
        deeper = sorted(p for p in path.rglob(name) if p.is_file() and not hidden(p, path))
        if len(deeper) > 1:
            raise StoreError(f"several {name} under {path} ({', '.join(str(p) for p in deeper[:3])}); "
                             "give the folder that holds the one to import")
        if deeper:
            found[name] = deeper[0]
    return found


def check_link(p: Path) -> None:
    """A file we would import that is a dangling symlink or a symlink loop is an error, not a
    silently missing split (is_file() is False for both)."""
    if p.is_symlink() and not p.exists():
        raise StoreError(f"{p} is a symlink loop or points to nothing; replace it with the real file")


def hidden(p: Path, base: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(base).parts)


def checked_records(path: Path, text: str, schema: dict[str, str], array: bool = False) -> list[tuple[int, dict]]:
    """(line number, checked row) for each record of a jsonl text, or of a JSON array."""
    items = json_array(path, text) if array else jsonl(path, text)
    return [(line, checked(path, line, lambda: record, schema)) for line, record in items]
