"""The `longctx` suite's documents and results: key-value and passkey recall at 1x, 4x and 16x
the evaluated model's attention window.

Documents are generated here, deterministically from a seed, for the window and tokenizer of
the run being evaluated: `hmst-bench eval` sets them with `context(window, tokenizer)` before
lm-eval builds the tasks, and the tasks' `custom_dataset` (`lm_eval_dataset`) reads them. Each
prompt is measured with that tokenizer and filled to `target_tokens(length, window, answer)`:
N x window minus the answer's tokens, so that at 1x prompt and answer fill exactly the window
the lm-eval adapter keeps (`hmst_bench.eval.lm`: the last `window + 1` tokens of prompt and
answer, the final one never input; a memory model such as HMST gets the whole prompt). A needle (the queried pair, or the pass key) sits at a
seeded uniform depth, so at 1x it is always visible, at 4x about a quarter of the time and at
16x about one time in sixteen; each document records whether it lies in the last window.

Scoring is lm-eval `multiple_choice` over `N_CHOICES` five-digit values (the answer and, for
key-value, values of other keys in the same list): chance is 1 / N_CHOICES. `postprocess` adds
the per-length table and provenance (window, lengths achieved, needle-in-window fraction) to
RUN/eval/longctx.json and shortens the logged prompts (they are reproducible from the seed).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator, Optional

SEED = 20260707
N_DOCS = 100  # documents per task (family x length)
N_CHOICES = 10
LENGTHS = (1, 4, 16)  # multiples of the attention window
FAMILIES = ("kv", "passkey")
TASKS = tuple(f"longctx_{f}_{n}x" for f in FAMILIES for n in LENGTHS)
LOGGED_TAIL = 200  # characters of each prompt kept in the result file's sample log

_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
           "There and back again.")
_KV_HEADER = "People and their codes:\n"  # short: the fixed text must fit a 64-token window
_PASSKEY_HEADER = "Find the pass key."


class LongctxError(ValueError):
    """The longctx documents cannot be built; the message is one line naming the fix."""


@dataclass(frozen=True)
class _Context:
    window: int
    tokenizer: Any


_current: Optional[_Context] = None


@contextlib.contextmanager
def context(window: int, tokenizer: Any) -> Iterator[None]:
    """The evaluated model's attention window (tokens) and tokenizer, for the tasks built inside."""
    global _current
    previous, _current = _current, _Context(int(window), tokenizer)
    try:
        yield
    finally:
        _current = previous


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _encode_many(tokenizer: Any, texts: list[str]) -> list[int]:
    """Token counts of many texts (one batched call for a fast tokenizer)."""
    if not texts:
        return []
    if callable(tokenizer):
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return [len(_encode(tokenizer, t)) for t in texts]


def target_tokens(length: int, window: int, answer_tokens: int) -> int:
    """The prompt length aimed at: length x window less what the answer adds beyond one token,
    so that at 1x the whole prompt is inside the window the adapter scores with."""
    return length * window - answer_tokens + 1


def tolerance(doc: dict) -> int:
    """How much shorter than its target a prompt may be (it is never longer): the prompt is the
    longest of whole filler pieces that fits, so it falls short by less than one piece (a
    key-value line or a filler sentence, as measured alone) plus one merge at each of its ends."""
    return doc["piece_tokens"] + 2


@lru_cache(maxsize=1)
def _names() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from hmst_bench.data.facts import knowledge_base

    people = knowledge_base().people
    given = sorted({p.name.split(" ")[0] for p in people})
    family = sorted({p.name.split(" ")[-1] for p in people})
    return tuple(given), tuple(family)


def _value(rng: random.Random, taken: set[str]) -> str:
    while True:
        v = str(rng.randint(10000, 99999))
        if v not in taken:
            taken.add(v)
            return v


class _Pieces:
    """The filler of one document, made on demand: (text, tokens) pieces; kv keeps its pairs."""

    def __init__(self, family: str, rng: random.Random, tokenizer: Any, needle_key: str, taken: set[str]):
        self.family, self.rng, self.tokenizer = family, rng, tokenizer
        self.texts: list[str] = []
        self.tokens: list[int] = []
        self.values: list[str] = []
        self.keys = {needle_key}
        self.taken = taken

    def grow(self, n: int) -> None:
        new = []
        for _ in range(n):
            if self.family == "passkey":
                new.append(" " + _FILLER[(len(self.texts) + len(new)) % len(_FILLER)])
                continue
            given, family = _names()
            while True:
                key = f"{self.rng.choice(given)} {self.rng.choice(family)}"
                if key not in self.keys:
                    self.keys.add(key)
                    break
            value = _value(self.rng, self.taken)
            self.values.append(value)
            new.append(f"{key}: {value}\n")
        self.texts += new
        self.tokens += _encode_many(self.tokenizer, new)


