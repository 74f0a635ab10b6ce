"""HMST stage 2's data: documents longer than the attention window, for training the memory.

`LongDocs` has the interface of `hmst_bench.data.tokens.TokenData` (`check_seq_len`, `batch`,
`val_batches`, `describe`), so once a stage runner sets `ctx.data = LongDocs(...)` the trainer's
`ctx.batches(step)` and `ctx.validate()` work unchanged. Every document is exactly
`doc_tokens + 1` tokens (the model reads `doc_tokens`, the labels are the next tokens), whatever
`seq_len` the interface passes; a stage runner picks `doc_tokens` as several attention windows.

Two kinds of document are mixed; each document of a step is a recall document with probability
`recall_fraction`, else a code document:

- code: a random crop of `doc_tokens + 1` tokens from one file of the `stdlib-code` corpus (its
  packed `BOS text EOS` arrays split back into files; files too short for a crop are dropped);
- recall: synthetic long-context recall built from `synthetic-facts`. Filler is sentences of the
  facts documents (train or val split exactly as the corpus splits them); `n_needles` needle
  sentences "The locker number of NAME is DDDDD." sit at uniformly random depths in it, NAME a
  person of the knowledge base and DDDDD five digits drawn per document; the document ends with
  " Question: what is the locker number of NAME? Answer: DDDDD" and EOS for one needle chosen at
  random. The digits exist only in that document, so the answer can only come from the context.

Determinism and sharding follow TokenData: the global batch of a step is a pure function of
(seed, step). One generator seeded by (seed, step, RNG_SALT) draws, for each of the
batch_size * grad_accum * world_size documents, its kind and a sub-seed that alone builds it;
rank r's micro-batch m is the slice starting at (r * grad_accum + m) * batch_size. So 8 documents
are the same 8 whether they come as one batch, two micro-batches or two ranks.

Validation: fixed documents (fixed seed) from the validation splits, max(1, max_tokens //
doc_tokens) of them, recall documents interleaved at the rate `recall_fraction`.
"""

from __future__ import annotations

import re

import numpy as np

from hmst_bench.data.tokens import windows_to_batch

RNG_SALT = 0x10D0C5  # keeps these draws apart from TokenData's default_rng([seed, step])
VAL_SEED = 20260501  # the fixed validation documents
N_NEEDLES = 4
CODE_CORPUS = "stdlib-code"
NEEDLE = " The locker number of {name} is {digits}."
QUESTION = " Question: what is the locker number of {name}? Answer: {digits}"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_SPLITS = ("train", "val")
_SPLIT_NAMES = {"train": "training", "val": "validation"}


def _files(packed: np.ndarray, bos: int) -> list[np.ndarray]:
    """Split a packed `BOS text EOS BOS text EOS ...` array back into its documents."""
    starts = np.flatnonzero(packed == bos)
    if len(starts) == 0:
        return [packed] if len(packed) else []
    return [f for f in np.split(packed, starts[1:]) if len(f)]


class _Sentences:
    """Filler sentences of one split, tokenised once: a flat id array plus offsets."""

    def __init__(self, tok, texts: list[str]):
        sentences = [s for text in texts for s in _SENTENCE_END.split(text.strip()) if s]
        encoded = tok.backend_tokenizer.encode_batch([" " + s for s in sentences], add_special_tokens=False)
        lengths = np.asarray([len(e.ids) for e in encoded], dtype=np.int64)
        keep = lengths > 0
        self.lengths = lengths[keep]
        self.ids = np.concatenate([np.asarray(e.ids, dtype=np.int64) for e, k in zip(encoded, keep) if k])
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        self.min_len = int(self.lengths.min())

    def __len__(self) -> int:
        return len(self.lengths)

    def piece(self, i: int, n: int | None = None) -> np.ndarray:
        length = self.lengths[i] if n is None else n
        return self.ids[self.offsets[i] : self.offsets[i] + length]


