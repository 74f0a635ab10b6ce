"""Training corpora: what `--corpus` names, read as documents with a deterministic train/val split.

- `stdlib-code`     the running Python's standard library source (tests and site-packages
                    excluded), one document per file, split by a hash of the file's path;
- `synthetic-facts` the seeded fictional knowledge base of `hmst_bench.data.facts`;
- `mbpp-train`      MBPP's train split (tasks 601-974) as (prompt, completion) examples for
                    fine-tuning, validated on MBPP's validation split (511-600); the prompt is
                    exactly the `mbpp` eval suite's and the completion `{code}\n[DONE]`, so
                    `hmst_bench.data.examples` trains on the completion only. It reads the
                    benchmark store (`hmst-bench data import mbpp PATH`);
- `PATH`            a .txt file, a .jsonl file with a "text" field, or a folder of text files;
- `hf:NAME[:CONFIG]` a Hugging Face dataset read in streaming mode (online; also a local
                    dataset folder), capped at `HF_MAX_BYTES` of text.

An example corpus keeps its benchmark's own splits. A split by hash keeps every document on one side, so validation text is never trained on, and
adding a file moves no other file across the split. A corpus with too few documents to split
that way (a single text file such as tiny Shakespeare) gives the last 2% of each document's
lines to validation instead. The fingerprint (hash of every document) names the corpus in
caches and in run.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

EMBEDDED = ("stdlib-code", "synthetic-facts", "mbpp-train")
VAL_PERMILLE = 20  # 2% of documents go to validation
MIN_DOCS_FOR_DOC_SPLIT = 50
TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".jsonl", ".c", ".h", ".js", ".ts", ".html", ".csv", ".tex"}
HF_MAX_BYTES = 200_000_000


class CorpusError(ValueError):
    pass


def _is_val(doc_id: str) -> bool:
    return int(hashlib.sha1(doc_id.encode()).hexdigest()[:8], 16) % 1000 < VAL_PERMILLE


@dataclass
class Corpus:
    name: str
    _read: Callable[[], list[tuple[str, str]]]

    @cached_property
    def documents(self) -> list[tuple[str, str]]:
        docs = [(doc_id, text) for doc_id, text in self._read() if text.strip()]
        if not docs:
            raise CorpusError(f"corpus {self.name!r} holds no text")
        return docs

    @cached_property
    def split(self) -> dict[str, list[str]]:
        docs = self.documents
        train: list[str] = []
        val: list[str] = []
        if len(docs) >= MIN_DOCS_FOR_DOC_SPLIT:
            for doc_id, text in docs:
                (val if _is_val(doc_id) else train).append(text)
            if not val:  # guarantee a validation set
                val.append(train.pop())
        else:
            for _, text in docs:
                lines = text.splitlines(keepends=True)
                cut = max(1, len(lines) - max(1, len(lines) * VAL_PERMILLE // 1000))
                train.append("".join(lines[:cut]))
                if lines[cut:]:
                    val.append("".join(lines[cut:]))
            if not val:
                raise CorpusError(f"corpus {self.name!r} is too small to hold out validation text")
        return {"train": train, "val": val}

    @cached_property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for doc_id, text in self.documents:
            h.update(doc_id.encode() + b"\0" + hashlib.sha256(text.encode()).digest())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "documents": len(self.documents),
            "train_documents": len(self.split["train"]),
            "val_documents": len(self.split["val"]),
            "train_chars": sum(map(len, self.split["train"])),
        }


@dataclass
class ExampleCorpus(Corpus):
    """A corpus of (prompt, completion) examples with fixed train and val splits; `documents`
    (prompt + completion) train a tokenizer, `examples` feed `hmst_bench.data.examples`."""

    _read_examples: Callable[[], dict[str, list[tuple[str, str, str]]]] = None  # split -> (id, prompt, completion)

    @cached_property
    def _examples(self) -> dict[str, list[tuple[str, str, str]]]:
        parts = self._read_examples()
        for split in ("train", "val"):
            if not parts.get(split):
                raise CorpusError(f"corpus {self.name!r} has no {split} examples")
        return parts

    @cached_property
    def examples(self) -> dict[str, list[tuple[str, str]]]:
        return {split: [(p, c) for _, p, c in rows] for split, rows in self._examples.items()}

    @cached_property
    def documents(self) -> list[tuple[str, str]]:
        return [(f"{split}/{i}", p + c) for split, rows in self._examples.items() for i, p, c in rows]

    @cached_property
    def split(self) -> dict[str, list[str]]:
        return {split: [p + c for p, c in pairs] for split, pairs in self.examples.items()}

    @cached_property
    def fingerprint(self) -> str:
        h = hashlib.sha256(b"examples\0")
        for split, rows in self._examples.items():
            for i, p, c in rows:
                h.update(f"{split}/{i}".encode() + b"\0" + hashlib.sha256(p.encode()).digest()
                         + hashlib.sha256(c.encode()).digest())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        return {**super().describe(), "kind": "examples",
                "train_examples": len(self.examples["train"]), "val_examples": len(self.examples["val"])}


# ----------------------------------------------------------------------------- readers


def _stdlib_docs() -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip.intersection(rel.parts[:-1]):
            continue
        try:
            docs.append((rel.as_posix(), path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue  # a handful of stdlib files are deliberately non-UTF-8 test fixtures
    return docs


def _facts_corpus(spec: str) -> "Corpus":
    from hmst_bench.data import facts

    try:
        size = facts.FactsSpec.parse(spec)
    except facts.FactsSpecError as exc:
        raise CorpusError(str(exc)) from None
    return Corpus(size.text, lambda: facts.documents(size=size))


def _mbpp_examples() -> dict[str, list[tuple[str, str, str]]]:
    from hmst_bench.eval import store
    from hmst_bench.eval.code import mbpp_completion, mbpp_prompt

    try:
        return {ours: [(str(r["task_id"]), mbpp_prompt(r), mbpp_completion(r)) for r in store.rows("mbpp", "full", split)]
                for ours, split in (("train", "train"), ("val", "validation"))}
    except store.StoreError as exc:
        raise CorpusError(str(exc)) from None


def _jsonl_docs(path: Path, prefix: str = "") -> list[tuple[str, str]]:
    docs = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise CorpusError(f"{path}:{lineno}: each line needs a string field \"text\"")
            docs.append((f"{prefix}{path.name}:{lineno}", row["text"]))
    return docs


def _file_docs(path: Path, prefix: str = "") -> list[tuple[str, str]]:
    if path.suffix == ".jsonl":
        return _jsonl_docs(path, prefix)
    try:
        return [(f"{prefix}{path.name}", path.read_text(encoding="utf-8"))]
    except UnicodeDecodeError:
        raise CorpusError(f"{path} is not UTF-8 text") from None


def _path_docs(path: Path) -> list[tuple[str, str]]:
    if path.is_file():
        return _file_docs(path)
    docs = []
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES):
        rel = file.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):
            continue
        docs.extend(_file_docs(file, prefix=rel.parent.as_posix() + "/" if rel.parent.parts else ""))
    if not docs:
        raise CorpusError(f"{path} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
    return docs


def _hf_docs(name: str, config: str | None) -> list[tuple[str, str]]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets comes with lm-eval
        raise CorpusError("hf: corpora need the `datasets` package: pip install datasets") from None
    try:
        stream = datasets.load_dataset(name, config, split="train", streaming=True)
    except Exception as exc:
        raise CorpusError(f"cannot open hf:{name}: {str(exc).splitlines()[0]} (is the name right and are you online?)") from None
    docs, size = [], 0
    for i, row in enumerate(stream):
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise CorpusError(f"hf:{name} rows need a string field \"text\"; found {sorted(row)}")
        docs.append((f"{i}", text))
        size += len(text)
        if size >= HF_MAX_BYTES:
            break
    return docs


def load_corpus(spec: str) -> Corpus:
    """Resolve a `--corpus` value (an embedded name, a path or `hf:NAME[:CONFIG]`)."""
    if spec == "stdlib-code":
        return Corpus(spec, _stdlib_docs)
    if spec.partition(":")[0] == "synthetic-facts":
        return _facts_corpus(spec)
    if spec == "mbpp-train":
        return ExampleCorpus(spec, lambda: [], _mbpp_examples)
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        if not name:
            raise CorpusError("hf: corpora are written hf:NAME or hf:NAME:CONFIG")
        return Corpus(spec, lambda: _hf_docs(name, config or None))
    path = Path(os.path.expanduser(spec))
    if not path.exists():
        raise CorpusError(
            f"corpus {spec!r} not found: give a file or folder, hf:NAME, or one of {', '.join(EMBEDDED)}"
        )
    return Corpus(str(path.resolve()), lambda: _path_docs(path))


def python_tag() -> str:
    """The stdlib-code corpus depends on the Python version that provides it."""
    return f"python{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
