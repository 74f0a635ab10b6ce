"""Fine-tuning: prompt/completion batches (`hmst_bench.data.examples`) with the prompt masked by
hand, cropping and skipping, batches as a pure function of (seed, step), epochs; the `mbpp-train`
prompts against lm-eval's own rendering of the `mbpp` suite; and through the CLI, pretraining then
`train --init-from R1 --corpus mbpp-train`, its exact resume, and the one-line refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import SHARED_DATA, run_cli, store_home
from hmst_bench.arch import IGNORE_INDEX
from hmst_bench.data.examples import ExampleData

BOS, EOS, PAD = 1, 2, 0
X = IGNORE_INDEX


def _data(train, val=None) -> ExampleData:
    """ExampleData from token lists: each example is (prompt ids, completion ids), no BOS/EOS."""
    def split(pairs):
        return ([np.asarray([BOS, *p], dtype=np.int32) for p, _ in pairs],
                [np.asarray([*c, EOS], dtype=np.int32) for _, c in pairs])

    tp, tc = split(train)
    vp, vc = split(val if val is not None else train)
    return ExampleData(tp, tc, vp, vc, PAD)


def test_labels_train_on_the_completion_and_its_eos_only():
    data = _data([([10, 11], [20, 21])])
    b = data.batch(seed=0, step=0, micro=0, rank=0, batch_size=1, seq_len=8)
    # row: BOS 10 11 20 21 EOS PAD PAD PAD (seq_len + 1 = 9 tokens)
    assert b["input_ids"].tolist() == [[BOS, 10, 11, 20, 21, EOS, PAD, PAD]]
    # targets 10 11 (prompt) | 20 21 EOS (completion) | PAD PAD PAD
    assert b["labels"].tolist() == [[X, X, 20, 21, EOS, X, X, X]]
    assert data.train.tolist() == [BOS, 10, 11, 20, 21, EOS]


def test_long_examples_are_cropped_and_full_prompts_skipped():
    data = _data([([10, 11], [20, 21, 22]),   # 7 tokens > 5: cropped to BOS 10 11 20 21
                  ([10, 11, 12, 13], [20]),   # BOS + prompt = 5 tokens: no target fits, skipped
                  ([10, 11, 12, 13, 14], [20]),  # longer still: skipped
                  ([10, 11, 12], [20])])      # BOS 10 11 12 20 exactly fills the window: one target
    data.check_seq_len(4)
    rows = data.rows("train", 4)
    assert (rows.cropped, rows.skipped) == (2, 2)
    b = data.batch(0, 0, 0, 0, batch_size=2, seq_len=4)
    got = sorted(zip(b["input_ids"].tolist(), b["labels"].tolist()))
    assert got == [([BOS, 10, 11, 12], [X, X, X, 20]), ([BOS, 10, 11, 20], [X, X, 20, 21])]
    assert data.describe()["examples"]["train"] == {"examples": 2, "cropped": 2, "skipped": 2, "target_tokens": 3}
    with pytest.raises(ValueError, match="larger --seq-len"):
        _data([([10, 11, 12], [20])]).check_seq_len(3)
    # validation: every kept example in order, capped at max(1, max_tokens // seq_len) of them
    batches = list(data.val_batches(seq_len=4, batch_size=1, max_tokens=100))
    assert [v["input_ids"].tolist()[0] for v in batches] == [[BOS, 10, 11, 20], [BOS, 10, 11, 12]]
    assert len(list(data.val_batches(seq_len=4, batch_size=8, max_tokens=4))) == 1


def _numbered(n: int) -> ExampleData:
    return _data([([10 + i % 3], [100 + i]) for i in range(n)])  # example i has completion token 100 + i


def test_batches_are_a_function_of_seed_and_step_and_split_exactly():
    data = _numbered(11)
    whole = data.batch(seed=5, step=3, micro=0, rank=0, batch_size=4, seq_len=6)
    again = _numbered(11).batch(seed=5, step=3, micro=0, rank=0, batch_size=4, seq_len=6)
    for key in ("input_ids", "labels"):
        assert whole[key].tolist() == again[key].tolist()
        # two accumulated micro-batches, or two ranks, hold the same four examples in the same order
        micros = [data.batch(5, 3, m, 0, 2, 6, grad_accum=2)[key].tolist() for m in (0, 1)]
        ranks = [data.batch(5, 3, 0, r, 2, 6, world_size=2)[key].tolist() for r in (0, 1)]
        assert micros[0] + micros[1] == whole[key].tolist() == ranks[0] + ranks[1]
    other = data.batch(seed=6, step=3, micro=0, rank=0, batch_size=4, seq_len=6)
    assert other["input_ids"].tolist() != whole["input_ids"].tolist()


def test_each_epoch_sees_every_example_once():
    n, bs = 7, 3
    data = _numbered(n)
    seen = []
    for step in range(n):  # 21 examples: three epochs
        b = data.batch(seed=1, step=step, micro=0, rank=0, batch_size=bs, seq_len=6)
        seen += [row[2] - 100 for row in b["input_ids"].tolist()]  # BOS, prompt token, completion token
    epochs = [seen[i : i + n] for i in range(0, len(seen), n)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert epochs[0] != epochs[1]  # a new permutation each epoch


def test_encode_examples_masks_exactly_the_prompt_tokens():
    from hmst_bench.data.examples import encode_examples
    from hmst_bench.data.tokenizer import train_tokenizer

    pairs = [("Write f. [BEGIN]\n", "def f(): return 1\n[DONE]"), ("Write g. [BEGIN]\n", "def g(): pass\n[DONE]")]
    tok = train_tokenizer([p + c for p, c in pairs] * 20, 300)
    data = encode_examples(pairs, pairs[:1], tok)
    b = data.batch(0, 0, 0, 0, batch_size=2, seq_len=48)
    for labels in b["labels"].tolist():
        trained = [t for t in labels if t != X]
        assert trained[-1] == tok.eos_token_id
        assert tok.decode(trained[:-1]) in {c for _, c in pairs}
    assert len(data.val_prompts) == 1


# ----------------------------------------------------------------------------- mbpp-train

needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data (HMST_BENCH_SHARED_DATA)")


@pytest.fixture(scope="module")
def mbpp_home(tmp_path_factory):
    return store_home(tmp_path_factory.mktemp("mbpp-home"), "mbpp")


@needs_data
def test_mbpp_train_prompts_are_the_eval_suites(mbpp_home, monkeypatch):
    """The fine-tuning prompt and completion are what lm-eval renders for the `mbpp` suite."""
    import hmst_bench_suites
    from lm_eval.tasks import TaskManager

    from hmst_bench.data.corpora import load_corpus
    from hmst_bench.eval.code import mbpp_completion, mbpp_fewshot, mbpp_prompt

    monkeypatch.setenv("HMST_BENCH_HOME", str(mbpp_home))
    manager = TaskManager(include_path=str(hmst_bench_suites.HERE / "mbpp"), include_defaults=False)
    task = manager.load(["mbpp"])["tasks"]["mbpp"]
    corpus = load_corpus("mbpp-train")
    for split, ours in (("train", "train"), ("validation", "val")):
        docs = list(task.dataset[split])
        assert len(docs) == len(corpus.examples[ours])
        for doc, (prompt, completion) in list(zip(docs, corpus.examples[ours]))[:5]:
            assert prompt == task.doc_to_text(doc) == mbpp_prompt(doc)
            assert completion == task.doc_to_target({**doc, "is_fewshot": True}) == mbpp_completion(doc)
    # the whole 3-shot context of a test problem is our prompt + completion per shot, then our prompt
    task.set_fewshot_seed(seed=1234)
    task.build_all_requests(limit=2, rank=0, world_size=1)
    shots = "".join(mbpp_prompt(s) + mbpp_completion(s) + "\n\n" for s in mbpp_fewshot())
    for inst in task.instances:
        assert inst.arguments[0] == shots + mbpp_prompt(inst.doc)
    assert corpus.describe()["train_examples"] == 374 and corpus.describe()["val_examples"] == 90


def test_mbpp_train_without_the_store_names_the_import(tmp_path):
    proc = run_cli("train", "--arch", "dense-llama", "--size", "micro", "--corpus", "mbpp-train", "--budget", "1e9",
                   "--out", str(tmp_path / "R"), env={"HMST_BENCH_HOME": str(tmp_path / "empty")}, check=False)
    assert proc.returncode != 0
    assert "hmst-bench data import mbpp PATH" in proc.stderr and "hmst-bench data pull mbpp" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "R").exists()


FINETUNE = ("--corpus", "mbpp-train", "--budget", "8e9", "--save-every", "2")


@pytest.fixture(scope="module")
def runs(mbpp_home, tmp_path_factory):
    """R1 pretrained on stdlib-code, R2 fine-tuned from it on mbpp-train."""
    root = tmp_path_factory.mktemp("ft-runs")
    env = {"HMST_BENCH_HOME": str(mbpp_home)}
    run_cli("train", "--arch", "dense-llama", "--size", "micro", "--corpus", "stdlib-code", "--budget", "5e9",
            "--out", str(root / "R1"), env=env)
    info = json.loads(run_cli("train", "--init-from", str(root / "R1"), *FINETUNE, "--out", str(root / "R2"), "--json",
                              env=env).stdout)
    return root, info


@needs_data
def test_init_from_fine_tunes_a_finished_run(runs, mbpp_home, monkeypatch):
    import torch

    from hmst_bench.data.corpora import load_corpus
    from hmst_bench.data.tokens import encode_corpus
    from hmst_bench.train.rundir import load_run

    root, info = runs
    r1 = json.loads((root / "R1" / "run.json").read_text())
    assert info["status"] == "complete" and info["arch"] == "dense-llama" and info["size"] == "micro"
    assert info["init_from"] == {"run": str((root / "R1").resolve()), "arch": "dense-llama", "config_hash": r1["config_hash"],
                                 "achieved_flops": r1["achieved_flops"], "corpus_spec": "stdlib-code"}
    assert info["config_hash"] == r1["config_hash"] and info["tokenizer"]["hash"] == r1["tokenizer"]["hash"]
    # the budget and achieved FLOPs are the fine-tune's own
    assert 8e9 <= info["achieved_flops"] < 8e9 + info["flops_per_step"]
    ex = info["corpus"]["examples"]
    assert info["corpus"]["kind"] == "examples" and ex["seq_len"] == 128
    assert ex["train"]["examples"] + ex["train"]["skipped"] == 374 and ex["train"]["examples"] > 0

    # step 1's loss is R1's loss on the fine-tune's first batch: it started from R1's weights
    monkeypatch.setenv("HMST_BENCH_HOME", str(mbpp_home))
    r1_run = load_run(root / "R1")
    data = encode_corpus(load_corpus("mbpp-train"), r1_run.tokenizer)
    with torch.no_grad():
        loss, _ = r1_run.model.loss(data.batch(0, 0, 0, 0, batch_size=8, seq_len=128))
    first = next(json.loads(line) for line in (root / "R2" / "metrics.jsonl").read_text().splitlines())
    assert first["kind"] == "train" and first["step"] == 1
    assert first["loss"] == pytest.approx(float(loss), abs=1e-5)


@needs_data
def test_resume_of_a_fine_tune_is_exact(runs, mbpp_home, monkeypatch, tmp_path):
    from hmst_bench.train.loop import TrainSettings, train

    root, full = runs
    monkeypatch.setenv("HMST_BENCH_HOME", str(mbpp_home))
    settings = TrainSettings(init_from=root / "R1", corpus="mbpp-train", budget="8e9", save_every=2, out=tmp_path / "B")

    def interrupt_at_step_2(ctx):  # what the SIGINT handler does: finish the step, checkpoint, stop
        if ctx.step == 2:
            ctx.stop_signal = "SIGINT"

    assert train(settings, progress=interrupt_at_step_2)["status"] == "interrupted"
    resumed = train(TrainSettings(out=tmp_path / "B", resume=True))
    assert resumed["status"] == "complete" and resumed["init_from"] == full["init_from"]
    for key in ("final_train_loss", "val_loss", "steps", "achieved_flops"):
        assert resumed[key] == full[key], key

    # killed before its first checkpoint: a resume starts over from R1's weights
    early = tmp_path / "early"
    early.mkdir()
    for path in [root / "R2" / "run.json", *(root / "R2").glob("*token*.json")]:  # what a start writes first
        shutil.copy(path, early / path.name)
    info = json.loads((early / "run.json").read_text())
    (early / "run.json").write_text(json.dumps({**info, "status": "running"}))
    again = train(TrainSettings(out=early, resume=True))
    assert again["final_train_loss"] == full["final_train_loss"] and again["val_loss"] == full["val_loss"]


@needs_data
def test_init_from_refusals_are_one_line(runs, mbpp_home, tmp_path):
    root, _ = runs
    env = {"HMST_BENCH_HOME": str(mbpp_home)}
    r1 = root / "R1"
    unfinished = tmp_path / "unfinished"
    shutil.copytree(r1, unfinished)
    info = json.loads((unfinished / "run.json").read_text())
    (unfinished / "run.json").write_text(json.dumps({**info, "status": "interrupted"}))
    cases = [
        (("--init-from", str(r1), "--resume"), "--init-from starts a new run"),
        (("--init-from", str(r1), "--tokenizer", str(r1)), "drop --tokenizer"),
        (("--init-from", str(r1), "--arch", "dense-gpt2"), "drop --arch dense-gpt2"),
        (("--init-from", str(r1), "--size", "tiny"), "drop --size tiny"),
        (("--init-from", str(unfinished)), "not complete"),
        (("--init-from", str(tmp_path)), "is not a run directory"),
        (("--init-from", str(r1), "--out", str(root / "R2")), "already holds a run"),
    ]
    for args, match in cases:
        out = ("--out", str(tmp_path / "never")) if "--out" not in args else ()
        proc = run_cli("train", *args, *FINETUNE, *out, env=env, check=False)
        assert proc.returncode != 0 and match in proc.stderr, (args, proc.stderr)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
        assert "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr
        assert not (tmp_path / "never").exists()