class LongDocs:
    """Long training documents (stdlib-code crops and synthetic-facts recall) for HMST stage 2."""

    def __init__(self, tokenizer, doc_tokens: int, recall_fraction: float = 0.5, n_needles: int = N_NEEDLES):
        if not 0.0 <= float(recall_fraction) <= 1.0:
            raise ValueError(f"recall_fraction must lie in [0, 1], not {recall_fraction}")
        if int(doc_tokens) < 1:
            raise ValueError(f"doc_tokens must be at least 1, not {doc_tokens}")
        if int(n_needles) < 1:
            raise ValueError(f"n_needles must be at least 1, not {n_needles}")
        self.tok = tokenizer
        self.doc_tokens = int(doc_tokens)
        self.recall_fraction = float(recall_fraction)
        self.n_needles = int(n_needles)
        self.pad_id = tokenizer.pad_token_id
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self._code: dict[str, list[np.ndarray]] = {s: [] for s in _SPLITS}
        self._code_total: dict[str, int] = {s: 0 for s in _SPLITS}
        self._code_corpus: dict = {}
        self._filler: dict[str, _Sentences] = {}
        self._names: list[str] = []
        if self.recall_fraction < 1.0:
            self._load_code()
        if self.recall_fraction > 0.0:
            self._load_recall()
        self._validate()

    # ------------------------------------------------------------------ preparation

    @property
    def length(self) -> int:
        """Tokens per sampled document: doc_tokens inputs plus one for the last label."""
        return self.doc_tokens + 1

    def _load_code(self) -> None:
        from hmst_bench.data.corpora import load_corpus
        from hmst_bench.data.tokens import encode_corpus

        corpus = load_corpus(CODE_CORPUS)
        data = encode_corpus(corpus, self.tok)
        self._code_corpus = {"name": corpus.name, "fingerprint": corpus.fingerprint}
        for split, packed in (("train", data.train), ("val", data.val)):
            files = _files(np.asarray(packed), self.bos_id)
            self._code_total[split] = len(files)
            self._code[split] = [f for f in files if len(f) >= self.length]

    def _load_recall(self) -> None:
        from hmst_bench.data import facts
        from hmst_bench.data.corpora import _is_val

        docs = facts.documents()
        for split in _SPLITS:
            texts = [text for doc_id, text in docs if _is_val(doc_id) == (split == "val")]
            self._filler[split] = _Sentences(self.tok, texts)
        self._names = [p.name for p in facts.knowledge_base().people]
        self._recall_overhead = self._recall_bound()

    def _recall_bound(self) -> int:
        """An upper bound on the non-filler tokens of a recall document (BOS, needles, question,
        answer, EOS). The byte-level pre-tokenizer splits before " DDDDD" and ".", so a needle's
        tokens are its name part's plus at most 6 for the digits plus the period's."""
        backend = self.tok.backend_tokenizer
        enc = lambda texts: [len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)]  # noqa: E731
        needle = max(enc([NEEDLE.split(" {digits}")[0].format(name=n) for n in self._names])) + 6 + enc(["."])[0]
        question = max(enc([QUESTION.split(" {digits}")[0].format(name=n) for n in self._names])) + 6
        return 1 + self.n_needles * needle + question + 1

    def _validate(self) -> None:
        if self.recall_fraction < 1.0:
            for split in _SPLITS:
                if not self._code[split]:
                    raise ValueError(
                        f"no {CODE_CORPUS} file in the {_SPLIT_NAMES[split]} split has {self.length} tokens; "
                        f"lower memory_segments or --seq-len (or use recall_fraction 1)"
                    )
        if self.recall_fraction > 0.0 and self.length < self._recall_overhead:
            raise ValueError(
                f"recall documents need at least {self._recall_overhead} tokens for {self.n_needles} needles "
                f"and the question, but a document has {self.length}; raise memory_segments or --seq-len, "
                f"or use recall_fraction 0"
            )

    def check_seq_len(self, seq_len: int) -> None:
        """The document length is doc_tokens whatever seq_len is; this re-checks that the
        documents can be built at all (the constructor already refused impossible settings)."""
        if int(seq_len) < 1:
            raise ValueError(f"--seq-len must be at least 1, not {seq_len}")
        self._validate()

    # ------------------------------------------------------------------ documents

    def _code_doc(self, split: str, rng: np.random.Generator) -> np.ndarray:
        files = self._code[split]
        f = files[int(rng.integers(len(files)))]
        start = int(rng.integers(0, len(f) - self.length + 1))
        return f[start : start + self.length].astype(np.int64)

    def _recall_doc(self, split: str, rng: np.random.Generator) -> np.ndarray:
        filler = self._filler[split]
        who = rng.choice(len(self._names), size=self.n_needles, replace=False)
        names = [self._names[int(i)] for i in who]
        digits = [f"{int(d):05d}" for d in rng.integers(0, 100_000, size=self.n_needles)]
        asked = int(rng.integers(self.n_needles))
        texts = [NEEDLE.format(name=n, digits=d) for n, d in zip(names, digits)]
        texts.append(QUESTION.format(name=names[asked], digits=digits[asked]))
        encoded = [np.asarray(e.ids, dtype=np.int64)
                   for e in self.tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
        needles, question = encoded[:-1], encoded[-1]
        budget = self.length - 2 - len(question) - sum(len(n) for n in needles)
        if budget < 0:  # the constructor's bound makes this unreachable
            raise ValueError(f"a recall document does not fit in {self.length} tokens; raise memory_segments or --seq-len")

        # Filler: random sentences until the budget is met, the last one cut to fit.
        pieces: list[np.ndarray] = []
        if budget > 0:
            picks = rng.integers(len(filler), size=budget // filler.min_len + 1)
            ends = np.cumsum(filler.lengths[picks])
            m = int(np.searchsorted(ends, budget)) + 1  # the first m sentences reach the budget
            pieces = [filler.piece(int(i)) for i in picks[: m - 1]]
            pieces.append(filler.piece(int(picks[m - 1]), budget - (int(ends[m - 2]) if m > 1 else 0)))
        # Needles: a uniform token depth in the filler each, moved back to the start of its sentence.
        starts = np.concatenate([[0], np.cumsum([len(p) for p in pieces])[:-1]]) if pieces else np.zeros(1, dtype=np.int64)
        depths = rng.integers(0, max(budget, 1), size=self.n_needles)
        before = np.searchsorted(starts, depths, side="right") - 1  # needle k goes before piece before[k]
        body: list[np.ndarray] = [np.asarray([self.bos_id], dtype=np.int64)]
        for i in range(max(len(pieces), 1)):
            body.extend(needles[k] for k in range(self.n_needles) if before[k] == i)
            if i < len(pieces):
                body.append(pieces[i])
        body.extend([question, np.asarray([self.eos_id], dtype=np.int64)])
        doc = np.concatenate(body)
        assert len(doc) == self.length, (len(doc), self.length)
        return doc

    def _document(self, split: str, recall: bool, sub_seed: int) -> np.ndarray:
        rng = np.random.default_rng([int(sub_seed), RNG_SALT])
        return self._recall_doc(split, rng) if recall else self._code_doc(split, rng)

    # ------------------------------------------------------------------ the TokenData interface

    def batch(self, seed: int, step: int, micro: int, rank: int, batch_size: int, seq_len: int,
              grad_accum: int = 1, world_size: int = 1) -> dict:
        """Micro-batch `micro` of rank `rank`: a slice of the step's global batch of
        batch_size * grad_accum * world_size documents of doc_tokens (seq_len is not used)."""
        import torch

        rng = np.random.default_rng([seed, step, RNG_SALT])
        n = batch_size * grad_accum * world_size
        recall = rng.random(n) < self.recall_fraction
        sub_seeds = rng.integers(0, 2**63 - 1, size=n, dtype=np.int64)
        first = (rank * grad_accum + micro) * batch_size
        docs = [self._document("train", bool(recall[i]), int(sub_seeds[i])) for i in range(first, first + batch_size)]
        return self._to_batch(torch.from_numpy(np.stack(docs)))

    def val_documents(self, max_tokens: int) -> np.ndarray:
        """The fixed validation documents, [max(1, max_tokens // doc_tokens), doc_tokens + 1]."""
        n = max(1, int(max_tokens) // self.doc_tokens)
        rng = np.random.default_rng([VAL_SEED, RNG_SALT])
        sub_seeds = rng.integers(0, 2**63 - 1, size=n, dtype=np.int64)
        f = self.recall_fraction
        # document i is a recall document when the running count i * f steps past an integer,
        # so the two kinds interleave evenly at the rate f
        kinds = [int(np.floor((i + 1) * f + 1e-9)) > int(np.floor(i * f + 1e-9)) for i in range(n)]
        return np.stack([self._document("val", kinds[i], int(sub_seeds[i])) for i in range(n)])

    def val_batches(self, seq_len: int, batch_size: int, max_tokens: int):
        import torch

        docs = torch.from_numpy(self.val_documents(max_tokens))
        for i in range(0, len(docs), batch_size):
            yield self._to_batch(docs[i : i + batch_size])

    def _to_batch(self, docs) -> dict:
        return windows_to_batch(docs, self.pad_id)

    def describe(self) -> dict:
        return {
            "kind": "long-documents",
            "doc_tokens": self.doc_tokens,
            "recall_fraction": self.recall_fraction,
            "n_needles": self.n_needles if self.recall_fraction > 0 else 0,
            "code_corpus": self._code_corpus or None,
            "code_files": {s: len(self._code[s]) for s in _SPLITS},
            "code_files_total": dict(self._code_total),
            "filler_sentences": {s: len(self._filler[s]) for s in self._filler},
            "val_seed": VAL_SEED,
        }

