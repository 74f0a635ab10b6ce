"""FLOPs the meter cannot see (issue 14): ops without a formula that carry arithmetic are listed,
warned about on `train`, refused under --strict, and silenced by a model that declares them.

In-process: the naming rule (hmst_bench.budget.uncounted_work), what torch 2.13 really executes
for nn.LSTM / nn.GRU / nn.Bilinear on CPU, a custom op, and the meter's bookkeeping.

Through the CLI: a throwaway distribution `hmst-bench-thirdparty-rnn` (entry point `tp_rnn`),
pip-installed as in test_third_party.py, registers three recurrent language models: `tp-gru`
(nn.GRU, which torch runs on CPU as mm/addmm: fully counted), `tp-lstm` (nn.LSTM, which runs as
one `aten.mkldnn_rnn_layer` the counter cannot see) and `tp-lstm-declared` (the same LSTM with
`extra_flops` and `extra_flops_covers`). The built-in architectures must run nothing uncounted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from hmst_bench.budget import BudgetMeter, count_flops, parse_budget, uncounted_work
from hmst_bench.model import LanguageModel
from test_third_party import _assert_one_line_error, _env, _install, _read_run

RNN_DIST = "hmst-bench-thirdparty-rnn"
LSTM_OPS = ["aten.mkldnn_rnn_layer", "aten.mkldnn_rnn_layer_backward"]
SHORT = ("--budget", "512tok", "--batch-size", "4", "--seq-len", "32", "--eval-every", "100000")


# ----------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("op, reported", [
    ("aten.mkldnn_rnn_layer", True), ("aten.mkldnn_rnn_layer_backward", True), ("aten._cudnn_rnn", True),
    ("aten._cudnn_rnn_backward", True), ("aten.miopen_rnn", True), ("aten._lstm_mps", True), ("aten.lstm_cell", True),
    ("aten.mkldnn_convolution", True), ("aten.slow_conv3d_forward", True), ("aten._conv_depthwise2d", True),
    ("aten._scaled_dot_product_fused_attention_overrideable", True), ("aten.addbmm", True), ("aten.addmv", True),
    ("aten.mv", True), ("aten.dot", True), ("aten._int_mm", True), ("aten._weight_int8pack_mm", True),
    ("aten._addmm_activation", True), ("aten._trilinear", True), ("aten._linalg_svd", True), ("aten.cholesky", True),
    ("aten._fft_r2c", True), ("aten._embedding_bag", True), ("mylib.scan", True), ("triton.my_kernel", True),
    # elementwise, reductions, copies, bookkeeping: ignored by the counter by design
    ("aten.add", False), ("aten.mul", False), ("aten.sum", False), ("aten._softmax", False), ("aten.embedding", False),
    ("aten.embedding_dense_backward", False), ("aten.native_layer_norm", False), ("aten.view", False),
    ("aten._to_copy", False), ("aten.convert_element_type", False), ("aten.upsample_bilinear2d", False),
    ("aten.upsample_linear1d", False), ("aten.addr", False), ("aten._thnn_fused_gru_cell", False),
    ("aten._thnn_fused_lstm_cell_backward_impl", False), ("aten._cudnn_rnn_flatten_weight", False),
    ("aten._fused_sdp_choice", False), ("profiler._record_function_enter_new", False), ("c10d.allreduce_", False), ("prim.device", False),
    ("_c10d_functional.all_reduce", False),
])
def test_which_ops_without_a_formula_are_reported(op, reported):
    assert uncounted_work(op) is reported


def _without_formula(fn) -> tuple[int, set]:
    seen: set = set()
    _, flops = count_flops(fn, seen)
    return flops, seen


def test_what_torch_runs_for_recurrent_layers_on_cpu():
    """nn.LSTM runs as mkldnn_rnn_layer (invisible); nn.GRU as mm/addmm, counted exactly as the
    matmuls by hand; nn.Bilinear as _trilinear (invisible)."""
    torch.manual_seed(0)
    B, T, I, H = 2, 5, 16, 32
    x = torch.randn(B, T, I, requires_grad=True)

    lstm = torch.nn.LSTM(I, H, batch_first=True)
    flops, seen = _without_formula(lambda: lstm(x)[0].sum().backward())
    assert flops == 0 and sorted(op for op in seen if uncounted_work(op)) == LSTM_OPS

    gru = torch.nn.GRU(I, H, batch_first=True)
    flops, seen = _without_formula(lambda: gru(x)[0].sum().backward())
    assert not [op for op in seen if uncounted_work(op)], seen
    # per step: input and hidden projections (3 gates), forward + weight grads + input grads;
    # no gradient flows into the initial (zero) state
    assert flops == T * (3 * 2 * B * 3 * H * I + 2 * 2 * B * 3 * H * H) + (T - 1) * 2 * B * 3 * H * H

    bilinear = torch.nn.Bilinear(I, I, 4)
    flops, seen = _without_formula(lambda: bilinear(x, x).sum().backward())
    assert "aten._trilinear" in seen and uncounted_work("aten._trilinear")


@torch.library.custom_op("hmst_bench_test::scaled_tanh", mutates_args=())
def _scaled_tanh(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x) * 2


@_scaled_tanh.register_fake
def _(x):
    return torch.empty_like(x)


class _WithCustomOp(LanguageModel):
    """Only what the meter reads: a forward through the custom op and the declarations."""

    max_seq_len = 4

    def __init__(self, covers=()):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4, bias=False)
        self.extra_flops_covers = covers

    def forward(self, x):
        return _scaled_tanh(self.lin(x))

    def loss(self, batch):  # the scoring contract is not exercised here
        raise NotImplementedError

    token_logprobs = next_token_logprobs = loss


class _Declares(_WithCustomOp):
    def extra_flops(self, batch):
        return 10.0


@pytest.mark.parametrize("covers, declares, uncounted, declared", [
    ((), True, ["hmst_bench_test.scaled_tanh"], []),
    (("hmst_bench_test.*",), True, [], ["hmst_bench_test.scaled_tanh"]),
    ("hmst_bench_test.scaled_tanh", True, [], ["hmst_bench_test.scaled_tanh"]),  # one name as a str
    (("hmst_bench_test.*",), False, ["hmst_bench_test.scaled_tanh"], []),  # covers without extra_flops: nothing
    (("aten.*",), True, ["hmst_bench_test.scaled_tanh"], []),
])
def test_meter_lists_a_custom_op_unless_the_model_declares_it(covers, declares, uncounted, declared):
    model = (_Declares if declares else _WithCustomOp)(covers)
    calls = []
    meter = BudgetMeter(parse_budget("1e9"), on_uncounted=calls.append)
    x = torch.ones(3, 4)
    for _ in range(2):  # reported once, when first seen
        _, flops = meter.measure(lambda: model(x), model, batches=["b"])
        assert flops == 2 * 3 * 4 * 4 + (10 if declares else 0)
    assert sorted(meter.uncounted_ops) == uncounted and sorted(meter.declared_ops) == declared
    assert calls == ([uncounted] if uncounted else [])
    other = BudgetMeter(parse_budget("1e9"))
    other.load_state_dict(meter.state_dict())  # kept in checkpoints, so a resumed run.json keeps them
    assert (other.uncounted_ops, other.declared_ops) == (meter.uncounted_ops, meter.declared_ops)
    assert BudgetMeter(parse_budget("1e9")).load_state_dict({"flops": 0, "tokens": 0, "steps": 0}) is None  # older checkpoints


# ----------------------------------------------------------------------------- a third-party recurrent LM, through the CLI


RNN_FILES = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "hmst-bench-thirdparty-rnn"
        version = "0.1.0"
        requires-python = ">=3.10"

        [project.entry-points.hmst_bench]
        tp_rnn = "tp_rnn.plugin"

        [tool.setuptools]
        packages = ["tp_rnn"]
        """,
    "tp_rnn/__init__.py": '"""Recurrent language models plugged into hmst-bench."""\n',
    "tp_rnn/plugin.py": '''
        """Entry point: config and ArchSpecs only (no torch)."""

        from dataclasses import dataclass

        from hmst_bench import ArchSpec, hookimpl


        @dataclass
        class RNNConfig:
            vocab_size: int = 300
            max_seq_len: int = 32
            d_model: int = 32


        def _builder(kind):
            def build(config, tokenizer):
                from tp_rnn.model import build

                return build(kind, config)

            return build


        @hookimpl
        def register_architectures(register):
            for kind, text in (("gru", "nn.GRU"), ("lstm", "nn.LSTM"), ("lstm-declared", "nn.LSTM with extra_flops")):
                register(ArchSpec(name=f"tp-{kind}", description=f"embedding, {text}, linear head",
                                  config_cls=RNNConfig, sizes={"micro": {}}, build=_builder(kind)))
        ''',
    "tp_rnn/model.py": '''
        """Embedding -> one recurrent layer -> linear head over the vocabulary."""

        from torch import nn

        from hmst_bench.modeling import SoftmaxLM


        class RNNLM(SoftmaxLM):
            def __init__(self, config, layer):
                super().__init__()
                self.max_seq_len = config.max_seq_len
                self.d = config.d_model
                self.embed = nn.Embedding(config.vocab_size, self.d)
                self.rnn = layer(self.d, self.d, batch_first=True)
                self.head = nn.Linear(self.d, config.vocab_size, bias=False)

            def logits(self, input_ids, keep=None):
                h, _ = self.rnn(self.embed(input_ids))
                out = self.head(h)
                return out if keep is None else out[:, keep]


        class DeclaredLSTM(RNNLM):
            """The LSTM's matmuls, which its fused kernels run out of the counter's sight."""

            extra_flops_covers = ("aten.mkldnn_rnn_layer*", "aten._cudnn_rnn*")

            def extra_flops(self, batch):
                B, T = batch["input_ids"].shape
                forward = 2 * B * T * 4 * self.d * (self.d + self.d)  # 4 gates from input and state
                return 3 * forward  # backward: gradients of the weights and of the inputs


        def build(kind, config):
            if kind == "gru":
                return RNNLM(config, nn.GRU)
            return (DeclaredLSTM if kind == "lstm-declared" else RNNLM)(config, nn.LSTM)
        ''',
}


