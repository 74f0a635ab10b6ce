"""The comparison: from the runs and items tables (`collect`) to every number a report shows.

- metrics: each label x budget x unit x metric with its 95% CI. A unit is a suite's top-level
  group (items pooled over its tasks, clustered by task) or a task (clustered by the item's own
  cluster, e.g. a factqa entity); several seeds are pooled per item (the item's mean over seeds)
  before the CLT, so seed noise is part of the item variance;
- per_seed: the same for each seed alone (table.csv's rows), plus validation loss and bits per byte;
- paired: each label minus the baseline at the same budget on the same items (matched by task, item
  and document hash, seeds paired), with the test `stats.paired_diff` picks, Holm-corrected over the
  whole report, and its minimum detectable effect; ECE by a paired bootstrap where confidences exist;
- scaling: L(C) fits per label (3 or more budgets) and compute multipliers against the baseline,
  per seed, combined over seeds as a geometric mean with its CI.
Definitions: docs/metrics.md, "Comparisons".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from hmst_bench.report import scaling, stats
from hmst_bench.report.collect import CompareError

MAX_LEAVES = 8  # a group with at most this many tasks also gets a row per task (longctx's lengths; not MMLU's 57)
ALPHA = 0.05
N_BOOT = 1000


@dataclass
class Comparison:
    baseline: str
    runs: pd.DataFrame
    metrics: pd.DataFrame
    per_seed: pd.DataFrame
    paired: pd.DataFrame
    scaling: pd.DataFrame  # label, budget, achieved_flops, val_loss, multiplier, lo, hi, extrapolated, seeds
    fits: dict = field(default_factory=dict)  # label -> scaling.PowerLaw or None
    mismatches: list = field(default_factory=list)
    missing: list = field(default_factory=list)  # (label, budget, seed, suite): runs without that suite's results


def compare(runs: pd.DataFrame, items: pd.DataFrame, baseline: str, metrics_by_suite: dict | None = None,
            mismatches: list | None = None) -> Comparison:
    if baseline not in set(runs["label"]):
        raise CompareError(f"baseline {baseline!r} is not among the runs' labels ({', '.join(sorted(set(runs['label'])))}); "
                           "pass --baseline LABEL")
    runs = runs.sort_values(["label", "achieved_flops", "seed"], kind="stable").reset_index(drop=True)
    items = items.merge(runs[["run", "label", "budget", "seed"]], on="run", how="inner")
    items = _chosen_metrics(items, metrics_by_suite or {})
    units = _units(items)
    metrics = _metric_table(runs, units)
    per_seed = _per_seed_table(runs, units)
    paired = _paired_table(units, baseline)
    scale, fits = _scaling(runs, baseline)
    missing = _missing(runs, items)
    return Comparison(baseline, runs, metrics, per_seed, paired, scale, fits, list(mismatches or []), missing)


def _chosen_metrics(items: pd.DataFrame, chosen: dict) -> pd.DataFrame:
    """The metrics a report compares: the experiment's `metrics` for a suite, else its first."""
    keep = []
    for suite, df in items.groupby("suite", sort=False):
        names = list(chosen.get(suite) or []) or [df["metric"].iloc[0]]
        keep.append(df[df["metric"].isin(names)])
    return pd.concat(keep, ignore_index=True) if keep else items.iloc[0:0]


def _units(items: pd.DataFrame) -> pd.DataFrame:
    """Items labelled with the unit they are reported under: the group (clustered by task) and,
    for small groups and plain tasks, the task itself (clustered by the item's cluster)."""
    parts = []
    leaves = items.groupby("group")["task"].nunique()
    grouped = items[items["group"] != items["task"]]
    if len(grouped):
        parts.append(grouped.assign(unit=grouped["group"], unit_cluster=grouped["task"]))
    small = items[(items["group"] == items["task"]) | items["group"].map(lambda g: leaves.get(g, 1) <= MAX_LEAVES)]
    parts.append(small.assign(unit=small["task"], unit_cluster=small["cluster"]))
    out = pd.concat(parts, ignore_index=True)
    out["key"] = out["task"] + "\0" + out["item"]
    return out


