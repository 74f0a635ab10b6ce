"""The experiment file: what to compare, at which budgets and seeds, on which data and suites.

Read with `tomllib` and validated field by field, so a mistake is one line naming the field and
the file. The format (docs/experiments.md has the full reference):

    name = "demo"                      # runs go to runs/<name>/, the report to results/<name>/
    baseline = "dense-llama"           # the label every other architecture is compared with
    corpus = "synthetic-facts"         # as `train --corpus`
    seq_len = 128
    size = "micro"                     # default size of every architecture
    budgets = ["1e11", "2e11"]         # as `train --budget`: FLOPs or tokens
    seeds = [0]
    all_archs = false                  # true: also every registered architecture not listed, at `size`
    [training]                         # optional recipe: batch_size, grad_accum, lr, warmup, mixed_precision
    [base]                             # optional: a pretrained base, trained once before the runs:
    arch = "dense-llama"               #   arch, budget, size; runs of archs with from_base = true
    budget = "3e13"                    #   start from it (`train --init-from runs/<name>/base`)
    [[archs]]                          # one entry per architecture (the same arch twice needs labels)
    arch = "hmst"                      # optional: label, size, set = {field = value}, processes,
    stages = {"1" = 0.75, "2" = 0.25}  #   stages with each one's share of every budget, from_base
    [suites.longctx]                   # optional: limit, num_fewshot, samples, k, temperature,
    limit = 20                         #   top_p, max_gen_toks, verify (factqa), metrics (reported), optional
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

RECIPE_KEYS = {"batch_size": int, "grad_accum": int, "lr": float, "warmup": int, "mixed_precision": str}
SUITE_KEYS = {"limit": int, "num_fewshot": int, "samples": int, "k": list, "temperature": float, "top_p": float,
              "max_gen_toks": int, "metrics": list, "optional": bool, "timeout": float, "verify": bool}
TOP_KEYS = {"name", "description", "baseline", "corpus", "seq_len", "size", "budgets", "seeds", "vocab_size",
            "training", "archs", "suites", "slurm", "all_archs", "base"}
ARCH_KEYS = {"arch", "label", "size", "set", "stages", "processes", "from_base"}
BASE_KEYS = {"arch", "budget", "size"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ExperimentError(ValueError):
    """A mistake in an experiment file or its plan; the message is one line naming the fix."""


@dataclass(frozen=True)
class ArchEntry:
    """One architecture of an experiment. `stages` maps stage name -> share of each budget."""

    label: str
    arch: str
    size: str
    sets: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)
    processes: int = 1
    from_base: bool = False  # runs start from the experiment's pretrained base (train --init-from)


@dataclass(frozen=True)
class Base:
    """The experiment's pretrained base: one run, trained before the others, that every
    `from_base` architecture starts from. Its compute is shared and not part of the comparison."""

    arch: str
    budget: str
    size: str


@dataclass(frozen=True)
class SuiteEntry:
    name: str
    options: dict = field(default_factory=dict)  # limit, num_fewshot, samples, k, ... as `eval` takes them
    metrics: tuple = ()  # the metrics the report compares (default: each task's first)
    optional: bool = False  # included only when its benchmark data is in the store


@dataclass(frozen=True)
class Experiment:
    name: str
    path: Path
    digest: str  # sha256 of the file's bytes
    baseline: str
    corpus: str
    seq_len: int
    budgets: tuple
    seeds: tuple
    archs: tuple  # ArchEntry
    suites: tuple  # SuiteEntry
    training: dict = field(default_factory=dict)
    vocab_size: Optional[int] = None
    description: str = ""
    slurm: dict = field(default_factory=dict)
    size: str = "tiny"
    all_archs: bool = False
    base: Optional[Base] = None

    def arch(self, label: str) -> ArchEntry:
        return next(a for a in self.archs if a.label == label)


def load(path: str | Path) -> Experiment:
    """Read and validate an experiment file (ExperimentError: one line naming the problem)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        data = tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ExperimentError(f"{path} does not exist; give an experiment file (see experiments/demo.toml)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ExperimentError(f"cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ExperimentError(f"{path} is not valid TOML: {exc}") from None
    return parse(data, path, hashlib.sha256(raw).hexdigest())


def parse(data: dict, path: Path, digest: str = "") -> Experiment:
    where = str(path)
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise ExperimentError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(sorted(TOP_KEYS))}")
    name = _get(data, "name", str, where)
    if not NAME_RE.match(name):
        raise ExperimentError(f"{where}: name {name!r} must be letters, digits, '.', '_' or '-' (it names folders)")
    size = _get(data, "size", str, where, "tiny")
    base = _base(data["base"], size, where) if "base" in data else None
    archs = tuple(_arch(entry, i, size, where, base.size if base else None)
                  for i, entry in enumerate(_get(data, "archs", list, where)))
    if not archs:
        raise ExperimentError(f"{where}: [[archs]] is empty; list at least the baseline")
    orphan = next((a.label for a in archs if a.from_base and base is None), None)
    if orphan:
        raise ExperimentError(f"{where}: {orphan} has from_base = true but the file has no [base]; add [base] with arch and budget")
    labels = [a.label for a in archs]
    if "base" in labels and base is not None:
        raise ExperimentError(f"{where}: the label 'base' names the pretrained base's folder; label that [[archs]] entry otherwise")
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ExperimentError(f"{where}: two [[archs]] entries are labelled {dupes[0]!r}; give each a distinct label")
    baseline = _get(data, "baseline", str, where)
    if baseline not in labels:
        raise ExperimentError(f"{where}: baseline {baseline!r} is not one of the [[archs]] labels ({', '.join(labels)})")
    budgets = tuple(str(b) for b in _get(data, "budgets", list, where))
    seeds = tuple(_get(data, "seeds", list, where, [0]))
    if not budgets or not seeds:
        raise ExperimentError(f"{where}: budgets and seeds must each list at least one value")
    if len(set(budgets)) != len(budgets) or len(set(seeds)) != len(seeds):
        raise ExperimentError(f"{where}: budgets and seeds must not repeat a value")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ExperimentError(f"{where}: seeds must be non-negative integers, e.g. seeds = [0, 1, 2]")
    from hmst_bench.budget import BudgetError, parse_budget

    for b in budgets:
        try:
            parse_budget(b)
        except BudgetError as exc:
            raise ExperimentError(f"{where}: budget {b!r}: {exc}") from None
    training = dict(_get(data, "training", dict, where, {}))
    for key, value in training.items():
        if key not in RECIPE_KEYS:
            raise ExperimentError(f"{where}: [training] has no key {key!r}; known: {', '.join(RECIPE_KEYS)}")
        _typed(value, RECIPE_KEYS[key], f"[training] {key}", where)
    suites = tuple(_suite(n, opts, where) for n, opts in _get(data, "suites", dict, where, {}).items())
    seq_len = _get(data, "seq_len", int, where)
    if seq_len < 1:
        raise ExperimentError(f"{where}: seq_len must be positive")
    vocab = data.get("vocab_size")
    if vocab is not None:
        _typed(vocab, int, "vocab_size", where)
    return Experiment(name=name, path=path, digest=digest, baseline=baseline, corpus=_get(data, "corpus", str, where),
                      seq_len=seq_len, budgets=budgets, seeds=seeds, archs=archs, suites=suites, training=training,
                      vocab_size=vocab, description=_get(data, "description", str, where, ""),
                      slurm=dict(_get(data, "slurm", dict, where, {})), size=size,
                      all_archs=_get(data, "all_archs", bool, where, False), base=base)


