"""Corpora, splits, the tokenizer and packed batches."""

import json

import numpy as np
import pytest

from hmst_bench.data import facts
from hmst_bench.data.corpora import CorpusError, load_corpus
from hmst_bench.data.tokenizer import load_tokenizer, save_tokenizer, token_byte_lengths, train_tokenizer
from hmst_bench.data.tokens import IGNORE_INDEX, TokenData, encode_corpus


def test_stdlib_code_split_is_by_file_and_deterministic():
    a, b = load_corpus("stdlib-code"), load_corpus("stdlib-code")
    assert a.fingerprint == b.fingerprint
    ids = [doc_id for doc_id, _ in a.documents]
    assert all(i.endswith(".py") and "site-packages" not in i and "/test/" not in f"/{i}" for i in ids)
    train, val = a.split["train"], a.split["val"]
    assert train and val and len(train) + len(val) == len(a.documents)
    assert not set(train) & set(val)  # whole files on one side
    assert 0.005 < len(val) / len(a.documents) < 0.05


def test_synthetic_facts_is_seeded_and_unseen_entities_never_appear():
    assert facts.documents() == facts.documents()
    text = "\n".join(t for _, t in facts.documents())
    kb = facts.knowledge_base()
    unseen_people = [p for p in kb.people if not p.seen]
    unseen_cities = [c for c in kb.cities if not c.seen]
    assert unseen_people and unseen_cities
    assert not any(p.name in text for p in unseen_people)
    assert not any(c.name in text for c in unseen_cities)
    assert all(p.name in text for p in kb.people if p.seen)
    qs = facts.questions()
    assert {q["seen"] for q in qs} == {True, False}
    assert not any(q["question"] in text for q in qs)  # the question set is held out
    a_seen = next(p for p in kb.people if p.seen)
    assert str(a_seen.birth_year) in text and a_seen.birthplace in text


@pytest.mark.parametrize("spec, people, cities, repeat", [
    ("synthetic-facts:entities=200,repeat=10", 200, 40, 10),
    ("synthetic-facts:entities=50", 50, 10, 3),
    ("synthetic-facts:repeat=1", 1200, 240, 1),
])
def test_a_sized_knowledge_base_keeps_unseen_entities_out(spec, people, cities, repeat):
    size = facts.FactsSpec.parse(spec)
    kb = facts.knowledge_base(facts.SEED, size)
    assert (len(kb.people), len(kb.cities), size.repeat) == (people, cities, repeat)
    docs = facts.documents(size=size)
    seen = sum(p.seen for p in kb.people) + sum(c.seen for c in kb.cities)
    assert len(docs) == seen * repeat  # every seen entity, `repeat` renderings each
    text = "\n".join(t for _, t in docs)
    assert not any(p.name in text for p in kb.people if not p.seen)
    assert not any(c.name in text for c in kb.cities if not c.seen)
    assert not any(q["question"] in text for q in facts.questions(size=size))
    names = {p.name for p in kb.people} | {c.name for c in kb.cities}
    assert {q["entity"] for q in facts.questions(size=size)} <= names
    corpus = load_corpus(spec)
    assert corpus.name == size.text and corpus.fingerprint != load_corpus("synthetic-facts").fingerprint


def test_the_default_spec_is_the_original_corpus():
    assert facts.FactsSpec.parse("synthetic-facts") == facts.FactsSpec() == facts.FactsSpec.parse(
        "synthetic-facts:entities=1200,repeat=3")
    assert load_corpus("synthetic-facts:entities=1200,repeat=3").name == "synthetic-facts"
    assert len(facts.documents()) == 3390  # the corpus every earlier run trained on


@pytest.mark.parametrize("bad, needle", [
    ("synthetic-facts:entities=x", "entities must be a whole number"),
    ("synthetic-facts:size=3", "unknown part 'size=3'"),
    ("synthetic-facts:qa=1", "qa in \\[0, 1\\)"),
    ("synthetic-facts:qa=half", "qa must be a fraction"),
    ("synthetic-facts:entities=5", "entities must be 10..100000"),
    ("synthetic-facts:repeat=0", "repeat 1..1000"),
])
def test_bad_facts_specs_are_one_line(bad, needle):
    with pytest.raises(CorpusError, match=needle) as exc:
        load_corpus(bad)
    assert "\n" not in str(exc.value)


def test_text_file_corpus_holds_out_its_tail(tmp_path):
    path = tmp_path / "book.txt"
    lines = [f"line {i}\n" for i in range(1000)]
    path.write_text("".join(lines))
    c = load_corpus(str(path))
    assert c.split["train"] == ["".join(lines[:980])]
    assert c.split["val"] == ["".join(lines[980:])]


