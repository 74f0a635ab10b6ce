"""From an experiment file to a plan: architectures x budgets x seeds as run directories, and for
each the steps it still needs (train, a later stage, resume, evaluate a suite, measure inference
cost). Everything that cannot run is refused here, before any training: an unknown architecture
(naming the known ones), a budget below one training step (naming the architecture and its
minimum, from a measured probe step), a suite whose data is not imported (naming the exact
`hmst-bench data import` command).

Layout of an experiment's folder (`runs/<name>/`, all of it hmst-bench's own):
    tokenizer/                 trained once, reused by every run (`train --tokenizer`)
    experiment.json            the resolved experiment: labels, baseline, suites (what `compare` reads)
    probe.json                 measured FLOPs and seconds per step of each architecture (cached)
    <label>/<budget>-s<seed>/  an ordinary run directory
    logs/<label>-<budget>-s<seed>.log

A finished step is recognised from the files it wrote (run.json status and stage, an eval file
whose options and model digest match), so re-running a finished experiment plans nothing.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hmst_bench.experiment.recorded import Recorded, key as run_key
from hmst_bench.experiment.spec import ExperimentError, Experiment, ArchEntry

COST_FILE = "inference-cost.json"  # RUN/eval/<this>: FLOPs per generated token (hmst_bench.report.cost)


@dataclass
class Step:
    kind: str  # "train" | "eval" | "cost"
    argv: list  # hmst-bench arguments (cost: [run dir])
    what: str  # shown in the plan, e.g. "train stage 1", "resume", "eval longctx"


@dataclass
class RunPlan:
    label: str
    arch: str
    budget: str
    seed: int
    out: Path
    log: Path
    stage_budgets: list  # [(stage or None, budget text)]
    processes: int = 1
    steps: list = field(default_factory=list)
    flops: float = 0.0  # planned training FLOPs (the budget; tokens x FLOPs per token for a token budget)
    seconds: Optional[float] = None  # estimated training wall time, from the probe
    recorded: bool = False  # done in the experiment's report, with no folder here (experiment/recorded.py)

    @property
    def key(self) -> str:
        return f"{self.label}/{self.budget}-s{self.seed}"


@dataclass
class Plan:
    experiment: Experiment
    root: Path
    runs: list
    suites: list  # SuiteEntry kept (data present)
    skipped_suites: list  # (name, reason): optional suites without data
    probes: dict  # label -> probe record
    base: Optional[RunPlan] = None  # the experiment's pretrained base, trained before the runs
    recorded: Optional[Recorded] = None  # runs done in the report folder (reused where no run folder is)

    @property
    def pending(self) -> list:
        return [r for r in self.runs if r.steps]


def budget_text(amount: float, kind: str) -> str:
    return f"{amount:.6g}" + ("tok" if kind == "tokens" else "")


def make_plan(exp: Experiment, registry, root: Path, probe: bool = True, recorded: Optional[Recorded] = None) -> Plan:
    """Validate the experiment against the registry and the store, prepare the shared tokenizer,
    and list every run with its remaining steps. `probe`: measure each architecture's step
    (needed to refuse budgets below one step and to estimate time; skipped when nothing trains).
    `recorded`: runs done in the report folder; one with no run folder here has nothing to do."""
    from hmst_bench.budget import parse_budget

    specs = _check_archs(exp, registry)
    suites, skipped = _check_suites(exp, registry)
    root = Path(root)
    tok_dir = root / "tokenizer"
    base = _base_plan(exp, registry, root, tok_dir) if exp.base else None
    if base is not None:
        specs = {**specs, "base": registry.arch(exp.base.arch)}  # "base" is no [[archs]] label (spec.py refuses it)
    runs = []
    for entry in exp.archs:
        spec = specs[entry.label]
        stages = _stages(entry, spec)
        for budget in exp.budgets:
            b = parse_budget(budget)
            for seed in exp.seeds:
                out = root / entry.label / f"{_safe(budget)}-s{seed}"
                stage_budgets = [(st, budget_text(b.amount * share, b.kind) if share != 1 else budget)
                                 for st, share in stages]
                run = RunPlan(label=entry.label, arch=entry.arch, budget=budget, seed=seed, out=out,
                              log=root / "logs" / f"{entry.label}-{_safe(budget)}-s{seed}.log",
                              stage_budgets=stage_budgets, processes=entry.processes)
                run.recorded = (recorded is not None and run_key(run.label, budget, seed) in recorded.keys
                                and not (out / "run.json").exists())
                run.steps = [] if run.recorded else _steps(exp, entry, run, suites, tok_dir)
                runs.append(run)
    if base is not None and not any(r.steps and exp.arch(r.label).from_base for r in runs):
        base.steps = []  # every run that starts from it is done: the base is not needed (not even retrained)
    plan = Plan(experiment=exp, root=root, runs=runs, suites=suites, skipped_suites=skipped, probes={}, base=base,
                recorded=recorded)
    if probe and any(s.kind == "train" for r in runs + ([base] if base else []) for s in r.steps):
        tok = shared_tokenizer(exp, specs["base"] if base is not None else specs[exp.baseline], tok_dir)
        _probe_all(plan, specs, tok)
    return plan


def _base_plan(exp: Experiment, registry, root: Path, tok_dir: Path) -> RunPlan:
    """The pretrained base's run (runs/<name>/base): trained like any run, never evaluated."""
    from hmst_bench.plugins import ArchitectureNotFound

    b = exp.base
    try:
        spec = registry.arch(b.arch)
    except ArchitectureNotFound:
        raise ExperimentError(f"{exp.path}: [base] arch {b.arch!r} is not registered; known: "
                              f"{', '.join(sorted(registry.architectures()))}") from None
    if b.size not in spec.sizes:
        raise ExperimentError(f"{exp.path}: [base] {b.arch} has no size {b.size!r}; sizes: {', '.join(spec.sizes)}")
    entry = ArchEntry(label="base", arch=b.arch, size=b.size)
    run = RunPlan(label="base", arch=b.arch, budget=b.budget, seed=0, out=root / "base", log=root / "logs" / "base.log",
                  stage_budgets=[(spec.stages[0] if spec.stages else None, b.budget)])
    info = read_json(run.out / "run.json")
    if info is not None:
        _check_matches(info, entry, run, exp)
    if info is None:
        run.steps = [Step("train", _fresh_argv(exp, entry, run, b.budget, None, tok_dir), "train the base")]
    elif info.get("status") != "complete":
        run.steps = [Step("train", ["train", "--resume", "--out", str(run.out)], "resume the base")]
    return run