@pytest.fixture(scope="module")
def rnn_site(tmp_path_factory) -> Path:
    return _install(tmp_path_factory, "rnn-dist", RNN_FILES, RNN_DIST)


@pytest.fixture(scope="module")
def rnn_corpus(tmp_path_factory) -> Path:
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(stdlib.glob("[a-c]*.py"))[:30])
    out = tmp_path_factory.mktemp("corpus") / "code.txt"
    out.write_text(text[:100_000], encoding="utf-8")
    return out


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "warning" in line.lower()]


def _train(arch: str, out: Path, corpus: Path, env: dict, *extra: str, check: bool = True):
    return run_cli(*extra, "train", "--arch", arch, "--size", "micro", "--corpus", str(corpus), "--out", str(out),
                   *SHORT, env=env, check=check)


def _head_flops(info: dict) -> int:
    """What the counter sees of a step of these models: the head, forward and backward."""
    B, T = info["training"]["batch_size"], info["training"]["seq_len"]
    return 6 * B * T * info["config"]["d_model"] * info["config"]["vocab_size"]


def test_uncounted_lstm_is_warned_about_and_recorded(rnn_site, rnn_corpus, tmp_path):
    out = tmp_path / "R"
    proc = _train("tp-lstm", out, rnn_corpus, _env(rnn_site))
    warned = _warnings(proc.stderr)
    assert len(warned) == 1, proc.stderr
    for needle in ("tp-lstm", RNN_DIST, *LSTM_OPS, "no formula", "extra_flops(batch)", "extra_flops_covers"):
        assert needle in warned[0], (needle, warned[0])
    info, _ = _read_run(out)
    assert info["status"] == "complete"
    assert info["flops_uncounted_ops"] == LSTM_OPS and info["flops_declared_ops"] == []
    assert info["flops_per_step"] == _head_flops(info)  # the recurrent compute is indeed missing


