"""The byte-level BPE tokenizer every run trains (or reuses with `--tokenizer RUN_DIR`).

Trained with Hugging Face `tokenizers` on the corpus's training split, with three distinct
special tokens: PAD (ignored by the loss, never in packed training data), BOS (starts every
document) and EOS (ends every document, so models learn to stop). Saved into the run with
`save_pretrained`, so `PreTrainedTokenizerFast.from_pretrained(RUN)` and `AutoTokenizer`
load it with the special tokens known.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from hmst_bench.util import atomic_save, home

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
MAX_TRAIN_CHARS = 40_000_000  # enough text for a stable merge table; bounds training time


class TokenizerError(ValueError):
    pass


def _wrap(tokenizer_object):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer_object, pad_token=PAD, bos_token=BOS, eos_token=EOS)


def train_tokenizer(texts: list[str], vocab_size: int, cache_key: str | None = None):
    """Train (or fetch from the cache) a byte-level BPE with `vocab_size` entries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    cache = home() / "cache" / "tokenizers" / f"{cache_key}-v{vocab_size}.json" if cache_key else None
    if cache is not None and cache.exists():
        return _wrap(Tokenizer.from_file(str(cache)))
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise TokenizerError(f"vocab_size {vocab_size} is below the 259 a byte-level tokenizer needs")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def bounded():
        used = 0
        for text in texts:
            if used >= MAX_TRAIN_CHARS:
                return
            used += len(text)
            yield text

    tok.train_from_iterator(bounded(), trainer=trainer)
    if cache is not None:
        atomic_save(cache, tok.save)
    return _wrap(tok)


def load_tokenizer(path: str | Path):
    """Load the tokenizer saved in a run directory."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").exists():
        raise TokenizerError(f"{path} has no tokenizer.json (is it a run directory?)")
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    check_special_tokens(tok)
    return tok


def check_special_tokens(tok) -> None:
    ids = [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id]
    if None in ids or len(set(ids)) != 3:
        raise TokenizerError("the tokenizer needs distinct PAD, BOS and EOS tokens")


def save_tokenizer(tok, run_dir: str | Path) -> None:
    """save_pretrained into a temp folder, then move each file into place atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".tok-") as tmp:
        tok.save_pretrained(tmp)
        for name in Path(tmp).iterdir():
            shutil.move(str(name), run_dir / name.name)


def tokenizer_hash(tok) -> str:
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def token_byte_lengths(tok):
    """UTF-8 bytes each token id stands for (0 for special tokens), for bits-per-byte.

    In a byte-level BPE every character of a token's string is one of 256 stand-ins for one
    byte, so a token's byte length is its string length."""
    import numpy as np
    from tokenizers import pre_tokenizers

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    special = set(tok.all_special_ids)
    lengths = np.zeros(len(tok), dtype=np.int64)
    for token, idx in tok.get_vocab().items():
        if idx in special:
            continue
        if not alphabet.issuperset(token):
            raise TokenizerError(f"token {token!r} is not byte-level; bits-per-byte needs a byte-level BPE")
        lengths[idx] = len(token)
    return lengths
