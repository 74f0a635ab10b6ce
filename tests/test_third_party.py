"""What a third party experiences: its own distribution, installed for real, driven through the CLI.

Three throwaway distributions are written into a temporary folder and installed with
`pip install --target` (never into the venv), then put on PYTHONPATH of `hmst-bench` subprocesses:

- `hmst-bench-thirdparty-demo` (entry point `tp_bigram`): a light plugin module registering two
  tiny architectures built on `hmst_bench.modeling.SoftmaxLM` (an embedding + MLP bigram LM,
  torch imported only when a model is built): `tp-bigram` trains with the shared loop and
  `tp-bigram-metered` with its own stage runner that measures every step's FLOPs;
- `hmst-bench-thirdparty-broken` (entry point `tp_broken`): its module raises ImportError;
- `hmst-bench-thirdparty-dup` (entry point `tp_dup`): registers a second `dense-llama`.

Training uses a small text corpus (a slice of the standard library in one .txt file) so that
tokenizers train in well under a second and runs stay at a few steps.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import sysconfig
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

from conftest import run_cli

GOOD_DIST = "hmst-bench-thirdparty-demo"
GOOD_EP = "tp_bigram"
BROKEN_DIST = "hmst-bench-thirdparty-broken"
BROKEN_EP = "tp_broken"
DUP_DIST = "hmst-bench-thirdparty-dup"
DUP_EP = "tp_dup"
BASELINES_DIST = "hmst-bench-baselines"

BIGRAM_BUDGET = 1e8  # a bigram step at batch 8 x seq 32 and vocab 300 costs ~2e7 FLOPs
LLAMA_BUDGET = "4e9"  # a dense-llama micro step at batch 8 x seq 128 costs ~1.7e9 FLOPs
QUIET = ("--eval-every", "100000")  # validate only at the end: keeps the runs at a few seconds


# ----------------------------------------------------------------------------- the distributions


def pyproject(dist: str, version: str, entry_point: str, package: str, extra: str = "") -> str:
    """pyproject.toml of a throwaway distribution registering `package.plugin` as a plugin."""
    return f"""
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{dist}"
        version = "{version}"
        requires-python = ">=3.10"
        {extra}

        [project.entry-points.hmst_bench]
        {entry_point} = "{package}.plugin"

        [tool.setuptools]
        packages = ["{package}"]
        """


GOOD_FILES = {
    "pyproject.toml": pyproject(GOOD_DIST, "0.3.1", GOOD_EP, "tp_bigram", extra='dependencies = ["hmst-bench", "torch"]'),
    "tp_bigram/__init__.py": '"""A bigram + MLP language model plugged into hmst-bench."""\n',
    "tp_bigram/plugin.py": '''
        """Entry point: configs and ArchSpecs only. No torch here, so CLI start-up stays fast."""

        from __future__ import annotations

        from dataclasses import dataclass, field

        from hmst_bench import ArchSpec, ConfigError, hookimpl


        @dataclass
        class BigramConfig:
            vocab_size: int = 300
            max_seq_len: int = 32
            d_model: int = 32
            mlp_ratio: int = 2
            d_hidden: int = field(init=False)  # derived: mlp_ratio * d_model

            def __post_init__(self) -> None:
                for name in ("vocab_size", "max_seq_len", "d_model", "mlp_ratio"):
                    value = getattr(self, name)
                    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
                self.d_hidden = self.mlp_ratio * self.d_model


        SIZES = {
            "micro": dict(vocab_size=300, max_seq_len=32, d_model=32, mlp_ratio=2),
            "tiny": dict(vocab_size=512, max_seq_len=64, d_model=64, mlp_ratio=4),
        }


        def _build(config, tokenizer):
            from tp_bigram.model import build

            return build(config, tokenizer)


        def _metered_runner(ctx):
            from tp_bigram.runner import run

            run(ctx)


        BIGRAM = ArchSpec(
            name="tp-bigram",
            description="Third-party bigram + MLP LM (shared loop)",
            config_cls=BigramConfig,
            sizes=SIZES,
            build=_build,
        )

        METERED = ArchSpec(
            name="tp-bigram-metered",
            description="Third-party bigram + MLP LM with its own runner measuring every step",
            config_cls=BigramConfig,
            sizes=SIZES,
            build=_build,
            stage_runner=_metered_runner,
        )


        @hookimpl
        def register_architectures(register):
            register(BIGRAM)
            register(METERED)
        ''',
    "tp_bigram/model.py": '''
        """Embedding, one residual MLP, a linear head: each position sees only its own token."""

        from __future__ import annotations

        import torch
        from torch import nn

        from hmst_bench.modeling import SoftmaxLM


        class BigramMLP(SoftmaxLM):
            def __init__(self, config):
                super().__init__()
                self.max_seq_len = config.max_seq_len
                self.embed = nn.Embedding(config.vocab_size, config.d_model)
                self.up = nn.Linear(config.d_model, config.d_hidden)
                self.down = nn.Linear(config.d_hidden, config.d_model)
                self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)

            def logits(self, input_ids: torch.Tensor, keep=None) -> torch.Tensor:
                x = self.embed(input_ids)
                x = x + self.down(torch.relu(self.up(x)))
                out = self.head(x)
                return out if keep is None else out[:, keep]


        def build(config, tokenizer):
            return BigramMLP(config)
        ''',
    "tp_bigram/runner.py": '''
        """A stage runner that charges every step what FlopCounterMode measures on that step.

        It mirrors hmst_bench.train.loop.shared_loop and TrainContext.train_step, except that odd
        steps train on the first half of each window (so steps really differ in cost) and each
        step's forward+backward runs under ctx.meter.measure. Every step is also logged as a
        "measured" line, so the test can add the charges up.
        """

        from __future__ import annotations

        import contextlib

        from hmst_bench.train.loop import TrainError


        def run(ctx) -> None:
            if ctx.resuming:
                ctx.restore()
            else:
                fps = ctx.probe_flops(ctx.batches(0))  # full windows: the costliest step
                ctx.meter.flops_per_step = fps
                if ctx.budget.kind == "flops" and ctx.budget.amount < fps:
                    raise TrainError(f"budget {ctx.budget.text} is below one step ({fps:.3g} FLOPs)")
                ctx.plan(ctx.budget.steps_for(fps, ctx.tokens_per_step))
            while not ctx.should_stop:
                batches = ctx.batches(ctx.step)
                if ctx.step % 2 == 1:
                    half = max(1, ctx.recipe.seq_len // 2)
                    batches = [{k: v[:, :half].contiguous() for k, v in b.items()} for b in batches]
                n = len(batches)
                tokens = sum(int(b["input_ids"].numel()) for b in batches) * ctx.accelerator.num_processes
                aux_sum = {}

                def work():
                    total = 0.0
                    for i, b in enumerate(batches):
                        sync = contextlib.nullcontext() if i == n - 1 else ctx.accelerator.no_sync(ctx.wrapped)
                        with sync:
                            loss, aux = ctx.wrapped(b)
                            ctx.accelerator.backward(loss / n)
                        total += float(loss.detach()) / n
                        for k, v in aux.items():
                            aux_sum[k] = aux_sum.get(k, 0.0) + float(v) / n
                    return total

                loss, flops = ctx.meter.measure(work, ctx.model, batches)  # summed over ranks, extra_flops included
                ctx.optimizer_step(loss)
                ctx.after_step(loss, aux_sum, flops=flops, tokens=tokens)
                ctx.log(kind="measured", step_flops=flops, step_tokens=tokens)
        ''',
}

BROKEN_FILES = {
    "pyproject.toml": pyproject(BROKEN_DIST, "0.0.1", BROKEN_EP, "tp_broken"),
    "tp_broken/__init__.py": "",
    "tp_broken/plugin.py": """
        raise ImportError("tp_broken needs libfrobnicate, which is not installed")
        """,
}

DUP_FILES = {
    "pyproject.toml": pyproject(DUP_DIST, "1.0.0", DUP_EP, "tp_dup"),
    "tp_dup/__init__.py": "",
    "tp_dup/plugin.py": '''
        """Claims the name dense-llama, which hmst-bench-baselines already registers."""

        from dataclasses import dataclass

        from hmst_bench import ArchSpec, hookimpl


        @dataclass
        class Config:
            vocab_size: int = 300
            max_seq_len: int = 32


        def _build(config, tokenizer):
            raise NotImplementedError("never built: the name clash is refused first")


        @hookimpl
        def register_architectures(register):
            register(ArchSpec(name="dense-llama", description="an impostor", config_cls=Config,
                              sizes={"micro": {}}, build=_build))
        ''',
}


def _install(tmp_path_factory, name: str, files: dict[str, str], dist: str) -> Path:
    """Write the distribution's source and pip-install it into its own --target folder."""
    root = tmp_path_factory.mktemp(name)
    src, site = root / "src", root / "site"
    for rel, text in files.items():
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--no-cache-dir", "--disable-pip-version-check", "--quiet", "--target", str(site), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"pip install of {dist} failed:\n{proc.stdout}\n{proc.stderr}"
    assert list(site.glob("*.dist-info")), f"no dist-info in {site}"
    # installed into the target only: this process (the venv) cannot see it
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.distribution(dist)
    return site