def _clusters(df: pd.DataFrame):
    c = df["unit_cluster"]
    return None if c.isna().all() else c.fillna("").astype(str).to_numpy()


def _pool_seeds(df: pd.DataFrame) -> pd.DataFrame:
    """Per item: its mean score over seeds (and mean confidence)."""
    return (df.groupby("key", sort=True)
              .agg(score=("score", "mean"), confidence=("confidence", "mean"), unit_cluster=("unit_cluster", "first"),
                   doc_hash=("doc_hash", "first"))
              .reset_index())


def _metric_table(runs: pd.DataFrame, units: pd.DataFrame) -> pd.DataFrame:
    flops = runs.groupby(["label", "budget"])["achieved_flops"].mean()
    rows = []
    for (label, budget, suite, unit, metric), df in units.groupby(["label", "budget", "suite", "unit", "metric"], sort=False):
        pooled = _pool_seeds(df)
        est = stats.mean_ci(pooled["score"].to_numpy(), _clusters(pooled))
        rows.append({"label": label, "budget": budget, "achieved_flops": flops[(label, budget)], "suite": suite,
                     "task": unit, "metric": metric, "value": est.value, "se": est.se, "lo": est.lo, "hi": est.hi,
                     "n": est.n, "seeds": df["seed"].nunique(), "method": est.method})
    for (label, budget), df in runs.groupby(["label", "budget"], sort=False):
        for metric in ("val_loss", "val_bpb"):
            est = stats.seeds_ci(df[metric].to_numpy(dtype=float))
            rows.append({"label": label, "budget": budget, "achieved_flops": flops[(label, budget)], "suite": "validation",
                         "task": "validation", "metric": metric, "value": est.value, "se": est.se, "lo": est.lo,
                         "hi": est.hi, "n": est.n, "seeds": len(df), "method": est.method})
    out = pd.DataFrame(rows)
    return out.sort_values(["suite", "task", "metric", "label", "achieved_flops"], kind="stable").reset_index(drop=True)


COST_COLUMNS = ["achieved_flops", "tokens", "params_total", "params_active", "train_tokens_per_s", "infer_flops_per_token"]


def _per_seed_table(runs: pd.DataFrame, units: pd.DataFrame) -> pd.DataFrame:
    """table.csv: one row per label x budget x seed x metric, with the run's cost columns."""
    rows = []
    by_run = runs.set_index("run")
    for (run, suite, unit, metric), df in units.groupby(["run", "suite", "unit", "metric"], sort=False):
        est = stats.mean_ci(df["score"].to_numpy(), _clusters(df))
        rows.append({"run": run, "suite": suite, "task": unit, "metric": metric, "value": est.value, "se": est.se,
                     "lo": est.lo, "hi": est.hi, "n": est.n})
    for run, r in by_run.iterrows():
        for metric in ("val_loss", "val_bpb"):
            rows.append({"run": run, "suite": "validation", "task": "validation", "metric": metric, "value": r[metric],
                         "se": math.nan, "lo": math.nan, "hi": math.nan, "n": math.nan})
    table = pd.DataFrame(rows).merge(runs[["run", "label", "arch", "budget", "seed", *COST_COLUMNS]], on="run")
    cols = ["label", "arch", "budget", "seed", "suite", "task", "metric", "value", "se", "lo", "hi", "n", *COST_COLUMNS]
    return table[cols].sort_values(["label", "achieved_flops", "seed", "suite", "task", "metric"], kind="stable").reset_index(drop=True)