def test_jsonl_and_folder_corpora(tmp_path):
    rows = [{"text": f"document number {i} " * 5} for i in range(60)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = load_corpus(str(tmp_path / "d.jsonl"))
    assert len(c.documents) == 60 and len(c.split["val"]) >= 1
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha text")
    (folder / "sub" / "b.md").write_text("beta text")
    (folder / "skip.bin").write_bytes(b"\x00\x01")
    assert sorted(d for d, _ in load_corpus(str(folder)).documents) == ["a.txt", "sub/b.md"]


def test_corpus_errors_name_the_problem(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        load_corpus(str(tmp_path / "missing"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: not valid JSON"):
        load_corpus(str(bad)).documents
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "x"}\n')
    with pytest.raises(CorpusError, match=r"nofield.jsonl:1: .*\"text\""):
        load_corpus(str(nofield)).documents


def test_hf_corpus_reads_a_local_dataset_offline(tmp_path, monkeypatch):
    """The hf: path runs datasets' real streaming loader; a local dataset folder needs no network."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    ds = tmp_path / "localds"
    ds.mkdir()
    (ds / "train.jsonl").write_text("".join(json.dumps({"text": f"row {i} text"}) + "\n" for i in range(80)))
    c = load_corpus(f"hf:{ds}")
    assert [t for _, t in c.documents][:2] == ["row 0 text", "row 1 text"]
    assert len(c.documents) == 80


@pytest.fixture(scope="module")
def small_tok():
    corpus = load_corpus("synthetic-facts")
    return corpus, train_tokenizer(corpus.split["train"], 600, cache_key=corpus.fingerprint)


def test_tokenizer_special_tokens_and_round_trip(small_tok, tmp_path):
    corpus, tok = small_tok
    ids = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}
    assert len(ids) == 3 and len(tok) == 600
    save_tokenizer(tok, tmp_path)
    again = load_tokenizer(tmp_path)
    text = corpus.split["val"][0]
    assert again.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert again.decode(again.encode(text, add_special_tokens=False)) == text
    assert (again.pad_token, again.bos_token, again.eos_token) == (tok.pad_token, tok.bos_token, tok.eos_token)


def test_token_byte_lengths_add_up_to_utf8_bytes(small_tok):
    _, tok = small_tok
    lengths = token_byte_lengths(tok)
    text = "Ünïcode café — 東京 and plain ASCII.\n\tdef f(x): return x"
    ids = tok.encode(text, add_special_tokens=False)
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert lengths[tok.eos_token_id] == 0 and lengths[tok.pad_token_id] == 0


def test_packing_and_batches(small_tok):
    corpus, tok = small_tok
    data = encode_corpus(corpus, tok)
    assert data.train[0] == tok.bos_token_id
    assert (data.train == tok.eos_token_id).sum() == len(corpus.split["train"])  # EOS ends every document
    assert not (data.train == tok.pad_token_id).any()
    b1 = data.batch(seed=3, step=7, micro=0, rank=0, batch_size=4, seq_len=32)
    b2 = data.batch(seed=3, step=7, micro=0, rank=0, batch_size=4, seq_len=32)
    b3 = data.batch(seed=3, step=8, micro=0, rank=0, batch_size=4, seq_len=32)
    assert (b1["input_ids"] == b2["input_ids"]).all() and not (b1["input_ids"] == b3["input_ids"]).all()
    assert (b1["input_ids"][:, 1:] == b1["labels"][:, :-1]).all()  # labels are the next tokens


def test_pad_targets_are_ignored_eos_targets_are_not():
    arr = np.array([1, 5, 6, 2, 0, 0, 1, 7, 2, 1, 8, 2], dtype=np.int32)  # pad 0, bos 1, eos 2
    data = TokenData(train=arr, val=arr, pad_id=0)
    batch = next(data.val_batches(seq_len=5, batch_size=1, max_tokens=5))
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2, 0]]
    assert batch["labels"].tolist() == [[5, 6, 2, IGNORE_INDEX, IGNORE_INDEX]]


def test_global_batch_is_the_same_however_it_is_split(small_tok):
    """8 sequences per step are the same 8 as one batch, as 2 accumulated micro-batches or on 2 ranks."""
    import torch

    corpus, tok = small_tok
    data = encode_corpus(corpus, tok)
    whole = data.batch(seed=1, step=3, micro=0, rank=0, batch_size=8, seq_len=16)["input_ids"]
    micro = torch.cat([data.batch(1, 3, m, 0, 4, 16, grad_accum=2)["input_ids"] for m in range(2)])
    ranks = torch.cat([data.batch(1, 3, 0, r, 4, 16, world_size=2)["input_ids"] for r in range(2)])
    assert torch.equal(whole, micro) and torch.equal(whole, ranks)