@pytest.fixture(scope="module")
def good_site(tmp_path_factory) -> Path:
    return _install(tmp_path_factory, "good-dist", GOOD_FILES, GOOD_DIST)


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    return _install(tmp_path_factory, "broken-dist", BROKEN_FILES, BROKEN_DIST)


@pytest.fixture(scope="module")
def dup_site(tmp_path_factory) -> Path:
    return _install(tmp_path_factory, "dup-dist", DUP_FILES, DUP_DIST)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~300 kB of Python source in one text file (the last 2% of its lines are validation)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        size += len(text)
        if size > 300_000:
            break
    out = tmp_path_factory.mktemp("corpus") / "code.txt"
    out.write_text("".join(parts), encoding="utf-8")
    return out


def _env(*sites: Path, bench_home: Path | None = None, plugins: str = "", strict: str = "") -> dict:
    """Environment for a CLI subprocess with `sites` on PYTHONPATH (empty values mean unset)."""
    paths = [str(s) for s in sites]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    env = {"PYTHONPATH": os.pathsep.join(paths), "HMST_BENCH_PLUGINS": plugins, "HMST_BENCH_STRICT": strict}
    if bench_home is not None:
        env["HMST_BENCH_HOME"] = str(bench_home)
    return env


def _json(proc: subprocess.CompletedProcess):
    return json.loads(proc.stdout)


