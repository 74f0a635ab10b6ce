"""HMST stage 2's long documents: stdlib-code crops and synthetic-facts recall, TokenData's interface."""

from __future__ import annotations

import re

import pytest
import torch

from hmst_bench.arch import IGNORE_INDEX
from hmst_bench.data.corpora import load_corpus
from hmst_bench.data.tokenizer import train_tokenizer
from hmst_bench_hmst.longdocs import LongDocs

DOC = 256
QA = re.compile(r" Question: what is the locker number of ([A-Za-z]+ [A-Za-z]+)\? Answer: (\d{5})$")


@pytest.fixture(scope="module")
def tok(bench_home):
    # module-scoped fixtures run before the autouse HMST_BENCH_HOME one, so point it there here
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HMST_BENCH_HOME", str(bench_home))
        corpus = load_corpus("synthetic-facts")
        yield train_tokenizer(corpus.split["train"], 600, cache_key=corpus.fingerprint)


@pytest.fixture(scope="module")
def mixed(tok, bench_home):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HMST_BENCH_HOME", str(bench_home))
        return LongDocs(tok, DOC, recall_fraction=0.5)


@pytest.fixture(scope="module")
def code_text():
    split = load_corpus("stdlib-code").split
    return {s: "\0".join(split[s]) for s in ("train", "val")}


def _decode(tok, ids) -> str:
    return tok.backend_tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def _piece(batch, row) -> list[int]:
    """The whole document of a row: the inputs plus the last label (never PAD here)."""
    return batch["input_ids"][row].tolist() + [int(batch["labels"][row, -1])]


def _check_recall(tok, ids) -> None:
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.bos_token_id not in ids[1:] and tok.eos_token_id not in ids[:-1]
    text = _decode(tok, ids[1:-1])
    m = QA.search(text)
    assert m, text[-200:]
    name, answer = m.groups()
    filler = text[: m.start()]
    needles = dict(re.findall(r"The locker number of ([A-Za-z]+ [A-Za-z]+) is (\d{5})\.", filler))
    assert len(needles) == 4 and needles[name] == answer  # the answer is the queried needle's


def _is_recall(tok, ids) -> bool:
    return ids[-1] == tok.eos_token_id and QA.search(_decode(tok, ids[1:-1])) is not None


def _check_code(tok, ids, text: str) -> None:
    if ids[0] == tok.bos_token_id:
        ids = ids[1:]
    if ids[-1] == tok.eos_token_id:
        ids = ids[:-1]
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids  # one file, never two
    decoded = tok.backend_tokenizer.decode(ids)
    # a crop may cut a multi-byte character at either end; the rest is verbatim file text
    longest = max(decoded.split("\ufffd"), key=len)
    assert len(longest) > DOC // 4 and longest in text


def test_shapes_exact_length_and_shifted_labels(mixed):
    b = mixed.batch(seed=0, step=1, micro=0, rank=0, batch_size=4, seq_len=64)
    assert set(b) == {"input_ids", "labels"}
    for k in ("input_ids", "labels"):
        assert b[k].dtype == torch.long and tuple(b[k].shape) == (4, DOC)
    assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])
    assert not (b["labels"] == IGNORE_INDEX).any()  # documents are exact, nothing is padded


def test_batches_are_a_pure_function_of_seed_and_step(mixed):
    a = mixed.batch(3, 7, 0, 0, 4, 64)["input_ids"]
    assert torch.equal(a, mixed.batch(3, 7, 0, 0, 4, 64)["input_ids"])
    assert not torch.equal(a, mixed.batch(3, 8, 0, 0, 4, 64)["input_ids"])
    assert not torch.equal(a, mixed.batch(4, 7, 0, 0, 4, 64)["input_ids"])


def test_global_batch_is_the_same_however_it_is_split(mixed):
    whole = mixed.batch(1, 3, 0, 0, 8, 64)["input_ids"]
    micro = torch.cat([mixed.batch(1, 3, m, 0, 4, 64, grad_accum=2)["input_ids"] for m in range(2)])
    ranks = torch.cat([mixed.batch(1, 3, 0, r, 4, 64, world_size=2)["input_ids"] for r in range(2)])
    assert torch.equal(whole, micro) and torch.equal(whole, ranks)


def test_mixed_documents_are_recall_or_code_crops(tok, mixed, code_text):
    b = mixed.batch(5, 2, 0, 0, 16, 64)
    kinds = []
    for row in range(16):
        ids = _piece(b, row)
        kinds.append(_is_recall(tok, ids))
        if kinds[-1]:
            _check_recall(tok, ids)
        else:
            _check_code(tok, ids, code_text["train"])
    assert 0 < sum(kinds) < 16


def test_recall_only_documents_answer_from_their_own_needles(tok):
    data = LongDocs(tok, DOC, recall_fraction=1.0)
    assert data.describe()["code_files"] == {"train": 0, "val": 0}  # code is never loaded
    for step in range(3):
        b = data.batch(0, step, 0, 0, 8, 64)
        for row in range(8):
            _check_recall(tok, _piece(b, row))


def test_code_only_documents_are_crops_of_stdlib_files(tok, code_text):
    data = LongDocs(tok, DOC, recall_fraction=0.0)
    b = data.batch(2, 0, 0, 0, 8, 64)
    for row in range(8):
        ids = _piece(b, row)
        assert not _is_recall(tok, ids)
        _check_code(tok, ids, code_text["train"])
    for vb in data.val_batches(64, 4, 4 * DOC):
        for row in range(len(vb["input_ids"])):
            _check_code(tok, _piece(vb, row), code_text["val"])


def test_validation_documents_are_fixed_and_counted(tok, mixed):
    def run(max_tokens, batch_size=3):
        return [b["input_ids"] for b in mixed.val_batches(64, batch_size, max_tokens)]

    first, again = run(7 * DOC + 5), run(7 * DOC + 5)
    assert [len(x) for x in first] == [3, 3, 1]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert sum(len(x) for x in run(10)) == 1  # at least one document
    docs = [_piece(b, r) for b in mixed.val_batches(64, 8, 8 * DOC) for r in range(len(b["input_ids"]))]
    kinds = [_is_recall(tok, d) for d in docs]
    assert sum(kinds) == 4  # recall and code interleave at recall_fraction
    for d, k in zip(docs, kinds):
        if k:
            _check_recall(tok, d)
    # validation and training documents differ
    assert not torch.equal(first[0], mixed.batch(0, 0, 0, 0, 3, 64)["input_ids"])


def test_describe_is_json(mixed):
    import json

    d = json.loads(json.dumps(mixed.describe()))
    assert d["kind"] == "long-documents" and d["doc_tokens"] == DOC and d["recall_fraction"] == 0.5
    assert d["code_files"]["train"] > 0 and d["code_files"]["val"] > 0


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_bad_recall_fraction_is_refused(tok, fraction):
    with pytest.raises(ValueError, match="recall_fraction"):
        LongDocs(tok, DOC, recall_fraction=fraction)


def test_too_long_for_any_code_file_names_the_fix(tok):
    with pytest.raises(ValueError, match=r"no stdlib-code file .* has 10000001 tokens; lower memory_segments or --seq-len"):
        LongDocs(tok, 10_000_000, recall_fraction=0.5)
    LongDocs(tok, 10_000_000 // 1000, recall_fraction=1.0).check_seq_len(64)  # recall alone needs no code file


def test_too_short_for_recall_names_the_fix(tok):
    with pytest.raises(ValueError, match="raise memory_segments or --seq-len"):
        LongDocs(tok, 40, recall_fraction=0.5)