def _safe(text: str) -> str:
    return text.replace("+", "").replace("/", "_")


def _check_archs(exp: Experiment, registry) -> dict:
    from hmst_bench.plugins import ArchitectureNotFound

    specs = {}
    for entry in exp.archs:
        try:
            spec = registry.arch(entry.arch)
        except ArchitectureNotFound:
            known = ", ".join(sorted(registry.architectures())) or "none (install a plugin)"
            raise ExperimentError(f"{exp.path}: unknown architecture {entry.arch!r} ([[archs]] {entry.label}); known: {known}") from None
        if entry.size not in spec.sizes:
            raise ExperimentError(f"{exp.path}: {entry.label}: {entry.arch} has no size {entry.size!r}; sizes: {', '.join(spec.sizes)}")
        from hmst_bench.arch import ConfigError

        try:
            spec.make_config(entry.size, _typed_sets(entry, spec))
        except (ConfigError, TypeError, ValueError) as exc:
            raise ExperimentError(f"{exp.path}: {entry.label}: {exc}") from None
        if entry.from_base and entry.arch != exp.base.arch and spec.base_from_run is None:
            raise ExperimentError(f"{exp.path}: {entry.label}: {entry.arch} cannot start from a {exp.base.arch} base "
                                  "(only its own architecture, or one that declares base_from_run); drop from_base")
        specs[entry.label] = spec
    return specs


def _typed_sets(entry: ArchEntry, spec) -> dict:
    """`set = {field = value}` through the same parser as `train --set FIELD=VALUE`."""
    from hmst_bench.arch import parse_override

    return dict(parse_override(f"{k}={_set_text(v)}", spec.config_cls) for k, v in entry.sets.items())


