"""The trainer end to end through the CLI: budgets, run.json, exact resume after kill -9 and
SIGINT, one-line user errors, NaN handling, tokenizer reuse, and the demo."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import run_cli

MICRO = ("--arch", "dense-llama", "--size", "micro")
RUN_FIELDS = {
    "arch", "size", "seed", "config", "config_hash", "budget_flops", "achieved_flops", "flops_per_step",
    "flops_per_token", "tokens", "steps", "params_total", "params_active", "wall_seconds", "final_train_loss",
    "val_loss", "val_bpb", "status", "versions", "git_sha", "hardware",
}


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "R"
    proc = run_cli("train", *MICRO, "--budget", "2e11", "--out", str(out), "--json")
    return out, json.loads(proc.stdout), proc


def test_run_json_meets_the_budget_rule(micro_run):
    out, info, _ = micro_run
    assert RUN_FIELDS <= set(info)
    assert info["status"] == "complete"
    assert info["budget_flops"] <= info["achieved_flops"] < info["budget_flops"] + info["flops_per_step"]
    assert info["achieved_flops"] == info["steps"] * info["flops_per_step"]
    assert info["tokens"] == info["steps"] * 8 * 128
    assert info["flops_per_token"] == pytest.approx(info["flops_per_step"] / (8 * 128))
    assert info["params_total"] == info["params_active"] > 0
    assert info["versions"]["torch"] and info["versions"]["hmst-bench"]
    assert json.loads((out / "run.json").read_text()) == info
    mask = os.umask(0)
    os.umask(mask)
    for name in ("metrics.jsonl", "tokenizer.json", "model.safetensors", "model_config.json", "state/trainer.pt",
                 "state/model.safetensors", "run.json", "hf/config.json"):
        assert (out / name).exists(), name
        if name != "metrics.jsonl":  # written atomically: the mode must still follow the umask
            assert (out / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_flops_per_step_is_measured_not_assumed(micro_run):
    """The dense-llama micro step is forward+backward: ~6 * params * tokens plus attention, which
    the CPU SDPA registration makes visible. Check the count against a hand-built estimate."""
    _, info, _ = micro_run
    cfg = info["config"]
    tokens = 8 * 128
    d, L, T, V, ff = cfg["d_model"], cfg["n_layers"], 128, cfg["vocab_size"], cfg["d_ff"]
    per_token_matmul = 2 * (L * (4 * d * d + 3 * d * ff) + d * V)  # forward multiply-adds x2
    attention = L * 4 * T * d  # forward QK^T and PV per token
    forward = tokens * (per_token_matmul + attention)
    backward = tokens * (2 * per_token_matmul + 2.5 * attention)
    assert info["flops_per_step"] == pytest.approx(forward + backward, rel=1e-6)


def test_metrics_log_and_load_run(micro_run):
    from hmst_bench import load_run

    out, info, _ = micro_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    val_rows = [r for r in rows if r["kind"] == "val"]
    assert train_rows[-1]["step"] == info["steps"] and train_rows[-1]["loss"] == info["final_train_loss"]
    assert val_rows[-1]["val_loss"] == info["val_loss"] and len(val_rows) >= 5
    run = load_run(out)
    assert run.info == info and run.spec.name == "dense-llama" and not run.model.training
    from transformers import PreTrainedTokenizerFast

    assert isinstance(run.tokenizer, PreTrainedTokenizerFast)


def _start(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "hmst_bench.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def _wait_for_checkpoint(out: Path, proc, timeout=120):
    deadline = time.time() + timeout
    while not (out / "state" / "trainer.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.05)


RESUME_ARGS = (*MICRO, "--budget", "3e11", "--save-every", "10", "--eval-every", "40")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    return json.loads(run_cli("train", *RESUME_ARGS, "--out", str(out), "--json").stdout)


def test_kill_9_then_resume_equals_uninterrupted(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    proc = _start(["train", *RESUME_ARGS, "--out", str(out)])
    _wait_for_checkpoint(out, proc)
    # while it runs, a second train into the same --out is refused, naming the holder of the lock
    _fails("train", "--resume", "--out", str(out), match=f"in use by pid {proc.pid}")
    _fails("train", *RESUME_ARGS, "--out", str(out), match=f"in use by pid {proc.pid}")
    assert proc.poll() is None  # the first one carries on (its metrics stay one sequence: below)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((out / "run.json").read_text())["status"] == "running"  # it really was cut short
    assert (out / ".hmst-bench.lock").exists()  # the dead holder's lock file stays, unlocked by the kernel
    resumed = json.loads(run_cli("train", "--resume", "--out", str(out), "--json").stdout)
    assert resumed["status"] == "complete"
    assert resumed["final_train_loss"] == uninterrupted["final_train_loss"]
    assert resumed["val_loss"] == uninterrupted["val_loss"]
    assert resumed["steps"] == uninterrupted["steps"] and resumed["achieved_flops"] == uninterrupted["achieved_flops"]
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert steps == sorted(set(steps))  # redone steps were not logged twice


def test_sigint_checkpoints_and_resumes_exactly(uninterrupted, tmp_path):
    out = tmp_path / "interrupted"
    proc = _start(["train", *RESUME_ARGS, "--out", str(out)])
    _wait_for_checkpoint(out, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted" and "--resume" in stderr
    assert 0 < info["steps"] < uninterrupted["steps"]
    resumed = json.loads(run_cli("train", "--resume", "--out", str(out), "--json").stdout)
    assert resumed["final_train_loss"] == uninterrupted["final_train_loss"]
    assert resumed["status"] == "complete" and "interrupted_by" not in resumed


def _fails(*args, match: str, env=None):
    proc = run_cli(*args, env=env, check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("Error:"), proc.stderr
    assert match in lines[0], lines[0]
    return lines[0]


def test_user_errors_are_one_line(micro_run, tmp_path):
    out, info, _ = micro_run
    _fails("train", "--arch", "nope", "--budget", "1e12", "--out", str(tmp_path / "a"), match="known: dense-gpt2, dense-llama")
    _fails("train", *MICRO, "--budget", "lots", "--out", str(tmp_path / "b"), match="cannot read budget 'lots'")
    _fails("train", *MICRO, "--budget", "1e12", "--corpus", str(tmp_path / "nothere"), "--out", str(tmp_path / "c"), match="not found")
    (tmp_path / "afile").write_text("x")
    _fails("train", *MICRO, "--budget", "1e12", "--out", str(tmp_path / "afile" / "sub"), match="cannot write to")
    _fails("train", *MICRO, "--budget", "1e12", "--out", str(out), match="already holds a run")
    _fails("train", "--resume", "--arch", "dense-gpt2", "--out", str(out), match="trained with --arch dense-llama")
    _fails("train", "--resume", "--lr", "0.5", "--out", str(out), match="trained with --lr")
    _fails("train", "--resume", "--set", "n_layers=3", "--out", str(out), match="config")
    _fails("train", *MICRO, "--set", "d_model=30", "--budget", "1e12", "--out", str(tmp_path / "d"), match="divisible")
    line = _fails("train", *MICRO, "--budget", "1e6", "--out", str(tmp_path / "e"), match="below one training step")
    minimum = line.split("use --budget ")[1].split()[0]
    assert float(minimum) >= info["flops_per_step"]  # the stated minimum really is enough
    assert not (tmp_path / "e").exists()  # a refused start leaves nothing behind
    _fails("train", *MICRO, "--budget", "100tok", "--out", str(tmp_path / "t"), match="use --budget 1024tok or more")
    again = json.loads(run_cli("train", *MICRO, "--budget", minimum, "--out", str(tmp_path / "e"), "--json").stdout)
    assert again["status"] == "complete" and again["steps"] == math.ceil(float(minimum) / info["flops_per_step"])
    _fails("train", "--resume", "--out", str(tmp_path / "never"), match="no run.json")


def test_tokenizer_reuse_makes_runs_comparable(micro_run, tmp_path):
    out, info, _ = micro_run
    other = json.loads(run_cli("train", "--arch", "dense-gpt2", "--size", "micro", "--budget", "1e10",
                               "--tokenizer", str(out), "--out", str(tmp_path / "g"), "--json").stdout)
    assert other["tokenizer"]["hash"] == info["tokenizer"]["hash"]
    assert (tmp_path / "g" / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()


# ----------------------------------------------------------------------------- NaN, in-process


def register_toy(registry, plugin_name: str, distribution: str = "", **spec) -> None:
    """Register one in-test architecture (ArchSpec fields as keywords) as a plugin would."""
    from hmst_bench import ArchSpec, hookimpl

    class Plugin:
        @hookimpl
        def register_architectures(self, register):
            register(ArchSpec(**spec))

    assert registry.add_plugin(Plugin(), name=plugin_name, distribution=distribution)


def small_corpus(tmp_path: Path, text: str | None = None) -> Path:
    path = tmp_path / "c.txt"
    path.write_text(text or "".join(f"line {i} of a small corpus\n" for i in range(400)))
    return path



@dataclass
class NanConfig:
    vocab_size: int = 64
    max_seq_len: int = 16
    nan_at_step: int = 5


def _build_nan_model(config, tokenizer):
    import torch

    from hmst_bench.modeling import SoftmaxLM

    class Bigram(SoftmaxLM):
        def __init__(self):
            super().__init__()
            self.max_seq_len = config.max_seq_len
            self.embed = torch.nn.Embedding(config.vocab_size, 16)
            self.head = torch.nn.Linear(16, config.vocab_size)
            self.calls = 0

        def logits(self, input_ids, keep=None):
            out = self.head(self.embed(input_ids))
            return out if keep is None else out[:, keep]

        def loss(self, batch):
            self.calls += 1
            loss, aux = super().loss(batch)
            if self.training and self.calls == config.nan_at_step + 1:  # +1: the FLOP probe is a call
                loss = loss * float("nan")
            return loss, aux

    return Bigram()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(fresh_registry, tmp_path):
    import torch

    from hmst_bench.train.context import TrainingDiverged
    from hmst_bench.train.loop import TrainSettings, train

    register_toy(fresh_registry, "nan",
                 name="nan-bigram", description="diverges on purpose",
                 config_cls=NanConfig, sizes={"micro": {}}, build=_build_nan_model)
    corpus = small_corpus(tmp_path)
    out = tmp_path / "R"
    settings = TrainSettings(arch="nan-bigram", size="micro", budget="1e12", corpus=str(corpus), out=out,
                             save_every=2, eval_every=1000, overrides={"vocab_size": 300})
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 5; the last good checkpoint \(step 4\)"):
        train(settings)
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed" and "nan" in info["error"]
    assert torch.load(out / "state" / "trainer.pt", weights_only=False)["step"] == 4
    from safetensors.torch import load_file

    top, kept = load_file(out / "model.safetensors"), load_file(out / "state" / "model.safetensors")
    assert all(torch.equal(top[k], kept[k]) and torch.isfinite(kept[k]).all() for k in kept)


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_over(uninterrupted, tmp_path):
    out = tmp_path / "early"
    proc = _start(["train", *RESUME_ARGS, "--out", str(out)])
    deadline = time.time() + 120
    while not (out / "run.json").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "state").exists()
    resumed = json.loads(run_cli("train", "--resume", "--out", str(out), "--json").stdout)
    assert resumed["final_train_loss"] == uninterrupted["final_train_loss"]


def test_model_missing_part_of_the_contract_is_refused(fresh_registry, tmp_path):
    import torch

    from hmst_bench.train.loop import TrainError, TrainSettings, train

    register_toy(fresh_registry, "half", distribution="half-dist",
                 name="half-model", description="no contract",
                 config_cls=NanConfig, sizes={"micro": {}}, build=lambda c, t: torch.nn.Linear(2, 2))
    corpus = small_corpus(tmp_path)
    settings = TrainSettings(arch="half-model", size="micro", budget="1e9", corpus=str(corpus), out=tmp_path / "R",
                             overrides={"vocab_size": 300})
    with pytest.raises(TrainError, match=r"half-model \(half-dist\) builds a Linear, not a hmst_bench.LanguageModel subclass"):
        train(settings)
    assert not (tmp_path / "R" / "run.json").exists()


def test_accumulation_and_mixed_precision(tmp_path):
    info = json.loads(run_cli("train", *MICRO, "--budget", "1e10", "--grad-accum", "2", "--mixed-precision", "bf16",
                              "--out", str(tmp_path / "acc"), "--json").stdout)
    assert info["status"] == "complete"
    assert info["tokens"] == info["steps"] * 2 * 8 * 128  # two micro-batches per optimiser step
    assert info["contract_version"] == 2  # the model contract the run was trained under
    assert info["training"]["mixed_precision"] == "bf16" and info["training"]["grad_accum"] == 2
    assert info["val_loss"] < 8.0  # finite and learning from ln(2048) = 7.62 at most a little above


# ----------------------------------------------------------------------------- staged architectures


@dataclass
class StagedConfig:
    vocab_size: int = 64
    max_seq_len: int = 16
    memory: bool = False  # stage 2 switches on a module stage 1 did not have


def _build_staged(config, tokenizer):
    import torch

    from hmst_bench.modeling import SoftmaxLM

    class Staged(SoftmaxLM):
        def __init__(self):
            super().__init__()
            self.max_seq_len = config.max_seq_len
            self.embed = torch.nn.Embedding(config.vocab_size, 16)
            self.head = torch.nn.Linear(16, config.vocab_size)
            self.memory = torch.nn.Linear(16, 16) if config.memory else None

        def logits(self, input_ids, keep=None):
            h = self.embed(input_ids)
            if self.memory is not None:
                h = h + self.memory(h)
            out = self.head(h)
            return out if keep is None else out[:, keep]

    return Staged()


def staged_spec() -> dict:
    return dict(name="staged", description="two stages", config_cls=StagedConfig, sizes={"micro": {"vocab_size": 300}},
                build=_build_staged, stages=("1", "2"))


def test_a_later_stage_continues_the_run_with_its_own_budget_record(fresh_registry, tmp_path):
    from safetensors.torch import load_file

    from hmst_bench import load_run
    from hmst_bench.train.loop import TrainError, TrainSettings, train

    register_toy(fresh_registry, "staged", **staged_spec())
    corpus = small_corpus(tmp_path)
    out = tmp_path / "R"
    first = train(TrainSettings(arch="staged", size="micro", budget="4e7", corpus=str(corpus), out=out, eval_every=1000))
    assert first["stage"] == "1" and first["status"] == "complete"
    stage1_weights = load_file(out / "model.safetensors")

    with pytest.raises(TrainError, match="does not come after"):
        train(TrainSettings(stage="1", budget="4e7", out=out))
    second = train(TrainSettings(stage="2", budget="6e7", out=out, overrides={"memory": True}, lr=1e-12, eval_every=1000))
    assert second["stage"] == "2" and second["status"] == "complete" and second["config"]["memory"] is True
    assert second["stages"]["1"]["achieved_flops"] == first["achieved_flops"]
    assert second["stages"]["1"]["budget_flops"] == 4e7 and second["budget_flops"] == 6e7
    assert second["budget_flops"] <= second["achieved_flops"] < second["budget_flops"] + second["flops_per_step"]
    assert second["flops_per_step"] > first["flops_per_step"]  # the new module costs FLOPs, and they are charged
    stage2_weights = load_file(out / "model.safetensors")
    assert torch_allclose(stage2_weights["head.weight"], stage1_weights["head.weight"])  # started from stage 1 (lr ~ 0)
    assert "memory.weight" in stage2_weights and "memory.weight" not in stage1_weights
    stages = {r.get("stage") for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert stages == {"1", "2"}
    run = load_run(out)
    assert run.model.memory is not None and run.info["stage"] == "2"


def torch_allclose(a, b):
    import torch

    return torch.allclose(a, b, atol=1e-6)


def test_interrupted_later_stage_resumes_exactly(fresh_registry, tmp_path):
    import shutil

    from hmst_bench.train.loop import TrainSettings, train

    register_toy(fresh_registry, "staged", **staged_spec())
    corpus = small_corpus(tmp_path)
    train(TrainSettings(arch="staged", size="micro", budget="4e7", corpus=str(corpus), out=tmp_path / "A", eval_every=1000))
    shutil.copytree(tmp_path / "A", tmp_path / "B")
    stage2 = dict(stage="2", budget="1e8", overrides={"memory": True}, save_every=4, eval_every=1000)
    full = train(TrainSettings(out=tmp_path / "A", **stage2))

    def interrupt_at_step_6(ctx):
        if ctx.step == 6:
            os.kill(os.getpid(), signal.SIGINT)  # the trainer's handler turns it into a clean stop

    cut = train(TrainSettings(out=tmp_path / "B", **stage2), progress=interrupt_at_step_6)
    assert cut["status"] == "interrupted" and cut["steps"] == 6
    resumed = train(TrainSettings(out=tmp_path / "B", resume=True))
    assert resumed["status"] == "complete" and resumed["stage"] == "2"
    assert resumed["final_train_loss"] == full["final_train_loss"] and resumed["steps"] == full["steps"]
    assert resumed["stages"] == full["stages"]


def _build_uniform(config, tokenizer):
    import torch

    from hmst_bench.modeling import SoftmaxLM

    class Uniform(SoftmaxLM):
        """Always predicts the uniform distribution (its one weight gets zero gradient)."""

        def __init__(self):
            super().__init__()
            self.max_seq_len = config.max_seq_len
            self.w = torch.nn.Parameter(torch.ones(1))

        def logits(self, input_ids, keep=None):
            out = (self.w * 0).expand(*input_ids.shape, config.vocab_size)
            return out if keep is None else out[:, keep]

    return Uniform()


def test_validation_loss_and_bits_per_byte_by_hand(fresh_registry, tmp_path):
    """A uniform model's validation loss is ln V per token; bits per byte is then
    (targets * ln V) / (ln 2 * UTF-8 bytes of the target tokens), counted here independently."""
    import math

    import numpy as np

    from hmst_bench.data.corpora import load_corpus
    from hmst_bench.data.tokenizer import load_tokenizer
    from hmst_bench.data.tokens import encode_corpus
    from hmst_bench.train.loop import TrainSettings, train

    register_toy(fresh_registry, "uniform",
                 name="uniform", description="uniform",
                 config_cls=NanConfig, sizes={"micro": {"vocab_size": 300}}, build=_build_uniform)
    corpus = small_corpus(tmp_path, "".join(f"línea {i}: café ünïcode line of text\n" for i in range(600)))
    out = tmp_path / "R"
    info = train(TrainSettings(arch="uniform", size="micro", budget="256tok", corpus=str(corpus), out=out, eval_every=1000))
    tok = load_tokenizer(out)
    data = encode_corpus(load_corpus(str(corpus)), tok)
    windows = data.val_windows(16, 32768)
    targets = windows[:, 1:].reshape(-1)
    text_bytes = sum(len(tok.decode([int(t)]).encode("utf-8")) for t in targets if t not in tok.all_special_ids)
    assert info["val_loss"] == pytest.approx(math.log(len(tok)), rel=1e-6)
    assert info["val_bpb"] == pytest.approx(len(targets) * math.log(len(tok)) / (math.log(2) * text_bytes), rel=1e-6)
    assert np.all(targets != tok.pad_token_id)


def test_validation_loss_is_total_nats_over_total_tokens(tmp_path):
    """run.json's val_loss is the summed nats of every validation target over their count: 11
    windows in batches of 8 leave a short last batch, so a mean of batch means would differ."""
    import torch

    from hmst_bench.data.corpora import load_corpus
    from hmst_bench.data.tokens import encode_corpus
    from hmst_bench.train.loop import TrainSettings, train
    from hmst_bench.train.rundir import load_run

    out = tmp_path / "R"
    info = train(TrainSettings(arch="dense-llama", size="micro", budget="1024tok", out=out, val_tokens=11 * 128))
    run = load_run(out)
    data = encode_corpus(load_corpus(info["corpus_spec"]), run.tokenizer)
    batches = list(data.val_batches(128, 8, 11 * 128))
    assert [len(b["input_ids"]) for b in batches] == [8, 3]
    nats, count, means = 0.0, 0, []
    with torch.no_grad():
        for b in batches:
            lp = run.model.token_logprobs(b["input_ids"], b["labels"]).double()
            mask = b["labels"] != -100
            nats -= float(lp[mask].sum())
            count += int(mask.sum())
            means.append(-float(lp[mask].mean()))
    assert info["val_loss"] == pytest.approx(nats / count, rel=1e-6)
    assert abs(sum(means) / len(means) - nats / count) > 1e-6 * nats / count


def test_data_parallel_on_two_processes_matches_one(micro_run, tmp_path):
    """torchrun with 2 CPU ranks: FLOPs and tokens count both ranks, and 2 ranks x batch 4 train on
    the same global batches as 1 process x batch 8, so the losses agree to float precision."""
    _, single, _ = micro_run
    out = tmp_path / "dp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "hmst_bench.cli"]
    proc = subprocess.run([*torchrun, "train", *MICRO, "--batch-size", "4", "--budget", "2e11", "--out", str(out), "--json"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout)
    assert info["training"]["world_size"] == 2 and info["status"] == "complete"
    assert info["flops_per_step"] == pytest.approx(single["flops_per_step"], rel=1e-9)  # 2 x (batch 4) = batch 8
    assert info["tokens"] == info["steps"] * 2 * 4 * 128 and info["steps"] == single["steps"]
    assert info["final_train_loss"] == pytest.approx(single["final_train_loss"], rel=1e-3)
    # validation is split over the ranks and the totals summed: the same figure as one process
    assert info["val_loss"] == pytest.approx(single["val_loss"], rel=1e-3)


def _build_counting(config, tokenizer):
    import torch

    from hmst_bench.modeling import SoftmaxLM

    class Counting(SoftmaxLM):
        """Counts its training forwards in a buffer, as a memory-writing model would change state."""

        def __init__(self):
            super().__init__()
            self.max_seq_len = config.max_seq_len
            self.embed = torch.nn.Embedding(config.vocab_size, 8)
            self.head = torch.nn.Linear(8, config.vocab_size)
            self.register_buffer("writes", torch.zeros((), dtype=torch.long))

        def logits(self, input_ids, keep=None):
            if self.training:
                self.writes += 1
            out = self.head(self.embed(input_ids))
            return out if keep is None else out[:, keep]

    return Counting()


def test_flop_probe_leaves_buffers_untouched_and_refused_stage_keeps_the_run(fresh_registry, tmp_path):
    from safetensors.torch import load_file

    from hmst_bench.train.loop import TrainError, TrainSettings, train

    register_toy(fresh_registry, "counting",
                 name="counting", description="stateful",
                 config_cls=NanConfig, sizes={"micro": {"vocab_size": 300}}, build=_build_counting, stages=("1", "2"))
    corpus = small_corpus(tmp_path)
    out = tmp_path / "R"
    first = train(TrainSettings(arch="counting", size="micro", budget="1e7", corpus=str(corpus), out=out, eval_every=1000))
    assert int(load_file(out / "model.safetensors")["writes"]) == first["steps"]  # the probe's forward was undone
    before = (out / "run.json").read_text(), (out / "metrics.jsonl").read_text()
    with pytest.raises(TrainError, match="below one training step"):
        train(TrainSettings(stage="2", budget="10", out=out))
    assert ((out / "run.json").read_text(), (out / "metrics.jsonl").read_text()) == before  # stage 1 untouched
    second = train(TrainSettings(stage="2", budget="1e7", out=out, eval_every=1000))
    assert second["status"] == "complete" and second["stages"]["1"]["steps"] == first["steps"]


# ----------------------------------------------------------------------------- the run directory is the run's own


def _snapshot(folder: Path) -> dict:
    """Every entry under `folder` (and the folder) with its bytes and modification time."""
    entries = {".": (None, folder.stat().st_mtime_ns)}
    for p in sorted(folder.rglob("*")):
        entries[str(p.relative_to(folder))] = (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
    return entries


def test_out_holding_files_hmst_bench_did_not_write_is_refused_untouched(tmp_path):
    user = tmp_path / "mine"
    (user / "hf").mkdir(parents=True)
    (user / "state").mkdir()
    for name, text in (("metrics.jsonl", "my metrics\n"), ("tokenizer.json", "{}"), ("model.safetensors", "weights"),
                       ("hf/config.json", "{}"), ("state/mine.txt", "mine")):
        (user / name).write_text(text)
    before = _snapshot(user)
    for budget in ("2e9", "1e6"):  # a start that trains, and one whose budget would be refused
        _fails("train", *MICRO, "--budget", budget, "--out", str(user),
               match=f"{user} holds files hmst-bench did not write (hf, metrics.jsonl, model.safetensors and 2 more); "
                     "choose another --out or empty it")
    _fails("train", *MICRO, "--stage", "2", "--budget", "2e9", "--out", str(user), match="did not write")
    assert _snapshot(user) == before

    foreign_run = tmp_path / "other"  # a run.json that hmst-bench did not write does not make a run
    foreign_run.mkdir()
    (foreign_run / "run.json").write_text("[]")
    (foreign_run / "notes.txt").write_text("x")
    before = _snapshot(foreign_run)
    _fails("train", *MICRO, "--budget", "2e9", "--out", str(foreign_run), match="holds files hmst-bench did not write (notes.txt, run.json)")
    _fails("train", "--resume", "--out", str(foreign_run), match="run.json was not written by hmst-bench")
    assert _snapshot(foreign_run) == before

    empty = tmp_path / "empty"  # an empty folder may take a run; a refused start leaves it empty
    empty.mkdir()
    _fails("train", *MICRO, "--budget", "1e6", "--out", str(empty), match="below one training step")
    assert empty.is_dir() and not any(empty.iterdir())


def test_lr_nan_or_inf_is_one_line(tmp_path):
    for value in ("nan", "inf"):  # click's range lets both through (comparisons with nan are false)
        _fails("train", *MICRO, "--budget", "2e9", "--lr", value, "--out", str(tmp_path / "R"),
               match=f"--lr must be a positive finite number, e.g. --lr 1e-3 (got {value})")
    assert not (tmp_path / "R").exists()


def test_a_locked_run_directory_refuses_a_second_train(tmp_path):
    from hmst_bench.train import rundir

    out = tmp_path / "R"
    out.mkdir()
    lock = rundir.lock_run(out)  # this test process is "the first train"
    try:
        _fails("train", *MICRO, "--budget", "1e6", "--out", str(out), match=f"{out} is in use by pid {os.getpid()}")
        assert sorted(p.name for p in out.iterdir()) == [".hmst-bench.lock"]  # the holder's marker is kept
    finally:
        lock.release()
    # released (as by the holder's exit): the next start gets past the lock, to its own refusal
    _fails("train", *MICRO, "--budget", "1e6", "--out", str(out), match="below one training step")


def test_resume_of_a_complete_run_changes_nothing(micro_run, tmp_path):
    import shutil

    out, info, _ = micro_run
    older = tmp_path / "older"  # a run written before the ownership marker existed
    shutil.copytree(out, older, copy_function=shutil.copy2)
    (older / ".hmst-bench.lock").unlink()
    for run in (out, older):
        before = _snapshot(run)
        proc = run_cli("train", "--resume", "--out", str(run), "--json")
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert lines == [f"{run} is already complete ({info['steps']} steps, budget 2e11 reached); "
                         "nothing to resume and nothing was changed"], proc.stderr
        assert json.loads(proc.stdout) == info
        assert _snapshot(run) == before


@pytest.mark.parametrize("damaged", ["state/model.safetensors", "state/trainer.pt", "state/optimizer.pt"])
def test_resume_from_a_truncated_checkpoint_file_names_it_and_keeps_it(micro_run, tmp_path, damaged):
    """A run killed after its last checkpoint (status running) whose checkpoint file was cut
    short: the resume names the file and changes nothing."""
    import shutil

    out, _, _ = micro_run
    run = tmp_path / "R"
    shutil.copytree(out, run, copy_function=shutil.copy2)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "running"}))
    data = (run / damaged).read_bytes()
    (run / damaged).write_bytes(data[: len(data) // 2])
    before = _snapshot(run)
    _fails("train", "--resume", "--out", str(run),
           match=f"{run / damaged} is damaged (")
    line = _fails("train", "--resume", "--out", str(run), match="the run cannot resume from this checkpoint; the file is kept")
    assert "another --out" in line
    after = _snapshot(run)
    before.pop("."), after.pop(".")  # the session's write probe (a temp file) touched the folder's mtime
    assert after == before  # every file of the run, the damaged one and the lock file included, as it was


def test_resume_of_a_run_from_before_the_marker_completes(micro_run, tmp_path):
    """The control of the truncation test: the same state, undamaged, resumes (and a run
    directory written before the ownership marker is still the run's own)."""
    import shutil

    out, info, _ = micro_run
    run = tmp_path / "R"
    shutil.copytree(out, run, copy_function=shutil.copy2)
    (run / ".hmst-bench.lock").unlink()
    (run / "run.json").write_text(json.dumps({**info, "status": "running"}))
    resumed = json.loads(run_cli("train", "--resume", "--out", str(run), "--json").stdout)
    assert resumed["status"] == "complete" and resumed["steps"] == info["steps"]
    assert resumed["final_train_loss"] == info["final_train_loss"]
    assert (run / ".hmst-bench.lock").exists()  # marked from now on


DISK_FULL = """
import resource, sys
from hmst_bench.cli import cli
from hmst_bench.train import checkpoint
real, calls = checkpoint.save_checkpoint, []
def limited(*args, **kwargs):  # from the second checkpoint on, no file may grow past 64 KiB
    calls.append(1)
    if len(calls) == 2:
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return real(*args, **kwargs)
checkpoint.save_checkpoint = limited
cli(sys.argv[1:], prog_name="hmst-bench")
"""


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_last_good_one(tmp_path):
    """A checkpoint write refused by the kernel (here EFBIG from RLIMIT_FSIZE, as ENOSPC from a
    full disk) ends the run in one line; the previous checkpoint is whole and the run resumes."""
    import torch

    out = tmp_path / "R"
    args = (*MICRO, "--budget", "4e10", "--save-every", "10", "--eval-every", "1000", "--out", str(out))
    proc = subprocess.run([sys.executable, "-c", DISK_FULL, "train", *args], capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1] == (f"Error: cannot write to {out}: File too large; the last good checkpoint (step 10) is kept in "
                         f"{out}/state; free some space and continue with `hmst-bench train --resume --out {out}`"), proc.stderr
    assert torch.load(out / "state" / "trainer.pt", weights_only=False)["step"] == 10
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # the half-written one is gone
    resumed = json.loads(run_cli("train", "--resume", "--out", str(out), "--json").stdout)
    assert resumed["status"] == "complete" and resumed["steps"] > 20