def with_all_archs(exp: Experiment, registry) -> Experiment:
    """`all_archs = true`: add every registered architecture the file does not list (third
    parties' included), at the experiment's size, labelled by its name."""
    if not exp.all_archs:
        return exp
    listed = {a.arch for a in exp.archs} | {a.label for a in exp.archs}
    extra = tuple(ArchEntry(label=name, arch=name, size=exp.size) for name in sorted(registry.architectures())
                  if name not in listed)
    return dataclasses.replace(exp, archs=exp.archs + extra)


def _base(entry: Any, size: str, where: str) -> Base:
    if not isinstance(entry, dict):
        raise ExperimentError(f"{where}: [base] must be a table with arch and budget")
    unknown = sorted(set(entry) - BASE_KEYS)
    if unknown:
        raise ExperimentError(f"{where}: [base] has unknown key {unknown[0]!r}; known: {', '.join(sorted(BASE_KEYS))}")
    from hmst_bench.budget import BudgetError, parse_budget

    budget = _get(entry, "budget", str, f"{where} [base]")
    try:
        parse_budget(budget)
    except BudgetError as exc:
        raise ExperimentError(f"{where}: [base] budget {budget!r}: {exc}") from None
    return Base(arch=_get(entry, "arch", str, f"{where} [base]"), budget=budget, size=_get(entry, "size", str, where, size))