def _read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    info = json.loads((run_dir / "run.json").read_text())
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return info, lines


def _assert_one_line_error(proc: subprocess.CompletedProcess, *names: str, alone: bool = True) -> None:
    """A non-zero exit whose error is one `Error: ...` line naming `names`, with no traceback;
    `alone`: nothing else on stderr either."""
    assert proc.returncode != 0, f"expected failure, got exit 0\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected one final error line, got:\n{proc.stderr}"
    for name in names:
        assert name in errors[0], f"{name!r} not named in: {errors[0]}"
    if alone:
        assert lines == errors, f"expected only the error line on stderr, got:\n{proc.stderr}"


def _assert_budget(info: dict) -> None:
    assert info["status"] == "complete", info
    assert info["budget_kind"] == "flops"
    budget, achieved, per_step = info["budget_flops"], info["achieved_flops"], info["flops_per_step"]
    assert per_step and per_step > 0
    assert budget <= achieved < budget + per_step, (budget, achieved, per_step)


@pytest.fixture(scope="module")
def bigram_run(good_site, corpus, bench_home, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """tp-bigram trained once through the CLI; shared by the tests that inspect the run."""
    out = tmp_path_factory.mktemp("bigram-run") / "R"
    proc = run_cli("train", "--arch", "tp-bigram", "--size", "micro", "--budget", f"{BIGRAM_BUDGET:g}",
                   "--corpus", str(corpus), "--out", str(out), *QUIET, "--json",
                   env=_env(good_site, bench_home=bench_home))
    return out, proc


# ----------------------------------------------------------------------------- 1. a good plugin


def test_installed_plugin_is_listed_with_its_distribution(good_site):
    archs = {a["name"]: a for a in _json(run_cli("list", "archs", "--json", env=_env(good_site)))}
    for name in ("tp-bigram", "tp-bigram-metered"):
        assert archs[name]["distribution"] == GOOD_DIST
        assert archs[name]["sizes"] == ["micro", "tiny"]
    assert archs["tp-bigram"]["description"] == "Third-party bigram + MLP LM (shared loop)"
    assert archs["dense-llama"]["distribution"] == BASELINES_DIST  # the baselines are still there

    plugins = {p["name"]: p for p in _json(run_cli("plugins", "--json", env=_env(good_site)))}
    record = plugins[GOOD_EP]
    assert record["status"] == "ok" and record["error"] is None
    assert record["distribution"] == GOOD_DIST and record["version"] == "0.3.1"
    assert record["architectures"] == ["tp-bigram", "tp-bigram-metered"]
    assert record["hooks"] == ["register_architectures"]


def test_the_plugin_passes_the_conformance_check(good_site):
    """What a plugin author runs on their own architecture: `hmst-bench check`."""
    proc = run_cli("check", "tp-bigram", env=_env(good_site))
    assert "PASS causality" in proc.stdout and "FAIL" not in proc.stdout
    assert "tp-bigram: 13 of 13 properties hold" in proc.stderr  # no KV cache declared: 13


def test_plugin_registration_does_not_import_torch(good_site):
    script = (
        "import sys\n"
        "from hmst_bench.plugins import get_registry\n"
        "assert 'tp-bigram' in get_registry().architectures()\n"
        "heavy = [m for m in ('torch', 'transformers', 'tp_bigram.model') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **_env(good_site)})
    assert proc.returncode == 0, proc.stderr


def test_third_party_arch_trains_to_budget(bigram_run):
    out, proc = bigram_run
    info, lines = _read_run(out)
    assert _json(proc)["status"] == "complete"
    _assert_budget(info)
    assert info["arch"] == "tp-bigram" and info["size"] == "micro"
    assert info["distribution"] == GOOD_DIST
    assert info["versions"].get(GOOD_DIST) == "0.3.1"
    assert info["config"]["vocab_size"] == 300 and info["config"]["max_seq_len"] == 32
    assert info["config"]["d_hidden"] == 64  # the derived field is recorded
    assert info["steps"] >= 2
    assert info["achieved_flops"] == pytest.approx(info["steps"] * info["flops_per_step"])
    assert math.isfinite(info["final_train_loss"]) and math.isfinite(info["val_loss"])
    assert any(line.get("kind") == "train" for line in lines)
    for name in ("model.safetensors", "model_config.json", "tokenizer.json"):
        assert (out / name).exists(), name


LOAD_SCRIPT = r"""
import json, math, sys
import torch
from safetensors.torch import load_file
import hmst_bench
from hmst_bench.data.corpora import load_corpus
from hmst_bench.data.tokens import encode_corpus

run_dir = sys.argv[1]
run = hmst_bench.load_run(run_dir)
model, info = run.model, run.info
assert type(model).__module__ == "tp_bigram.model", type(model)
assert not model.training

# the weights are exactly the saved ones, and they are trained (not a fresh initialisation)
saved = load_file(run_dir + "/model.safetensors")
state = model.state_dict()
assert set(state) == set(saved), (sorted(state), sorted(saved))
assert all(torch.equal(state[k], saved[k]) for k in state)
torch.manual_seed(info["seed"])
fresh = run.spec.build(run.config, run.tokenizer)
assert not all(torch.equal(fresh.state_dict()[k], state[k]) for k in state)

# the log-probs are a distribution and agree with each other
V = run.config.vocab_size
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, V, (3, 32), generator=g)
with torch.no_grad():
    tlp = model.token_logprobs(ids[:, :-1], ids[:, 1:])
    nlp = model.next_token_logprobs(ids[:, :-1])
assert tlp.shape == (3, 31) and torch.isfinite(tlp).all() and (tlp <= 0).all()
assert nlp.shape == (3, V) and torch.isfinite(nlp).all()
assert float((torch.logsumexp(nlp, dim=-1)).abs().max()) < 1e-5
assert torch.allclose(nlp.gather(-1, ids[:, -1:]).squeeze(-1), tlp[:, -1], atol=1e-5)

# the loaded model reproduces the validation loss measured at the end of training
data = encode_corpus(load_corpus(info["corpus_spec"]), run.tokenizer)
t = info["training"]
nats, count = 0.0, 0
with torch.no_grad():
    for b in data.val_batches(t["seq_len"], t["batch_size"], 32768):
        mask = b["labels"] != -100
        lp = model.token_logprobs(b["input_ids"], b["labels"])
        nats -= float(lp[mask].sum())
        count += int(mask.sum())
val_loss = nats / count
assert abs(val_loss - info["val_loss"]) < 1e-5, (val_loss, info["val_loss"])
print(json.dumps({"val_loss": val_loss, "generated": model.generate(ids[:1, :4], 5)}))
"""


def test_load_run_gives_the_trained_model(bigram_run, good_site, bench_home):
    out, _ = bigram_run
    env = {**os.environ, **_env(good_site, bench_home=bench_home)}
    proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(out)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["generated"][0]) == 5


def test_run_from_a_missing_plugin_is_refused(bigram_run):
    """Without the distribution installed, load_run says which architecture is missing."""
    out, _ = bigram_run
    script = "import sys, hmst_bench\nhmst_bench.load_run(sys.argv[1])\n"
    proc = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HMST_BENCH_PLUGINS": "", "HMST_BENCH_STRICT": ""})
    assert proc.returncode != 0
    assert "tp-bigram" in proc.stderr.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- 2. its own stage runner


def test_stage_runner_measuring_every_step(good_site, corpus, tmp_path):
    out = tmp_path / "R"
    proc = run_cli("train", "--arch", "tp-bigram-metered", "--size", "micro", "--budget", f"{BIGRAM_BUDGET:g}",
                   "--corpus", str(corpus), "--out", str(out), *QUIET, "--json", env=_env(good_site))
    assert _json(proc)["status"] == "complete"
    info, lines = _read_run(out)
    _assert_budget(info)
    assert info["arch"] == "tp-bigram-metered"
    assert any(line.get("kind") == "train" for line in lines)

    measured = [line for line in lines if line.get("kind") == "measured"]
    assert [m["step"] for m in measured] == list(range(1, info["steps"] + 1))
    step_flops = [m["step_flops"] for m in measured]
    # every step was charged what it cost: full-window steps and half-window steps differ
    assert len(set(step_flops)) == 2 and max(step_flops) == info["flops_per_step"]
    assert min(step_flops) < 0.75 * max(step_flops)
    assert sum(step_flops) == pytest.approx(info["achieved_flops"], rel=1e-12)
    assert sum(m["step_tokens"] for m in measured) == info["tokens"]
    assert info["achieved_flops"] < info["steps"] * info["flops_per_step"]  # not a fixed charge per step
    assert sum(step_flops[:-1]) < info["budget_flops"]  # it stopped at the first step reaching the budget


# ----------------------------------------------------------------------------- 3. a broken plugin


def test_broken_plugin_is_reported_not_fatal(good_site, broken_site, corpus, tmp_path):
    env = _env(broken_site, good_site)
    rows = _json(run_cli("plugins", "--json", env=env))
    failed = [r for r in rows if r["name"] == BROKEN_EP]
    assert len(failed) == 1
    assert failed[0]["status"] == "failed"
    assert failed[0]["distribution"] == BROKEN_DIST
    assert "ImportError" in failed[0]["error"] and "libfrobnicate" in failed[0]["error"]
    ok = {r["name"] for r in rows if r["status"] == "ok"}
    assert {"baselines", GOOD_EP} <= ok

    archs = {a["name"] for a in _json(run_cli("list", "archs", "--json", env=env))}
    assert {"dense-llama", "tp-bigram"} <= archs

    out = tmp_path / "R2"
    run_cli("train", "--arch", "dense-llama", "--size", "micro", "--budget", LLAMA_BUDGET, "--corpus", str(corpus),
            "--out", str(out), *QUIET, env=env)
    info, _ = _read_run(out)
    _assert_budget(info)


@pytest.mark.parametrize(
    "how, args",
    [
        ("env", ("list", "archs")),
        ("env", ("train", "--arch", "dense-llama", "--size", "micro", "--budget", LLAMA_BUDGET)),
        ("flag", ("list", "archs")),
        ("flag", ("train", "--arch", "dense-llama", "--size", "micro", "--budget", LLAMA_BUDGET)),
    ],
)
def test_strict_mode_fails_on_broken_plugin(how, args, good_site, broken_site, tmp_path):
    args = (*args, "--out", str(tmp_path / "R")) if args[0] == "train" else args
    if how == "env":
        proc = run_cli(*args, env=_env(broken_site, good_site, strict="1"), check=False)
    else:
        proc = run_cli("--strict", *args, env=_env(broken_site, good_site), check=False)
    _assert_one_line_error(proc, BROKEN_EP, BROKEN_DIST, "ImportError")
    assert not (tmp_path / "R").exists()


def test_strict_mode_passes_without_broken_plugin(good_site):
    archs = {a["name"] for a in _json(run_cli("--strict", "list", "archs", "--json", env=_env(good_site)))}
    assert "tp-bigram" in archs


# ----------------------------------------------------------------------------- 4. a name clash


def test_duplicate_architecture_names_both_distributions(dup_site, corpus, tmp_path):
    env = _env(dup_site)
    rows = _json(run_cli("plugins", "--json", env=env))
    errors = [r["error"] for r in rows if r["status"] == "failed"]
    assert any(BASELINES_DIST in e and DUP_DIST in e and "dense-llama" in e for e in errors), rows

    # neither claimant wins silently
    archs = {a["name"] for a in _json(run_cli("list", "archs", "--json", env=env))}
    assert "dense-llama" not in archs and "dense-gpt2" in archs

    proc = run_cli("train", "--arch", "dense-llama", "--size", "micro", "--budget", LLAMA_BUDGET,
                   "--corpus", str(corpus), "--out", str(tmp_path / "clash"), env=env, check=False)
    _assert_one_line_error(proc, "dense-llama", BASELINES_DIST, DUP_DIST, alone=False)  # see the next test
    assert not (tmp_path / "clash" / "run.json").exists()

    # choosing the baselines' entry point resolves the clash
    out = tmp_path / "R"
    run_cli("train", "--arch", "dense-llama", "--size", "micro", "--budget", LLAMA_BUDGET, "--corpus", str(corpus),
            "--out", str(out), *QUIET, env=_env(dup_site, plugins="baselines"))
    info, _ = _read_run(out)
    _assert_budget(info)
    assert info["distribution"] == BASELINES_DIST


def test_refused_train_prints_only_its_error(dup_site, corpus, tmp_path):
    """A train refused before its first step prints the error alone: no empty 0% progress bar."""
    proc = run_cli("train", "--arch", "dense-llama", "--size", "micro", "--budget", LLAMA_BUDGET,
                   "--corpus", str(corpus), "--out", str(tmp_path / "clash"), env=_env(dup_site), check=False)
    _assert_one_line_error(proc, "dense-llama", BASELINES_DIST, DUP_DIST)


# ----------------------------------------------------------------------------- 5. HMST_BENCH_PLUGINS


@pytest.mark.parametrize("only", [GOOD_EP, GOOD_DIST])
def test_plugin_selection_shows_only_the_chosen_plugin(only, good_site, broken_site, dup_site):
    env = _env(good_site, broken_site, dup_site, plugins=only)
    archs = _json(run_cli("list", "archs", "--json", env=env))
    assert sorted(a["name"] for a in archs) == ["tp-bigram", "tp-bigram-metered"]
    assert {a["distribution"] for a in archs} == {GOOD_DIST}
    rows = _json(run_cli("plugins", "--json", env=env))
    assert [(r["name"], r["status"]) for r in rows] == [(GOOD_EP, "ok")]  # the others were never imported