@pytest.mark.parametrize("how", ["flag", "env"])
def test_strict_refuses_uncounted_ops(how, rnn_site, rnn_corpus, tmp_path):
    out = tmp_path / "R"
    if how == "flag":
        proc = _train("tp-lstm", out, rnn_corpus, _env(rnn_site), "--strict", check=False)
    else:
        proc = _train("tp-lstm", out, rnn_corpus, _env(rnn_site, strict="1"), check=False)
    _assert_one_line_error(proc, "tp-lstm", *LSTM_OPS, "extra_flops", "--strict")
    assert not out.exists()  # refused before its first checkpoint: no trace


def test_declared_coverage_silences_the_warning(rnn_site, rnn_corpus, tmp_path):
    out = tmp_path / "R"
    proc = _train("tp-lstm-declared", out, rnn_corpus, _env(rnn_site), "--strict")
    assert _warnings(proc.stderr) == [], proc.stderr
    info, _ = _read_run(out)
    assert info["flops_uncounted_ops"] == [] and info["flops_declared_ops"] == LSTM_OPS
    B, T, d = info["training"]["batch_size"], info["training"]["seq_len"], info["config"]["d_model"]
    assert info["flops_per_step"] == _head_flops(info) + 3 * 2 * B * T * 4 * d * 2 * d


