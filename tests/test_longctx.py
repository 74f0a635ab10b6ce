"""The `longctx` suite: documents generated for a window and tokenizer (needle placement,
candidates, determinism, prompt lengths, needle-in-window fractions) and `hmst-bench eval
--suite longctx` end to end on a dense micro run."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from hmst_bench.eval import longctx as L


class CharTokenizer:
    """One token per character: lengths and positions can be checked by hand."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("longctx") / "run"
    run_cli("train", "--arch", "dense-llama", "--size", "micro", "--budget", "3e10", "--corpus", "synthetic-facts",
            "--seq-len", "64", "--out", str(out))
    return out


@pytest.fixture(scope="module")
def tokenizer(run):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(run / "tokenizer.json"))


@pytest.mark.parametrize("family", L.FAMILIES)
@pytest.mark.parametrize("length", (1, 4))
def test_document_by_hand(family, length):
    tok, window = CharTokenizer(), 128
    doc = L.make_document(family, length, 3, window, tok)
    prompt, value = doc["prompt"], doc["value"]
    # the answer: exactly once in the prompt, where the document says the needle is
    assert prompt.count(value) == 1
    needle = f"{doc['key']}: {value}\n" if family == "kv" else f"The pass key is {value}."
    assert prompt[doc["needle_char"]:].startswith(needle)
    assert doc["needle_token"] == doc["needle_char"]  # one token per character
    assert doc["needle_depth"] == round(doc["needle_char"] / len(prompt), 4)
    if family == "kv":
        assert prompt.startswith("People and their codes:\n") and prompt.endswith(f"\nThe code of {doc['key']} is")
        lines = prompt.split("\n")[1:-2]
        assert len(lines) == doc["pairs"] and len({line.split(": ")[0] for line in lines}) == len(lines)
        listed = {line.split(": ")[1] for line in lines}
        # distractors are the other keys' values while the list has enough of them
        assert sum(c in listed for c in doc["choices"]) == min(len(listed), L.N_CHOICES)
    else:
        assert prompt.startswith("Find the pass key.") and prompt.endswith("\nWhat is the pass key? The pass key is")
        filler = prompt[len("Find the pass key."):-len("\nWhat is the pass key? The pass key is")].replace(" " + needle, "")
        expected = "".join(" " + L._FILLER[i % len(L._FILLER)] for i in range(filler.count(".")))
        assert filler == expected
    # candidates: ten distinct five-digit values, the answer once, at the gold index
    choices = doc["choices"]
    assert len(choices) == L.N_CHOICES == len(set(choices))
    assert choices.count(value) == 1 and choices[doc["answer"]] == value
    assert all(len(c) == 5 and c.isdigit() for c in choices)
    # length: never over the target, at most the tolerance under it
    target = L.target_tokens(length, window, len(" " + value))
    assert doc["target_tokens"] == target and target - L.tolerance(doc) <= len(prompt) == doc["prompt_tokens"] <= target
    # deterministic for a seed, different for another
    assert L.make_document(family, length, 3, window, tok) == doc
    assert L.make_document(family, length, 3, window, tok, seed=1)["prompt"] != prompt


def test_lengths_and_needle_fraction_for_a_tokenizer(tokenizer):
    window = 64
    for family in L.FAMILIES:
        for length in L.LENGTHS:
            docs = L.documents(family, length, window, tokenizer, n_docs=40)
            for d in docs:
                measured = len(tokenizer.encode(d["prompt"], add_special_tokens=False))
                assert measured == d["prompt_tokens"]
                assert d["target_tokens"] - L.tolerance(d) <= measured <= d["target_tokens"]
                assert d["target_tokens"] == length * window - len(tokenizer.encode(" " + d["value"])) + 1
            inside = sum(d["needle_in_window"] for d in docs) / len(docs)
            if length == 1:
                assert inside == 1.0
            if length == 16:
                assert inside <= 0.2, (family, inside)
    # the adapter's view (hmst_bench.eval.lm keeps the last window + 1 tokens of prompt and
    # answer): a needle marked outside is not among the tokens a dense model reads
    for d in L.documents("passkey", 16, window, tokenizer, n_docs=20):
        ids = tokenizer.encode(d["prompt"] + " " + d["value"], add_special_tokens=False)
        seen = tokenizer.decode(ids[-(window + 1):-1])
        assert (f"pass key is {d['value']}" in seen) == d["needle_in_window"]


def test_dataset_needs_the_window_and_tokenizer(run):
    with pytest.raises(L.LongctxError, match="hmst-bench eval --suite longctx"):
        L.lm_eval_dataset(family="kv", length=1, n_docs=2)
    with L.context(128, CharTokenizer()):
        ds = L.lm_eval_dataset(family="passkey", length=4, n_docs=3, version=1.0)
    assert ds["test"].num_rows == 3 and ds["test"][0]["window"] == 128
    ds = L.lm_eval_dataset(family="kv", length=1, n_docs=2, window=64, tokenizer=str(run / "tokenizer.json"))
    assert ds["test"][1]["window"] == 64
    with pytest.raises(L.LongctxError, match="window of at least 64 tokens"):
        L.make_document("kv", 1, 0, 16, CharTokenizer())


def test_eval_end_to_end(run):
    proc = run_cli("eval", "--run", str(run), "--suite", "longctx", "--limit", "8")
    record = json.loads((run / "eval" / "longctx.json").read_text())
    assert record["suite"] == "longctx" and set(L.TASKS) <= set(record["results"])
    assert "longctx" in record["groups"]
    info = record["longctx"]
    assert info["window"] == 64 and info["chance"] == 1 / L.N_CHOICES
    assert set(info["tasks"]) == set(L.TASKS)
    for task, row in info["tasks"].items():
        assert row["n"] == 8 and 0.0 <= row["acc"] <= 1.0 and 0.0 <= row["acc_norm"] <= 1.0
        assert 0.0 <= row["needle_in_window"] <= 1.0
        assert row["prompt_tokens"]["max"] <= row["target_tokens"]["max"]
        assert row["length"] * 64 - 20 <= row["prompt_tokens"]["mean"] <= row["length"] * 64
    assert info["tasks"]["longctx_kv_1x"]["needle_in_window"] == 1.0
    # the logged prompts are shortened, the documents' provenance kept
    sample = record["samples"]["longctx_passkey_16x"][0]
    assert sample["doc"]["prompt"].startswith("[") and sample["doc"]["prompt"].endswith("The pass key is")
    assert len(sample["arguments"][0][0]) < 300 and "needle_depth" in sample["doc"]
    assert "longctx_kv_16x" in proc.stderr + proc.stdout


def test_bad_suite_is_one_line(run):
    proc = run_cli("eval", "--run", str(run), "--suite", "longctxx", check=False)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr
    assert "unknown suite 'longctxx'" in lines[0] and "longctx" in lines[0]
