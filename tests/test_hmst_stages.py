"""HMST trained in two stages, end to end through the CLI.

- stage 1 (`--arch hmst`, memory off) then `--stage 2 --out R` in the same folder: run.json of
  stage 2 (its own budget, FLOPs, tokens of whole long documents, the stage-data description,
  stage 1's record kept exactly under "stages", memory on in the config, metrics rows of stage 2);
- stage 2's FLOPs per step, measured again by hand on its first batch (counter + the memory's
  `extra_flops`), equal what the trainer charged;
- an interrupted stage 2 resumed through the CLI ends exactly where the uninterrupted one did;
- refusals: a stage that does not come after the folder's, an unknown stage, and stage 2 with
  `--set memory=false` (one line each, non-zero exit, the folder left byte for byte as it was);
- `eval --suite longctx` of the stage-2 HMST run and of a dense run at the same budget: window 64
  for both, context 64 for dense and 64 * memory_max_segments for HMST, the per-length table;
- the lm-eval adapter scores an HMST stage-2 model over the whole context (through its memory),
  exactly as the model's own `token_logprobs` does over the uncropped sequence.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from types import SimpleNamespace

import pytest
import torch

from conftest import run_cli

S1_BUDGET = "1e10"  # 10 stage-1 steps at micro / seq 64
S2_BUDGET = "1.5e10"  # 4 stage-2 steps: one step is ~4.17e9 FLOPs (8 documents of 4 windows of 64)
SAVE_EVERY = "2"
EVAL_EVERY = "1000"  # validate only at the end (4 steps would otherwise validate every step: slow)
STAGE1 = ("--arch", "hmst", "--size", "micro", "--corpus", "synthetic-facts", "--seq-len", "64", "--budget", S1_BUDGET)


def _env(home) -> dict:
    return {"HMST_BENCH_HOME": str(home)}


def _info(run) -> dict:
    return json.loads((run / "run.json").read_text())


def _snapshot(run) -> dict:
    """Every file of a run folder, by relative path, as bytes."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def staged(bench_home, tmp_path_factory):
    """Stage 1 in A, a pristine copy of it in S1 (still at stage 1), then stage 2 in A."""
    root = tmp_path_factory.mktemp("stages")
    a, s1 = root / "A", root / "S1"
    run_cli("train", *STAGE1, "--out", str(a), env=_env(bench_home))
    stage1 = _info(a)
    shutil.copytree(a, s1)
    run_cli("train", "--stage", "2", "--out", str(a), "--budget", S2_BUDGET, "--save-every", SAVE_EVERY,
            "--eval-every", EVAL_EVERY, env=_env(bench_home))
    return SimpleNamespace(a=a, s1=s1, stage1=stage1, stage2=_info(a))


def _copy_stage1(staged, dst):
    shutil.copytree(staged.s1, dst)
    return dst


# ============================================================================== stage 1 -> stage 2


def test_stage2_run_json(staged):
    s1, s2 = staged.stage1, staged.stage2
    assert s1["status"] == "complete" and s1["stage"] == "1" and s1["config"]["memory"] is False
    assert s2["status"] == "complete" and s2["stage"] == "2" and s2["config"]["memory"] is True
    # stage 1's record kept exactly as its own run.json had it
    kept = s2["stages"]["1"]
    assert set(s2["stages"]) == {"1"}
    for key in ("achieved_flops", "steps", "tokens", "budget", "budget_flops", "flops_per_step", "final_train_loss",
                "val_loss", "config_hash", "status"):
        assert kept[key] == s1[key], key
    assert kept["stage"] == "1" and kept["status"] == "complete"
    # stage 2's own budget and accounting
    assert s2["budget"] == S2_BUDGET and s2["budget_flops"] == float(S2_BUDGET)
    assert s2["achieved_flops"] >= s2["budget_flops"]
    rows = [json.loads(line) for line in (staged.a / "metrics.jsonl").read_text().splitlines()]
    s2_train = [r for r in rows if r.get("stage") == "2" and r["kind"] == "train"]
    # every step costs the first step's measured FLOPs plus its searches of the growing long-term store
    last = s2_train[-1]
    assert last["step"] == s2["steps"] and last["longterm_entries"] > 0 and last["longterm_flops_total"] > 0
    assert s2["achieved_flops"] == s2["steps"] * s2["flops_per_step"] + last["longterm_flops_total"]
    assert s2["achieved_flops"] - s2["flops_per_step"] - last["longterm_search_flops"] < s2["budget_flops"]  # stopped at the first step past it
    assert s2["steps"] >= 2 and s2["steps"] == s2["planned_steps"]
    cfg, tr = s2["config"], s2["training"]
    doc_tokens = cfg["memory_segments"] * tr["seq_len"]
    assert tr["seq_len"] == cfg["max_seq_len"] == 64
    assert s2["tokens"] == s2["steps"] * tr["batch_size"] * tr["grad_accum"] * doc_tokens  # whole long documents
    assert s2["flops_per_token"] == s2["achieved_flops"] / s2["tokens"]
    assert s2["stage_data"]["kind"] == "long-documents" and s2["stage_data"]["doc_tokens"] == doc_tokens
    assert s2["stage_data"]["recall_fraction"] == cfg["recall_fraction"]
    assert s2["params_total"] > s1["params_total"]  # the memory's modules
    assert s2["config_hash"] != s1["config_hash"]
    assert math.isfinite(s2["val_loss"]) and math.isfinite(s2["final_train_loss"])
    assert s2_train and max(r["step"] for r in s2_train) == s2["steps"]
    assert [r["step"] for r in rows if r.get("stage") == "1" and r["kind"] == "train"][-1] == s1["steps"]