def _set_text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _stages(entry: ArchEntry, spec) -> list:
    """[(stage, share)]: the entry's stages in the architecture's order, or its first stage."""
    if not spec.stages:
        if entry.stages:
            raise ExperimentError(f"{entry.label}: {entry.arch} trains in a single stage; drop stages")
        return [(None, 1.0)]
    if not entry.stages:
        return [(spec.stages[0], 1.0)]
    unknown = [s for s in entry.stages if s not in spec.stages]
    if unknown:
        raise ExperimentError(f"{entry.label}: {entry.arch} has stages {', '.join(spec.stages)}, not {unknown[0]!r}")
    order = [s for s in spec.stages if s in entry.stages]
    if order[0] != spec.stages[0]:
        raise ExperimentError(f"{entry.label}: stages must start with {spec.stages[0]!r} (a later stage continues an earlier one)")
    return [(s, float(entry.stages[s])) for s in order]


def _check_suites(exp: Experiment, registry) -> tuple[list, list]:
    from hmst_bench.eval.store import StoreError, require

    known = registry.suites()
    kept, skipped = [], []
    for suite in exp.suites:
        if suite.name not in known:
            listing = ", ".join(n for n in known if not n.startswith("mmlu_"))
            raise ExperimentError(f"{exp.path}: unknown suite {suite.name!r}; known: {listing} (and mmlu_<subject>)")
        try:
            for name in known[suite.name].data:
                require(name)
        except StoreError as exc:
            if suite.optional:
                skipped.append((suite.name, "its data is not imported"))
                continue
            raise ExperimentError(f"suite {suite.name}: {exc}") from None
        kept.append(suite)
    return kept, skipped


# --------------------------------------------------------------------------- steps of one run


def _steps(exp: Experiment, entry: ArchEntry, run: RunPlan, suites: list, tok_dir: Path) -> list:
    info = read_json(run.out / "run.json")
    steps = []
    stages = [st for st, _ in run.stage_budgets]
    if info is not None:
        _check_matches(info, entry, run, exp)
    finished = done_stages(info)
    for i, (stage, budget) in enumerate(run.stage_budgets):
        key = stage or ""
        if key in finished:
            continue
        if info is not None and (info.get("stage") or "") == key:
            steps.append(Step("train", ["train", "--resume", "--out", str(run.out)], f"resume {_stage_name(stage)}".strip()))
        elif i == 0:
            steps.append(Step("train", _fresh_argv(exp, entry, run, budget, stage, tok_dir), f"train {_stage_name(stage)}".strip()))
        else:
            steps.append(Step("train", ["train", "--stage", stage, "--budget", budget, "--out", str(run.out)], f"train {_stage_name(stage)}"))
    final_done = (stages[-1] or "") in finished
    digest = _weights_digest(run.out) if final_done else None
    for suite in suites:
        if final_done and _eval_done(run.out / "eval" / f"{suite.name}.json", suite, digest):
            continue
        steps.append(Step("eval", _eval_argv(run.out, suite), f"eval {suite.name}"))
    if not (final_done and _cost_done(run.out, digest)):
        steps.append(Step("cost", [str(run.out)], "inference cost"))
    return steps


def _stage_name(stage: Optional[str]) -> str:
    return f"stage {stage}" if stage else ""


def _fresh_argv(exp: Experiment, entry: ArchEntry, run: RunPlan, budget: str, stage, tok_dir: Path) -> list:
    if entry.from_base:  # the base's size, window, corpus and tokenizer carry over
        argv = ["train", "--arch", entry.arch, "--init-from", str(run.out.parent.parent / "base"), "--budget", budget,
                "--seed", str(run.seed), "--out", str(run.out)]
    else:
        argv = ["train", "--arch", entry.arch, "--size", entry.size, "--budget", budget, "--seed", str(run.seed),
                "--seq-len", str(exp.seq_len), "--corpus", exp.corpus, "--tokenizer", str(tok_dir), "--out", str(run.out)]
    for key, value in exp.training.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    for key, value in entry.sets.items():
        argv += ["--set", f"{key}={_set_text(value)}"]
    if stage:
        argv += ["--stage", stage]
    return argv


def _eval_argv(out: Path, suite) -> list:
    argv = ["eval", "--run", str(out), "--suite", suite.name]
    for key, value in suite.options.items():
        flag = {"k": "--k"}.get(key, f"--{key.replace('_', '-')}")
        if isinstance(value, bool):  # an on/off flag (verify)
            argv += [flag] if value else []
            continue
        argv += [flag, ",".join(str(v) for v in value) if isinstance(value, list) else str(value)]
    return argv


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def done_stages(info: Optional[dict]) -> set:
    if info is None:
        return set()
    done = set(info.get("stages") or {})  # earlier stages kept in the record
    if info.get("status") == "complete":
        done.add(info.get("stage") or "")
    return done