def _paired_table(units: pd.DataFrame, baseline: str) -> pd.DataFrame:
    rows = []
    base = units[units["label"] == baseline]
    for (label, budget, suite, unit, metric), df in units[units["label"] != baseline].groupby(
            ["label", "budget", "suite", "unit", "metric"], sort=False):
        ref = base[(base["budget"] == budget) & (base["unit"] == unit) & (base["metric"] == metric)]
        seeds = sorted(set(df["seed"]) & set(ref["seed"]))
        if not seeds:
            continue
        a = _pool_seeds(df[df["seed"].isin(seeds)])
        b = _pool_seeds(ref[ref["seed"].isin(seeds)])
        both = a.merge(b, on="key", suffixes=("", "_base"))
        if len(both) == 0:
            continue
        clash = both["doc_hash"].notna() & both["doc_hash_base"].notna() & (both["doc_hash"] != both["doc_hash_base"])
        if clash.any():
            raise CompareError(f"{suite} {unit}: {label} and {baseline} at {budget} scored different documents under "
                               f"the same ids ({both.loc[clash, 'key'].iloc[0].split(chr(0))[1]}); evaluate them on the same data")
        clusters = _clusters(both)
        p = stats.paired_diff(both["score"].to_numpy(), both["score_base"].to_numpy(), clusters)
        rows.append(_paired_row(label, budget, suite, unit, metric, p, len(seeds)))
        conf = both[["confidence", "score", "confidence_base", "score_base"]].dropna()
        if metric == "acc" and len(conf) >= 10 and len(seeds) == 1:  # ECE of 0/1 answers; with seeds pooled there is no single confidence
            e = stats.paired_bootstrap(conf[["confidence", "score"]].to_numpy(), conf[["confidence_base", "score_base"]].to_numpy(),
                                       _ece, n_boot=N_BOOT, seed=0)
            rows.append(_paired_row(label, budget, suite, unit, "ece", e, len(seeds)))
    out = pd.DataFrame(rows, columns=["label", "budget", "suite", "task", "metric", "diff", "se", "lo", "hi", "p", "test",
                                      "n", "mde", "seeds", "p_holm", "significant"])
    if len(out):
        out["p_holm"] = stats.holm(out["p"].to_numpy(dtype=float))
        out["significant"] = out["p_holm"] < ALPHA
    return out


def _ece(rows: np.ndarray) -> float:
    from hmst_bench.eval.calibration import ece_equal_mass

    return float(ece_equal_mass(rows[:, 0], rows[:, 1]))


def _paired_row(label, budget, suite, unit, metric, p, seeds) -> dict:
    return {"label": label, "budget": budget, "suite": suite, "task": unit, "metric": metric, "diff": p.diff, "se": p.se,
            "lo": p.lo, "hi": p.hi, "p": p.p, "test": p.test, "n": p.n, "mde": p.mde, "seeds": seeds,
            "p_holm": math.nan, "significant": False}


def _scaling(runs: pd.DataFrame, baseline: str) -> tuple[pd.DataFrame, dict]:
    fits = {}
    ok = runs[np.isfinite(runs["val_loss"].astype(float)) & (runs["achieved_flops"] > 0)]
    for label, df in ok.groupby("label", sort=False):
        try:
            fits[label] = scaling.fit_power_law(df["achieved_flops"].to_numpy(float), df["val_loss"].to_numpy(float))
        except ValueError:  # fewer than 3 budgets: no fit (the report says so)
            fits[label] = None
    base = ok[ok["label"] == baseline]
    rows = []
    for (label, budget), df in ok.groupby(["label", "budget"], sort=False):
        values, extrapolated = [], False
        for _, r in df.iterrows():
            ref = base[base["seed"] == r["seed"]]
            if len(ref) == 0:
                continue
            m = scaling.compute_multiplier(ref["achieved_flops"].to_numpy(float), ref["val_loss"].to_numpy(float),
                                           float(r["achieved_flops"]), float(r["val_loss"]))
            if math.isfinite(m.value):
                values.append(m.value)
                extrapolated |= m.extrapolated
        est = scaling.multiplier_ci(values) if values else None
        rows.append({"label": label, "budget": budget, "achieved_flops": df["achieved_flops"].mean(),
                     "val_loss": df["val_loss"].mean(), "multiplier": est.value if est else math.nan,
                     "lo": est.lo if est else math.nan, "hi": est.hi if est else math.nan,
                     "extrapolated": extrapolated, "seeds": len(values)})
    return pd.DataFrame(rows, columns=["label", "budget", "achieved_flops", "val_loss", "multiplier", "lo", "hi",
                                       "extrapolated", "seeds"]), fits


def _missing(runs: pd.DataFrame, items: pd.DataFrame) -> list:
    suites = sorted(set(items["suite"]))
    have = set(zip(items["run"], items["suite"]))
    return [(r["label"], r["budget"], r["seed"], s) for _, r in runs.iterrows() for s in suites if (r["run"], s) not in have]