def test_stage2_flops_per_step_include_the_memory(staged):
    """The trainer measured forward+backward of its first batch plus model.extra_flops; the same
    measurement on the loaded stage-2 model and step 0's batch gives the same number (FLOPs
    depend on shapes only: MoE dispatch is always top_k per token, the memory's extra analytic)."""
    from hmst_bench.budget import count_flops
    from hmst_bench.train.rundir import load_run
    from hmst_bench_hmst.longdocs import LongDocs

    info = staged.stage2
    run = load_run(staged.a)
    model = run.model.train()
    model.longterm = None  # step 0 read an empty long-term store; later steps' searches are charged apart
    cfg, tr = model.config, info["training"]
    data = LongDocs(run.tokenizer, cfg.memory_segments * cfg.max_seq_len, cfg.recall_fraction)
    batch = data.batch(tr["seed"], 0, 0, 0, tr["batch_size"], tr["seq_len"], tr["grad_accum"], 1)
    assert batch["input_ids"].shape == (tr["batch_size"], info["stage_data"]["doc_tokens"])

    def step():
        loss, _ = model.loss(batch)
        loss.backward()

    _, counted = count_flops(step)
    extra = model.extra_flops(batch)
    assert extra > 0
    assert counted + extra == info["flops_per_step"]
    # and stage 1's step (one window per row) is far cheaper than stage 2's (4 windows per row + memory)
    assert info["flops_per_step"] > cfg.memory_segments * staged.stage1["flops_per_step"]


def test_interrupted_stage2_resumes_exactly(staged, bench_home, tmp_path):
    from hmst_bench.train.loop import TrainSettings, train

    full = staged.stage2
    out = _copy_stage1(staged, tmp_path / "B")

    def interrupt_at_step_2(ctx):
        if ctx.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the trainer's handler turns it into a clean stop

    cut = train(TrainSettings(out=out, stage="2", budget=S2_BUDGET, save_every=int(SAVE_EVERY),
                              eval_every=int(EVAL_EVERY)),
                progress=interrupt_at_step_2)
    assert cut["status"] == "interrupted" and cut["stage"] == "2" and cut["steps"] == 2 < full["steps"]
    assert cut["stages"]["1"] == full["stages"]["1"]
    resumed = json.loads(run_cli("train", "--resume", "--out", str(out), "--json", env=_env(bench_home)).stdout)
    assert resumed["status"] == "complete" and resumed["stage"] == "2"
    for key in ("steps", "tokens", "achieved_flops", "flops_per_step", "final_train_loss", "val_loss", "config_hash"):
        assert resumed[key] == full[key], key
    assert resumed["stages"] == full["stages"]
    assert (out / "model.safetensors").read_bytes() == (staged.a / "model.safetensors").read_bytes()
    # the long-term store came back with the checkpoint and grew exactly as without the interruption
    for name in ("labels.npy", "metadata.json", "index.faiss"):
        assert (out / "semantic" / name).read_bytes() == (staged.a / "semantic" / name).read_bytes(), name


# ============================================================================== refusals


def _refused(bench_home, *args) -> str:
    proc = run_cli("train", *args, env=_env(bench_home), check=False)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_refuses_an_earlier_stage_on_a_folder_at_stage_2(staged, bench_home):
    before = _snapshot(staged.a)
    line = _refused(bench_home, "--stage", "1", "--out", str(staged.a), "--budget", S1_BUDGET)
    assert "is at stage 2" in line and "--stage 1 does not come after it" in line and "stages: 1, 2" in line
    line = _refused(bench_home, "--stage", "2", "--out", str(staged.a), "--budget", S2_BUDGET)
    assert "--stage 2 does not come after it" in line
    assert _snapshot(staged.a) == before


def test_refuses_an_unknown_stage_naming_the_stages(staged, bench_home, tmp_path):
    out = tmp_path / "new"
    line = _refused(bench_home, *STAGE1, "--stage", "4", "--out", str(out))
    assert "hmst has stages 1, 2, critic, 3" in line and "--stage 4 is not one of them" in line
    assert not out.exists()
    before = _snapshot(staged.a)  # the same on a folder that holds a run
    line = _refused(bench_home, "--stage", "4", "--out", str(staged.a), "--budget", S2_BUDGET)
    assert "hmst has stages 1, 2, critic, 3" in line and "--stage 4 is not one of them" in line
    assert _snapshot(staged.a) == before