def _check_matches(info: dict, entry: ArchEntry, run: RunPlan, exp: Experiment) -> None:
    """A run folder from an earlier version of the experiment file is not silently reused."""
    first_budget = run.stage_budgets[0][1]
    stage_record = (info.get("stages") or {}).get(run.stage_budgets[0][0] or "", {}) if run.stage_budgets[0][0] else {}
    recorded_budget = stage_record.get("budget") or info.get("budget")
    have = {"arch": info.get("arch"), "size": info.get("size"), "seed": info.get("seed"),
            "seq_len": (info.get("training") or {}).get("seq_len"), "budget": recorded_budget}
    want = {"arch": entry.arch, "size": entry.size, "seed": run.seed, "seq_len": exp.seq_len, "budget": first_budget}
    for key in want:
        if have[key] is not None and str(have[key]) != str(want[key]):
            raise ExperimentError(f"{run.out} was trained with {key} {have[key]}, but {exp.path} now asks for {want[key]}; "
                                  "give the experiment a new name, or move that run away")


def _weights_digest(out: Path) -> Optional[str]:
    from hmst_bench.eval.runner import model_fingerprint

    try:
        return model_fingerprint(out).get("model_sha256")
    except (OSError, ValueError):
        return None


def _eval_done(path: Path, suite, digest: Optional[str]) -> bool:
    record = read_json(path)
    if record is None or digest is None:
        return False
    prov = record.get("provenance") or {}
    if prov.get("model_sha256") != digest:
        return False
    opts = suite.options
    if prov.get("limit") != opts.get("limit") or prov.get("num_fewshot") != opts.get("num_fewshot"):
        return False
    if bool(prov.get("verification")) != bool(opts.get("verify")):
        return False
    code = prov.get("code_execution") or {}
    return not ("samples" in opts and code.get("samples") != opts["samples"])


def _cost_done(out: Path, digest: Optional[str]) -> bool:
    record = read_json(out / "eval" / COST_FILE)
    return record is not None and digest is not None and record.get("model_sha256") == digest


# --------------------------------------------------------------------------- tokenizer and probe


def shared_tokenizer(exp: Experiment, baseline_spec, tok_dir: Path):
    """The experiment's one tokenizer: trained on the corpus once (cached), saved in tok_dir."""
    from hmst_bench.data.corpora import CorpusError, load_corpus
    from hmst_bench.data.tokenizer import TokenizerError, load_tokenizer, save_tokenizer, train_tokenizer

    if (tok_dir / "tokenizer.json").exists():
        try:
            return load_tokenizer(tok_dir)
        except TokenizerError as exc:
            raise ExperimentError(f"{tok_dir}: {exc}; remove that folder to train the tokenizer again") from None
    try:
        corpus = load_corpus(exp.corpus)
        vocab = exp.vocab_size or baseline_spec.make_config(exp.arch(exp.baseline).size).vocab_size
        tok = train_tokenizer(corpus.split["train"], vocab, cache_key=corpus.fingerprint)
    except (CorpusError, TokenizerError) as exc:
        raise ExperimentError(f"{exp.path}: corpus {exp.corpus}: {exc}") from None
    save_tokenizer(tok, tok_dir)
    return tok


