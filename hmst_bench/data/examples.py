"""Prompt/completion examples and the batches the trainer draws from them (fine-tuning).

The counterpart of `hmst_bench.data.tokens.TokenData` for an example corpus such as `mbpp-train`,
with the same interface, so the trainer needs no other change. Each example is one row

    BOS prompt completion EOS PAD PAD ...        (seq_len + 1 tokens)

and a batch takes input_ids = row[:-1], labels = row[1:], with IGNORE_INDEX wherever the target
is a prompt token (BOS counts as prompt) or padding: the loss is the completion's and its EOS's.
An example longer than the window is cropped on the right, keeping the prompt; one whose prompt
alone fills the window has no target left and is skipped. Both are counted (`describe`).

As with TokenData, the global batch of an optimiser step is a pure function of (seed, step):
position i of the stream of examples is example perm_e[i mod n] of epoch e = i // n, where
perm_e is a permutation seeded by (seed, e), so every example is seen once per epoch. Step s
takes positions s*G .. s*G+G-1 (G = batch_size * grad_accum * world_size), which ranks and
micro-batches slice exactly as TokenData slices its windows.

Validation: every validation example in order, at most max(1, max_tokens // seq_len) of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hmst_bench.arch import IGNORE_INDEX


@dataclass
class _Rows:
    """The examples of one split laid out for one seq_len."""

    windows: np.ndarray  # [n, seq_len + 1] int64, PAD-filled
    targets: np.ndarray  # [n, seq_len] bool: label position j is trained on
    cropped: int
    skipped: int


@dataclass
class ExampleData:
    """Tokenized examples: `prompts[i]` is BOS + prompt, `completions[i]` completion + EOS."""

    train_prompts: list[np.ndarray]
    train_completions: list[np.ndarray]
    val_prompts: list[np.ndarray]
    val_completions: list[np.ndarray]
    pad_id: int
    _rows: dict = field(default_factory=dict, repr=False)
    _perms: dict = field(default_factory=dict, repr=False)
    _seq_len: int | None = field(default=None, repr=False)

    @property
    def train(self) -> np.ndarray:
        """Every training token, concatenated (what `model.prepare` derives its state from)."""
        return _concat(self.train_prompts, self.train_completions)

    @property
    def val(self) -> np.ndarray:
        return _concat(self.val_prompts, self.val_completions)

    def rows(self, split: str, seq_len: int) -> _Rows:
        key = (split, seq_len)
        if key not in self._rows:
            prompts, completions = ((self.train_prompts, self.train_completions) if split == "train"
                                    else (self.val_prompts, self.val_completions))
            self._rows[key] = _layout(prompts, completions, seq_len, self.pad_id)
        return self._rows[key]

    def check_seq_len(self, seq_len: int) -> None:
        for name, split in (("training", "train"), ("validation", "val")):
            rows = self.rows(split, seq_len)
            if not len(rows.windows):
                raise ValueError(
                    f"every {name} example's prompt fills --seq-len {seq_len}, leaving no completion to train on; "
                    f"use a larger --seq-len"
                )
        self._seq_len = seq_len

    def describe(self) -> dict:
        """Examples kept, cropped and skipped at the seq_len last checked (for run.json)."""
        if self._seq_len is None:
            return {}
        out = {"seq_len": self._seq_len}
        for split in ("train", "val"):
            r = self.rows(split, self._seq_len)
            out[split] = {"examples": len(r.windows), "cropped": r.cropped, "skipped": r.skipped,
                          "target_tokens": int(r.targets.sum())}
        return {"examples": out}

    def _perm(self, seed: int, epoch: int, n: int) -> np.ndarray:
        key = (seed, epoch, n)
        if key not in self._perms:
            if len(self._perms) > 8:
                self._perms.clear()
            self._perms[key] = np.random.default_rng([seed, epoch]).permutation(n)
        return self._perms[key]

    def batch(self, seed: int, step: int, micro: int, rank: int, batch_size: int, seq_len: int,
              grad_accum: int = 1, world_size: int = 1) -> dict:
        """Micro-batch `micro` of rank `rank`: a slice of the step's global batch of
        batch_size * grad_accum * world_size examples."""
        rows = self.rows("train", seq_len)
        n = len(rows.windows)
        first = step * batch_size * grad_accum * world_size + (rank * grad_accum + micro) * batch_size
        picks = [int(self._perm(seed, i // n, n)[i % n]) for i in range(first, first + batch_size)]
        return self._to_batch(rows.windows[picks], rows.targets[picks])

    def val_batches(self, seq_len: int, batch_size: int, max_tokens: int):
        rows = self.rows("val", seq_len)
        n = min(len(rows.windows), max(1, max_tokens // seq_len))
        for i in range(0, n, batch_size):
            j = min(n, i + batch_size)
            yield self._to_batch(rows.windows[i:j], rows.targets[i:j])

    @staticmethod
    def _to_batch(windows: np.ndarray, targets: np.ndarray) -> dict:
        import torch

        windows = torch.from_numpy(np.ascontiguousarray(windows))
        labels = windows[:, 1:].clone()
        labels[~torch.from_numpy(np.ascontiguousarray(targets))] = IGNORE_INDEX
        return {"input_ids": windows[:, :-1].contiguous(), "labels": labels}


def _concat(prompts: list[np.ndarray], completions: list[np.ndarray]) -> np.ndarray:
    pieces = [a for pair in zip(prompts, completions) for a in pair]
    return np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, dtype=np.int32)


def _layout(prompts: list[np.ndarray], completions: list[np.ndarray], seq_len: int, pad_id: int) -> _Rows:
    """Rows of seq_len + 1 tokens; label position j (target row[j + 1]) is trained on when
    row[j + 1] is a completion token or the EOS, not a prompt token or padding."""
    width = seq_len + 1
    kept, marks, cropped, skipped = [], [], 0, 0
    for prompt, completion in zip(prompts, completions):
        if len(prompt) >= width:  # no completion token fits
            skipped += 1
            continue
        full = np.concatenate([prompt, completion])
        if len(full) > width:
            cropped += 1
            full = full[:width]
        row = np.full(width, pad_id, dtype=np.int64)
        row[: len(full)] = full
        target = np.zeros(seq_len, dtype=bool)
        target[len(prompt) - 1 : len(full) - 1] = True
        kept.append(row)
        marks.append(target)
    if not kept:
        return _Rows(np.zeros((0, width), dtype=np.int64), np.zeros((0, seq_len), dtype=bool), cropped, skipped)
    return _Rows(np.stack(kept), np.stack(marks), cropped, skipped)


def encode_examples(pairs_train: list[tuple[str, str]], pairs_val: list[tuple[str, str]], tok) -> ExampleData:
    """Tokenize (prompt, completion) pairs: BOS + prompt and completion + EOS, each encoded on
    its own, so the boundary between what is masked and what is trained on is exact."""
    bos, eos = tok.bos_token_id, tok.eos_token_id
    backend = tok.backend_tokenizer

    def encode(texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in backend.encode_batch(texts, add_special_tokens=False)] if texts else []

    def split(pairs):
        prompts = [np.asarray([bos, *ids], dtype=np.int32) for ids in encode([p for p, _ in pairs])]
        completions = [np.asarray([*ids, eos], dtype=np.int32) for ids in encode([c for _, c in pairs])]
        return prompts, completions

    train_p, train_c = split(list(pairs_train))
    val_p, val_c = split(list(pairs_val))
    return ExampleData(train_p, train_c, val_p, val_c, tok.pad_token_id)