def test_refuses_stage2_without_memory_and_leaves_stage1_as_it_was(staged, bench_home, tmp_path):
    out = _copy_stage1(staged, tmp_path / "C")
    before = _snapshot(out)
    line = _refused(bench_home, "--stage", "2", "--out", str(out), "--budget", S2_BUDGET, "--set", "memory=false")
    assert "drop --set memory=false" in line
    assert _snapshot(out) == before  # run.json (still stage 1, complete), metrics, weights, checkpoint
    assert _info(out)["stage"] == "1" and _info(out)["status"] == "complete"


# ============================================================================== longctx: HMST vs dense


@pytest.fixture(scope="module")
def dense_run(staged, bench_home):
    # the same total budget as the HMST run: stage 1's plus stage 2's
    budget = f"{float(S1_BUDGET) + float(S2_BUDGET):g}"
    out = staged.a.parent / "dense"
    run_cli("train", "--arch", "dense-llama", "--size", "micro", "--corpus", "synthetic-facts", "--seq-len", "64",
            "--budget", budget, "--out", str(out), env=_env(bench_home))
    return out


def test_longctx_hmst_stage2_reads_past_the_window_dense_does_not(staged, dense_run, bench_home):
    from hmst_bench.eval import longctx as L

    hmst_total = staged.stage2["achieved_flops"] + staged.stage2["stages"]["1"]["achieved_flops"]
    dense = _info(dense_run)
    assert dense["status"] == "complete" and dense["budget_flops"] == float(S1_BUDGET) + float(S2_BUDGET)
    assert dense["achieved_flops"] >= dense["budget_flops"] and hmst_total >= dense["budget_flops"]
    contexts = {}
    for run in (staged.a, dense_run):
        run_cli("eval", "--run", str(run), "--suite", "longctx", "--limit", "2", env=_env(bench_home))
        record = json.loads((run / "eval" / "longctx.json").read_text())
        prov = record["provenance"]
        assert prov["window"] == 64 and record["longctx"]["window"] == 64
        contexts[run] = prov["context"]
        table = record["longctx"]["tasks"]
        assert set(table) == set(L.TASKS)
        assert {row["length"] for row in table.values()} == {1, 4, 16}
        assert all(row["n"] == 2 for row in table.values())
    assert contexts[dense_run] == 64
    assert contexts[staged.a] == 64 * staged.stage2["config"]["memory_max_segments"]
    assert json.loads((staged.a / "eval" / "longctx.json").read_text())["provenance"]["stage"] == "2"


# ============================================================================== the adapter reads the memory


def test_adapter_loglikelihood_is_the_models_score_over_the_whole_context(staged):
    from hmst_bench.eval.lm import HmstBenchLM
    from hmst_bench.train.rundir import load_run

    run = load_run(staged.a)
    lm = HmstBenchLM(run=run, device="cpu", progress=False)
    model = lm.model
    w = model.max_seq_len
    assert lm.max_length == w == 64 and lm.max_context == model.max_context_len == w * model.config.memory_max_segments
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (5 * w + 3,), generator=gen).tolist()
    ctx, cont = ids[:-3], ids[-3:]

    def by_hand(tokens: list[int], scored: int) -> float:
        """Sum of the model's log-probs of the last `scored` tokens, read with the whole text."""
        inp = torch.tensor([tokens[:-1]])
        targets = torch.tensor([tokens[1:]])
        targets[:, : -scored] = -100
        with torch.no_grad():
            return float(model.token_logprobs(inp, targets).sum())

    adapter = lm._loglikelihood_tokens([(None, ctx, cont)], disable_tqdm=True)[0][0]
    assert adapter == pytest.approx(by_hand(ids, 3), rel=1e-6, abs=1e-5)

    # the memory is read: the reader's gate has left 0 in stage 2 (only slightly, in 4 steps), and
    # with it wide open (1.0) the answer moves clearly from the closed gate's...
    gate = model.memory.reader.gate
    trained = float(gate.detach())
    assert trained != 0.0
    with torch.no_grad():
        gate.fill_(1.0)
        opened = by_hand(ids, 3)
        gate.fill_(0.0)
        closed = by_hand(ids, 3)
        # ...to exactly the plain window LM's: the text is read in segments aligned from its first
        # token and the 3 scored tokens are predicted from positions 5w-1 .. 5w+1, i.e. from the
        # 5th and 6th segments, so without memory the text from 4w on gives the same answer
        from_4w = by_hand(ids[4 * w :], 3)
        gate.fill_(trained)
    assert closed == pytest.approx(from_4w, rel=1e-6, abs=1e-5)
    assert abs(opened - closed) > 1e-3
    # and (what the adapter would do for a model without memory) scoring only the last window
    # gives another answer too; that comparison alone would not prove the memory is read, since
    # its segment alignment differs from the whole text's
    assert by_hand(ids[-(w + 1) :], 3) != pytest.approx(adapter, rel=1e-6, abs=1e-5)