def _arch(entry: Any, index: int, size: str, where: str, base_size: Optional[str] = None) -> ArchEntry:
    at = f"[[archs]] #{index + 1}"
    if not isinstance(entry, dict):
        raise ExperimentError(f"{where}: {at} must be a table with arch = \"NAME\"")
    unknown = sorted(set(entry) - ARCH_KEYS)
    if unknown:
        raise ExperimentError(f"{where}: {at} has unknown key {unknown[0]!r}; known: {', '.join(sorted(ARCH_KEYS))}")
    arch = _get(entry, "arch", str, f"{where} {at}")
    label = _get(entry, "label", str, f"{where} {at}", arch)
    if not NAME_RE.match(label):
        raise ExperimentError(f"{where}: {at} label {label!r} must be letters, digits, '.', '_' or '-' (it names folders)")
    stages = dict(_get(entry, "stages", dict, f"{where} {at}", {}))
    for stage, share in stages.items():
        if not isinstance(share, (int, float)) or isinstance(share, bool) or share <= 0:
            raise ExperimentError(f"{where}: {at} stage {stage!r} needs a positive share of the budget, e.g. stages = {{\"1\" = 0.75, \"2\" = 0.25}}")
    if stages and abs(sum(stages.values()) - 1.0) > 1e-9:
        raise ExperimentError(f"{where}: {at} stage shares sum to {sum(stages.values()):g}; they must sum to 1")
    processes = _get(entry, "processes", int, f"{where} {at}", 1)
    if processes < 1:
        raise ExperimentError(f"{where}: {at} processes must be at least 1")
    sets = _get(entry, "set", dict, f"{where} {at}", {})
    from_base = _get(entry, "from_base", bool, f"{where} {at}", False)
    if from_base and "size" in entry:
        raise ExperimentError(f"{where}: {at} starts from the base, whose size it keeps; drop its size")
    return ArchEntry(label=label, arch=arch, size=base_size if from_base and base_size else _get(entry, "size", str, f"{where} {at}", size),
                     sets=dict(sets), stages=stages, processes=processes, from_base=from_base)


def _suite(name: str, opts: Any, where: str) -> SuiteEntry:
    if not isinstance(opts, dict):
        raise ExperimentError(f"{where}: [suites.{name}] must be a table (it may be empty)")
    unknown = sorted(set(opts) - set(SUITE_KEYS))
    if unknown:
        raise ExperimentError(f"{where}: [suites.{name}] has unknown key {unknown[0]!r}; known: {', '.join(SUITE_KEYS)}")
    for key, value in opts.items():
        _typed(value, SUITE_KEYS[key], f"[suites.{name}] {key}", where)
    options = {k: v for k, v in opts.items() if k not in ("metrics", "optional")}
    return SuiteEntry(name=name, options=options, metrics=tuple(opts.get("metrics", ())), optional=bool(opts.get("optional", False)))


def _get(data: dict, key: str, kind: type, where: str, default: Any = ...) -> Any:
    if key not in data:
        if default is ...:
            raise ExperimentError(f"{where}: missing {key!r}")
        return default
    return _typed(data[key], kind, key, where)


def _typed(value: Any, kind: type, what: str, where: str) -> Any:
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ExperimentError(f"{where}: {what} must be {kind.__name__ if kind is not dict else 'a table'}, got {value!r}")
    return value
