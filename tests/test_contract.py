"""The model contract, once for every registered architecture (`hmst_bench.conformance`, the suite
`hmst-bench check` runs): each architecture at size micro, and at every stage whose config differs
(HMST's stage 2 with its memory), must pass every property. The suite itself must fail a model
that breaks a property, and a model written for the v1 Protocol is refused in one line."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from hmst_bench.cli import cli
from hmst_bench.conformance import Subject, arch_subject, run_checks
from hmst_bench.model import LanguageModel, check_built
from hmst_bench.modeling import SoftmaxLM
from hmst_bench.plugins import get_registry


def _cases():
    registry = get_registry()
    cases = []
    for name in sorted(registry.architectures()):
        spec = registry.arch(name)
        cases.append(pytest.param(name, None, id=name))
        for stage in spec.stages:
            if spec.stage_config and spec.stage_config(stage):
                cases.append(pytest.param(name, stage, id=f"{name}-stage{stage}"))
    return cases


@pytest.mark.parametrize("arch,stage", _cases())
def test_every_architecture_meets_the_contract(arch, stage):
    findings = run_checks(arch_subject(get_registry().arch(arch), stage=stage))
    failed = [f.line() for f in findings if not f.ok]
    assert not failed, "\n".join(failed)
    assert len(findings) >= 13


class PeeksAhead(SoftmaxLM):
    """A softmax LM whose logits at t also see token t + 1: not causal, so scoring is wrong."""

    def __init__(self, vocab: int = 11):
        super().__init__()
        self.max_seq_len = 16
        self.embed = torch.nn.Embedding(vocab, 8)
        self.head = torch.nn.Linear(8, vocab)

    def logits(self, input_ids, keep=None):
        h = self.embed(input_ids)
        h = h + torch.cat([h[:, 1:], torch.zeros_like(h[:, :1])], dim=1)  # the next token leaks in
        out = self.head(h)
        return out if keep is None else out[:, keep]


def test_the_suite_fails_a_model_that_sees_the_future():
    findings = {f.name: f for f in run_checks(Subject(build=PeeksAhead, vocab=11, dtype=torch.float64))}
    assert not findings["causality"].ok
    assert "changing token 8 moved earlier log-probs by" in findings["causality"].detail
    assert findings["save/load round trip"].ok and findings["normalised"].ok


class OnlyRequired(LanguageModel):
    """A bigram LM with the three required methods and nothing else: every default (score,
    score_continuations, cache-free batched generate, artifacts, accounting) is the base class's."""

    max_seq_len = 16

    def __init__(self, vocab: int = 11):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 8)
        self.head = torch.nn.Linear(8, vocab)

    def _logprobs(self, input_ids):
        return torch.log_softmax(self.head(self.embed(input_ids)).float(), dim=-1)

    def loss(self, batch):
        lp = self.token_logprobs(batch["input_ids"], batch["labels"])
        return -lp.sum() / (batch["labels"] != -100).sum(), {}

    def token_logprobs(self, input_ids, targets):
        got = self._logprobs(input_ids).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
        return got.masked_fill(targets == -100, 0.0)

    def next_token_logprobs(self, input_ids, lengths=None):
        last = (lengths - 1) if lengths is not None else torch.full((len(input_ids),), input_ids.shape[1] - 1)
        return self._logprobs(input_ids[torch.arange(len(input_ids)), last][:, None])[:, 0]


def test_the_base_class_defaults_meet_the_contract():
    findings = run_checks(Subject(build=OnlyRequired, vocab=11, dtype=torch.float64))
    failed = [f.line() for f in findings if not f.ok]
    assert not failed and len(findings) == 13, "\n".join(failed)


class V1Model(torch.nn.Module):
    """A model written for contract v1: the methods, but not the base class."""

    max_seq_len = 16

    def loss(self, batch):
        raise NotImplementedError

    def token_logprobs(self, input_ids, targets):
        raise NotImplementedError


def test_a_v1_model_is_refused_in_one_line():
    spec = get_registry().arch("dense-llama")
    with pytest.raises(TypeError) as exc:
        check_built(spec, V1Model())
    message = str(exc.value)
    assert "\n" not in message and "contract v1" in message and "subclass hmst_bench.LanguageModel" in message
    with pytest.raises(TypeError, match="not a hmst_bench.LanguageModel subclass"):
        check_built(spec, torch.nn.Linear(2, 2))


def test_missing_required_methods_cannot_be_built():
    class Incomplete(LanguageModel):
        max_seq_len = 8

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()


def test_check_through_the_cli():
    runner = CliRunner()
    result = runner.invoke(cli, ["check", "dense-gpt2"])
    assert result.exit_code == 0, result.output
    assert "PASS causality" in result.output and "FAIL" not in result.output
    bad = runner.invoke(cli, ["check", "no-such-arch"])
    assert bad.exit_code == 1 and "unknown architecture 'no-such-arch'" in bad.output
    stage = runner.invoke(cli, ["check", "dense-llama", "--stage", "2"])
    assert stage.exit_code == 2 and "has no stage '2'" in stage.output


def _guide_files(text: str) -> dict[str, str]:
    """The example plugin's files as docs/plugin-guide.md shows them: a **`path`** line, then a
    fenced block."""
    import re

    return {m.group(1): m.group(2) for m in re.finditer(r"\*\*`(hmst_mlp_lm/[\w/]+\.py)`\*\*\n\n```python\n(.*?)```", text, re.S)}


def test_the_plugin_guides_example_passes_the_check(fresh_registry, tmp_path, monkeypatch):
    import importlib
    from pathlib import Path

    guide = (Path(__file__).parent.parent / "docs" / "plugin-guide.md").read_text()
    files = _guide_files(guide)
    assert {"hmst_mlp_lm/__init__.py", "hmst_mlp_lm/plugin.py", "hmst_mlp_lm/model.py"} <= set(files)
    for name, body in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    fresh_registry.add_plugin(importlib.import_module("hmst_mlp_lm.plugin"), "mlp_lm", "hmst-mlp-lm")
    findings = run_checks(arch_subject(fresh_registry.arch("mlp-lm")))
    failed = [f.line() for f in findings if not f.ok]
    assert not failed and len(findings) == 13, "\n".join(failed)