def test_gru_on_cpu_is_fully_counted(rnn_site, rnn_corpus, tmp_path):
    out = tmp_path / "R"
    proc = _train("tp-gru", out, rnn_corpus, _env(rnn_site), "--strict")
    assert _warnings(proc.stderr) == [], proc.stderr
    info, _ = _read_run(out)
    assert info["flops_uncounted_ops"] == [] and info["flops_declared_ops"] == []
    B, T, d = info["training"]["batch_size"], info["training"]["seq_len"], info["config"]["d_model"]
    gru = T * (3 * 2 * B * 3 * d * d + 2 * 2 * B * 3 * d * d) + (T - 1) * 2 * B * 3 * d * d
    assert info["flops_per_step"] == _head_flops(info) + gru


# ----------------------------------------------------------------------------- the built-in architectures


@pytest.mark.parametrize("arch", ["dense-llama", "dense-gpt2", "gpt2-hsm", "hrm-codegen", "hmst"])
def test_builtin_architectures_run_nothing_uncounted(arch, rnn_corpus, tmp_path):
    """Under --strict, so an uncounted op would refuse the run; HMST's stage 2 (the memory:
    selective scan, FAISS reads) too."""
    out = tmp_path / "R"
    stages = [(), ("--stage", "2", "--set", "recall_fraction=0")] if arch == "hmst" else [()]
    for stage in stages:
        args = ("--strict", "train", "--arch", arch, "--size", "micro", *stage, "--corpus", str(rnn_corpus),
                "--out", str(out), *SHORT)
        if stage:  # stage 2 continues the run in --out with its own budget
            args = ("--strict", "train", *stage, "--budget", "2e9", "--out", str(out), "--eval-every", "100000")
        proc = run_cli(*args)
        assert _warnings(proc.stderr) == [], proc.stderr
        info = json.loads((out / "run.json").read_text())
        assert info["status"] == "complete" and info["flops_uncounted_ops"] == [], info.get("flops_uncounted_ops")