def make_document(family: str, length: int, index: int, window: int, tokenizer: Any, seed: int = SEED) -> dict:
    """Document `index` of task longctx_<family>_<length>x for this window and tokenizer."""
    if family not in FAMILIES:
        raise LongctxError(f"unknown longctx family {family!r}; known: {', '.join(FAMILIES)}")
    rng = random.Random(f"{seed}-{family}-{length}-{index}")
    taken: set[str] = set()
    answer = _value(rng, taken)
    if family == "kv":
        given, surnames = _names()
        key = f"{rng.choice(given)} {rng.choice(surnames)}"
        header, needle = _KV_HEADER, f"{key}: {answer}\n"
        question = f"\nThe code of {key} is"
    else:
        key = "pass key"
        header, needle = _PASSKEY_HEADER, f" The pass key is {answer}."
        question = "\nWhat is the pass key? The pass key is"
    pieces = _Pieces(family, rng, tokenizer, key, taken)
    depth = rng.random()  # where the needle goes among the filler pieces
    # candidates: for kv, values of other keys in the list first; then fresh values
    def candidates() -> list[str]:
        others = list(pieces.values)
        rng_c = random.Random(f"{seed}-{family}-{length}-{index}-choices")
        rng_c.shuffle(others)
        chosen = others[: N_CHOICES - 1]
        while len(chosen) < N_CHOICES - 1:
            chosen.append(_value(rng_c, taken))
        out = chosen + [answer]
        rng_c.shuffle(out)
        return out

    answer_tokens = len(_encode(tokenizer, " " + answer))
    target = target_tokens(length, window, answer_tokens)
    fixed = len(_encode(tokenizer, header + needle + question))
    if fixed > target:
        raise LongctxError(f"a {window}-token window cannot hold a longctx prompt ({fixed} tokens without filler); "
                           "evaluate longctx on a model with a window of at least 64 tokens")

    def build(n: int) -> tuple[str, int]:
        at = round(depth * n)
        body = pieces.texts[:at] + [needle] + pieces.texts[at:n]
        prefix = header + "".join(body[:at])
        return header + "".join(body) + question, len(prefix)

    # choose n pieces from summed piece counts, then correct on the measured prompt
    n, total = 0, fixed
    while True:
        if n == len(pieces.texts):
            pieces.grow(max(16, (target - total) // max(1, min(pieces.tokens or [8])) + 1))
        if total + pieces.tokens[n] > target:
            break
        total += pieces.tokens[n]
        n += 1
    def measure(n: int) -> tuple[str, int, int]:
        text, at = build(n)
        return text, at, len(_encode(tokenizer, text))

    prompt, needle_char, measured = measure(n)
    while measured > target and n > 0:  # piece boundaries merged differently: drop pieces
        n -= 1
        prompt, needle_char, measured = measure(n)
    while True:  # the longest prompt of whole pieces within the target
        if n + 1 > len(pieces.texts):
            pieces.grow(16)
        longer = measure(n + 1)
        if longer[2] > target:
            break
        n += 1
        prompt, needle_char, measured = longer
    if measured > target:
        raise LongctxError(f"could not fit a longctx prompt in {target} tokens; report this with the tokenizer used")
    if family == "kv":
        del pieces.values[n:]  # only the pairs in the list are distractors
    choices = candidates()
    needle_char += 1 if needle.startswith(" ") else 0  # where the needle's words begin
    needle_token = len(_encode(tokenizer, prompt[:needle_char]))
    max_answer = max(len(_encode(tokenizer, " " + c)) for c in choices)
    visible = max(0, window + 1 - max_answer)  # prompt tokens the adapter keeps, for the longest choice
    return {
        "doc_id": index,
        "family": family,
        "length": length,
        "prompt": prompt,
        "choices": choices,
        "answer": choices.index(answer),
        "value": answer,
        "key": key,
        "window": window,
        "target_tokens": target,
        "prompt_tokens": measured,
        "needle_char": needle_char,
        "needle_token": needle_token,
        "needle_depth": round(needle_token / measured, 4),
        "needle_in_window": needle_token >= measured - visible,
        "pairs": n + 1 if family == "kv" else 0,
        "piece_tokens": max(pieces.tokens[: n + 1]),
    }


def documents(family: str, length: int, window: int, tokenizer: Any, n_docs: int = N_DOCS,
              seed: int = SEED) -> list[dict]:
    return [make_document(family, length, i, window, tokenizer, seed) for i in range(n_docs)]


def _tokenizer_from(path: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(path))


def lm_eval_dataset(family: str = "kv", length: int = 1, window: Optional[int] = None, tokenizer: Optional[str] = None,
                    n_docs: int = N_DOCS, seed: int = SEED, **_ignored) -> Any:
    """The `custom_dataset` hook: the `test` split of one task, for the window and tokenizer set
    by `context` (hmst-bench eval) or given as metadata (`window`, `tokenizer`: a tokenizer.json)."""
    import datasets

    if window is not None and tokenizer is not None:
        ctx = _Context(int(window), _tokenizer_from(tokenizer))
    elif _current is not None:
        ctx = _current
    else:
        raise LongctxError("the longctx tasks need the evaluated model's window and tokenizer: run them with "
                           "`hmst-bench eval --suite longctx`, or pass --metadata "
                           "'{\"window\": N, \"tokenizer\": \"RUN/tokenizer.json\"}'")
    docs = documents(family, int(length), ctx.window, ctx.tokenizer, int(n_docs), int(seed))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


# ----------------------------------------------------------------------------- results


def _task_docs(record: dict) -> dict[str, list[dict]]:
    out = {}
    for task, rows in (record.get("samples") or {}).items():
        if task in TASKS:
            seen = {}
            for s in rows:
                seen.setdefault(s["doc_id"], s)
            out[task] = [seen[k] for k in sorted(seen)]
    return out


def _shorten(text: str) -> str:
    if len(text) <= LOGGED_TAIL:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return f"[{len(text)} characters, sha256 {digest}...] " + text[-LOGGED_TAIL:]


def postprocess(record: dict, lm: Any, out_dir) -> dict:
    """Per task (family x length): accuracy, chance, prompt lengths achieved against the target,
    and the fraction of needles in the last window; the logged prompts shortened."""
    tasks = _task_docs(record)
    if not tasks:
        return {}
    table = {}
    for task in TASKS:
        samples = tasks.get(task)
        if not samples:
            continue
        docs = [s["doc"] for s in samples]
        achieved = [d["prompt_tokens"] for d in docs]
        res = (record.get("results") or {}).get(task, {})
        table[task] = {
            "family": docs[0]["family"],
            "length": docs[0]["length"],
            "n": len(docs),
            "acc": res.get("acc,none"),
            "acc_norm": res.get("acc_norm,none"),
            "chance": 1 / N_CHOICES,
            "target_tokens": {"min": min(d["target_tokens"] for d in docs), "max": max(d["target_tokens"] for d in docs)},
            "prompt_tokens": {"min": min(achieved), "mean": round(sum(achieved) / len(achieved), 1), "max": max(achieved)},
            "needle_in_window": round(sum(bool(d["needle_in_window"]) for d in docs) / len(docs), 4),
        }
    for samples in (record.get("samples") or {}).values():
        for s in samples:
            if s.get("doc", {}).get("family") not in FAMILIES or "prompt" not in s["doc"]:
                continue
            s["doc"]["prompt"] = _shorten(s["doc"]["prompt"])
            s["arguments"] = [[_shorten(a[0]), *a[1:]] if isinstance(a, (list, tuple)) and a else a
                              for a in s.get("arguments") or []]
    window = getattr(lm, "max_length", None)
    return {"window": window, "seed": SEED, "n_choices": N_CHOICES, "chance": 1 / N_CHOICES,
            "tokenizer_vocab": len(lm.tokenizer) if getattr(lm, "tokenizer", None) is not None else None,
            "logged_prompts": f"shortened to their last {LOGGED_TAIL} characters (regenerate with "
                              "hmst_bench.eval.longctx.documents)",
            "tasks": table}


def summary_rows(record: dict) -> list[dict]:
    """Rows per length: acc and the needle-in-window fraction (task, metric, filter, n_shot, value, stderr, n)."""
    out = []
    results = record.get("results") or {}
    for task, row in (record.get("longctx") or {}).get("tasks", {}).items():
        for metric in ("acc", "acc_norm"):
            if row.get(metric) is not None:
                stderr = (results.get(task) or {}).get(f"{metric}_stderr,none")
                out.append({"task": task, "metric": metric, "filter": "none", "n_shot": 0, "value": row[metric],
                            "stderr": stderr if isinstance(stderr, (int, float)) else None, "n": row["n"]})
        out.append({"task": task, "metric": "needle_in_window", "filter": "none", "n_shot": 0,
                    "value": row["needle_in_window"], "stderr": None, "n": row["n"]})
    return out
