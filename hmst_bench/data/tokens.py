"""Packed token streams and the batches the trainer draws from them.

Each document becomes `BOS text EOS`; documents are concatenated (nanoGPT-style packing) into
one int32 array per split, cached on disk by (corpus fingerprint, tokenizer hash). The global
batch of an optimiser step is a pure function of (seed, step): random windows of `seq_len + 1`
tokens, which ranks and micro-batches then slice. So the data position of a run is just its step
counter, a resumed run sees exactly the batches an uninterrupted one would, and 8 sequences per
step are the same 8 whether they come as one batch, two accumulated micro-batches or two ranks.

Validation uses fixed, non-overlapping windows from the start of the validation split.
An example corpus is not packed: see `hmst_bench.data.examples`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hmst_bench.arch import IGNORE_INDEX
from hmst_bench.util import atomic_save, home



@dataclass
class TokenData:
    train: np.ndarray
    val: np.ndarray
    pad_id: int

    def check_seq_len(self, seq_len: int) -> None:
        for name, arr in (("training", self.train), ("validation", self.val)):
            if len(arr) < seq_len + 2:
                raise ValueError(
                    f"the {name} split has {len(arr)} tokens, too few for --seq-len {seq_len}; "
                    f"use a larger corpus or a smaller --seq-len"
                )

    def batch(self, seed: int, step: int, micro: int, rank: int, batch_size: int, seq_len: int,
              grad_accum: int = 1, world_size: int = 1) -> dict:
        """Micro-batch `micro` of rank `rank`: a slice of the step's global batch of
        batch_size * grad_accum * world_size windows."""
        import torch

        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, len(self.train) - seq_len - 1, size=batch_size * grad_accum * world_size)
        first = (rank * grad_accum + micro) * batch_size
        starts = starts[first : first + batch_size]
        windows = np.stack([self.train[s : s + seq_len + 1] for s in starts]).astype(np.int64)
        return self._to_batch(torch.from_numpy(windows))

    def val_windows(self, seq_len: int, max_tokens: int) -> np.ndarray:
        n = min((len(self.val) - 1) // seq_len, max(1, max_tokens // seq_len))
        return np.stack([self.val[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)]).astype(np.int64)

    def val_batches(self, seq_len: int, batch_size: int, max_tokens: int):
        import torch

        windows = torch.from_numpy(self.val_windows(seq_len, max_tokens))
        for i in range(0, len(windows), batch_size):
            yield self._to_batch(windows[i : i + batch_size])

    def _to_batch(self, windows) -> dict:
        return windows_to_batch(windows, self.pad_id)


def windows_to_batch(windows, pad_id: int) -> dict:
    """Windows [B, T + 1] (a torch tensor) -> inputs [B, T] and next-token labels, PAD ignored."""
    labels = windows[:, 1:].clone()
    labels[labels == pad_id] = IGNORE_INDEX  # only PAD is ignored; EOS is a target
    return {"input_ids": windows[:, :-1].contiguous(), "labels": labels}


def _encode(tok, texts: list[str]) -> np.ndarray:
    bos, eos = tok.bos_token_id, tok.eos_token_id
    pieces = []
    backend = tok.backend_tokenizer
    for i in range(0, len(texts), 256):
        for enc in backend.encode_batch(texts[i : i + 256], add_special_tokens=False):
            pieces.append(np.asarray([bos, *enc.ids, eos], dtype=np.int32))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a file object, so numpy does not append ".npy" to the temp name
        np.save(fh, array)


def encode_corpus(corpus, tok):
    """Tokenize both splits of `corpus` with `tok`, reusing the on-disk cache when present.
    An example corpus (`mbpp-train`) gives `hmst_bench.data.examples.ExampleData` instead,
    encoded afresh (a few hundred short examples take well under a second)."""
    from hmst_bench.data.tokenizer import tokenizer_hash

    if hasattr(corpus, "examples"):
        from hmst_bench.data.examples import encode_examples

        return encode_examples(corpus.examples["train"], corpus.examples["val"], tok)

    cache_dir = home() / "cache" / "tokens"
    arrays = {}
    for split in ("train", "val"):
        path = cache_dir / f"{corpus.fingerprint}-{tokenizer_hash(tok)}-{split}.npy"
        if path.exists():
            arrays[split] = np.load(path)
        else:
            arrays[split] = _encode(tok, corpus.split[split])
            atomic_save(path, lambda p, a=arrays[split]: _save_npy(p, a))
    return TokenData(arrays["train"], arrays["val"], tok.pad_token_id)