def _probe_all(plan: Plan, specs: dict, tok) -> None:
    from hmst_bench.budget import parse_budget
    from hmst_bench.data.tokenizer import tokenizer_hash
    from hmst_bench.train.loop import round_up
    from hmst_bench.util import atomic_write_json

    exp = plan.experiment
    cache_path = plan.root / "probe.json"
    cache = read_json(cache_path) or {}
    base_done = plan.base is not None and bool(done_stages(read_json(plan.base.out / "run.json")))
    for entry in exp.archs:
        if entry.from_base and not base_done:
            continue  # probed once the base exists (its weights are part of the model)
        key = json.dumps([entry.arch, entry.size, entry.sets, exp.seq_len, exp.training, tokenizer_hash(tok),
                          entry.from_base], sort_keys=True)
        if cache.get(entry.label, {}).get("key") != key:
            cache[entry.label] = {"key": key, **probe_step(specs[entry.label], entry, exp, tok, plan.root / "base")}
        plan.probes[entry.label] = cache[entry.label]
    if plan.base is not None:
        b = ArchEntry(label="base", arch=exp.base.arch, size=exp.base.size)
        key = json.dumps([b.arch, b.size, exp.seq_len, exp.training, tokenizer_hash(tok)], sort_keys=True)
        if cache.get("base", {}).get("key") != key:
            cache["base"] = {"key": key, **probe_step(specs["base"], b, exp, tok)}
        plan.probes["base"] = cache["base"]
    atomic_write_json(cache_path, cache)
    for run in plan.runs + ([plan.base] if plan.base is not None else []):
        probe = plan.probes.get(run.label)
        b = parse_budget(run.budget)
        if probe is None:  # starts from a base not trained yet: FLOPs known for a FLOPs budget, time not
            run.flops = b.amount if b.kind == "flops" else 0.0
            continue
        flops = b.amount if b.kind == "flops" else b.amount * probe["flops_per_token"]
        run.flops = flops
        run.seconds = flops / probe["flops_per_step"] * probe["seconds_per_step"]
        if not any(s.kind == "train" for s in run.steps):
            continue
        stage, first = run.stage_budgets[0]
        fb = parse_budget(first)
        need = probe["flops_per_step"] if fb.kind == "flops" else probe["tokens_per_step"]
        if fb.amount < need:
            unit = "" if fb.kind == "flops" else "tok"
            share = "" if first == run.budget else f" ({first} for stage {stage})"
            minimum = need * (b.amount / fb.amount)
            raise ExperimentError(f"budget {run.budget}{share} is below one training step of {run.label} ({run.arch}: "
                                  f"{need:.3g}{unit} per step at batch {probe['batch_size']} x seq {exp.seq_len}); "
                                  f"use budgets of {round_up(minimum)}{unit} or more")


def probe_step(spec, entry: ArchEntry, exp: Experiment, tok, base: Optional[Path] = None) -> dict:
    """Measured FLOPs of one training step (forward and backward, as the trainer counts them) and
    its wall time on this machine (median of 3 after a warm-up), on a real batch of the corpus.
    A `from_base` entry is built on the trained `base` run, as `train --init-from` builds it."""
    import time

    import torch

    from hmst_bench.budget import count_flops, model_extra_flops
    from hmst_bench.data.corpora import load_corpus
    from hmst_bench.data.tokens import encode_corpus
    from hmst_bench.model import ContractError, check_built
    from hmst_bench.train.context import LossModule, Recipe, make_optimizer

    # as the trainer does: replace() re-derives the fields that depend on these two
    sets = _typed_sets(entry, spec)
    if entry.from_base and spec.base_from_run is not None:
        sets = {**spec.base_from_run(base.resolve()), **sets}
    config = dataclasses.replace(spec.make_config(entry.size, sets), vocab_size=len(tok), max_seq_len=exp.seq_len)
    recipe = Recipe(**{**exp.training, "seq_len": exp.seq_len, "seed": exp.seeds[0]})
    data = encode_corpus(load_corpus(exp.corpus), tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = spec.build(config, tok)
        try:
            check_built(spec, model)
        except ContractError as exc:
            raise ExperimentError(str(exc)) from None
        model.prepare(data.train)
        model.train()
        wrapped = LossModule(model)
        optimizer = make_optimizer(model, recipe)
        batches = [data.batch(recipe.seed, 0, m, 0, recipe.batch_size, recipe.seq_len, recipe.grad_accum, 1)
                   for m in range(recipe.grad_accum)]

        def step():
            for b in batches:
                loss, _ = wrapped(b)
                (loss / len(batches)).backward()

        _, flops = count_flops(step)
        flops += sum(model_extra_flops(model, b) for b in batches)
        optimizer.zero_grad(set_to_none=True)
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            step()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    tokens = recipe.batch_size * recipe.seq_len * recipe.grad_accum
    return {"flops_per_step": float(flops), "tokens_per_step": tokens, "flops_per_token": float(flops) / tokens,
            "seconds_per_step": sorted(times[1:])[1], "batch_size": recipe.batch_size}
