"""Write a comparison to a report folder, and read one back.

    README.md       headline per architecture (compute multiplier with its CI), the main table,
                    the paired table, the plots embedded (GitHub renders it)
    table.csv       one row per label x budget x seed x metric, with cost columns
    paired.csv      every paired difference against the baseline, Holm-corrected
    items.parquet   one row per run x suite x task x item x metric: all the statistics need
    manifest.json   every run's config hash, tokenizer and corpus digests, versions, and the
                    run.json figures the tables use; with items.parquet it regenerates the report
    *.png           loss against FLOPs with fits, each suite against FLOPs, forest, reliability

Nothing here depends on the time or the machine, so regenerating from the manifest gives the
same files byte for byte.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from hmst_bench.report.collect import CompareError
from hmst_bench.report.compare import Comparison
from hmst_bench.util import atomic_path, atomic_write

MANIFEST_VERSION = 1
RUN_FIELDS = ["run", "label", "experiment", "arch", "size", "stage", "budget", "seed", "status", "achieved_flops",
              "tokens", "val_loss", "val_bpb", "params_total", "params_active", "train_tokens_per_s", "train_seconds",
              "infer_flops_per_token", "config_hash", "tokenizer_hash", "corpus_fingerprint", "corpus", "seq_len",
              "versions", "git_sha"]


def write_report(comp: Comparison, items: pd.DataFrame, out: Path, meta: dict) -> list[Path]:
    """All report files into `out`; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [_write_manifest(comp, out, meta), _write_items(items, out)]
    written.append(_csv(comp.per_seed, out / "table.csv"))
    written.append(_csv(comp.paired, out / "paired.csv"))
    figures = _plots(comp, items, out)
    written += figures.values()
    readme = render_readme(comp, meta, {k: v.name for k, v in figures.items()})
    atomic_write(out / "README.md", readme)
    written.append(out / "README.md")
    return written


def _csv(df: pd.DataFrame, path: Path) -> Path:
    atomic_write(path, df.to_csv(index=False, float_format="%.6g"))
    return path


def _write_items(items: pd.DataFrame, out: Path) -> Path:
    path = out / "items.parquet"
    with atomic_path(path) as tmp:
        items.reset_index(drop=True).to_parquet(tmp, index=False)
    return path


def _write_manifest(comp: Comparison, out: Path, meta: dict) -> Path:
    from hmst_bench.train.rundir import versions

    runs = comp.runs.reindex(columns=RUN_FIELDS)
    manifest = {"manifest_version": MANIFEST_VERSION, **meta, "baseline": comp.baseline,
                "written_by": meta.get("written_by") or versions(),
                "runs": json.loads(runs.to_json(orient="records"))}
    atomic_write(out / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return out / "manifest.json"


def read_manifest(path: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(runs, items, meta) from a report folder's manifest.json and items.parquet."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
        items = pd.read_parquet(path.parent / "items.parquet")
    except FileNotFoundError as exc:
        raise CompareError(f"{exc.filename} does not exist; a report folder holds manifest.json and items.parquet") from None
    except (OSError, ValueError) as exc:
        raise CompareError(f"cannot read the report in {path.parent}: {exc}") from None
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise CompareError(f"{path} is not a hmst-bench report manifest (version {manifest.get('manifest_version')})")
    runs = pd.DataFrame(manifest.pop("runs"))
    return runs, items, manifest


# ------------------------------------------------------------------------------------ plots


def _plots(comp: Comparison, items: pd.DataFrame, out: Path) -> dict:
    from hmst_bench.report import plots

    figures = {}
    runs = comp.runs.assign(baseline=comp.runs["label"] == comp.baseline)
    if runs["val_loss"].notna().any():
        figures["loss"] = plots.loss_vs_flops(runs, comp.fits, out / "loss_vs_flops.png")
    metrics = comp.metrics[comp.metrics["suite"] != "validation"].assign(
        baseline=lambda d: d["label"] == comp.baseline)
    for suite in dict.fromkeys(metrics["suite"]):
        figures[f"suite:{suite}"] = plots.metric_vs_flops(metrics, suite, out / f"{suite}_vs_flops.png")
    if len(comp.paired):
        figures["forest"] = plots.forest(comp.paired, out / "forest.png")
    panels = _reliability_panels(comp, items)
    if panels:
        figures["reliability"] = plots.reliability(panels, out / "reliability.png",
                                                   title="Reliability at each architecture's largest budget (seed-pooled answers)")
    return figures


def _reliability_panels(comp: Comparison, items: pd.DataFrame) -> dict:
    conf = items[(items["metric"] == "acc") & items["confidence"].notna()]
    if not len(conf):
        return {}
    conf = conf.merge(comp.runs[["run", "label", "achieved_flops"]], on="run")
    panels = {}
    for label in dict.fromkeys(comp.runs["label"]):
        df = conf[conf["label"] == label]
        if len(df):
            top = df[df["achieved_flops"] == df["achieved_flops"].max()]
            panels[label] = (top["confidence"].to_numpy(float), top["score"].to_numpy(float))
    return panels


# ------------------------------------------------------------------------------------ README


def _f(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}g}" if abs(x) >= 1e4 or (x != 0 and abs(x) < 1e-3) else f"{x:.{digits}f}"


def _ci(value, lo, hi, digits: int = 3) -> str:
    if not (isinstance(lo, float) and math.isfinite(lo)):
        return _f(value, digits)
    return f"{_f(value, digits)} [{_f(lo, digits)}, {_f(hi, digits)}]"


def headlines(comp: Comparison) -> list[str]:
    """One sentence per architecture: its compute multiplier at its largest budget, with CI."""
    out = []
    for label in dict.fromkeys(comp.runs["label"]):
        if label == comp.baseline:
            continue
        rows = comp.scaling[comp.scaling["label"] == label].sort_values("achieved_flops")
        if not len(rows) or not math.isfinite(rows["multiplier"].iloc[-1]):
            out.append(f"**{label}**: no compute multiplier (no validation loss comparable with {comp.baseline}'s).")
            continue
        r = rows.iloc[-1]
        m = r["multiplier"]
        verdict = "better than" if (math.isfinite(r["lo"]) and r["lo"] > 1) else \
                  "worse than" if (math.isfinite(r["hi"]) and r["hi"] < 1) else \
                  ("no different from" if math.isfinite(r["lo"]) else
                   ("as a point estimate, ahead of" if m > 1 else "as a point estimate, behind"))
        ci = f" (95% CI {_f(r['lo'], 2)}-{_f(r['hi'], 2)}, {int(r['seeds'])} seeds)" if math.isfinite(r["lo"]) else \
             f" ({int(r['seeds'])} seed: no CI; run more seeds for one)"
        extra = ", extrapolated beyond the baseline's measured losses" if r["extrapolated"] else ""
        out.append(f"**{label}** at {r['budget']} ({_f(r['achieved_flops'], 3)} FLOPs) reaches validation loss "
                   f"{_f(r['val_loss'])}; {comp.baseline} needs **{_f(m, 2)}x** that compute to match it{ci}{extra}: "
                   f"{verdict} {comp.baseline} at equal compute.")
    return out


def _main_table(comp: Comparison) -> list[str]:
    m = comp.metrics
    keys = list(dict.fromkeys(zip(m["suite"], m["task"], m["metric"])))
    keys = [k for k in keys if k[0] == "validation"] + [k for k in keys if k[0] != "validation"]
    runs = comp.runs.groupby(["label", "budget"], sort=False).agg(
        flops=("achieved_flops", "mean"), params=("params_total", "first"), active=("params_active", "first"),
        tokens=("tokens", "mean"), tps=("train_tokens_per_s", "mean"), infer=("infer_flops_per_token", "mean"),
        seeds=("seed", "nunique")).reset_index().sort_values(["label", "flops"], kind="stable")
    head = ["architecture", "budget", "FLOPs", "seeds"] + [f"{t} {mt}" if t != s or s == "validation" else f"{s} {mt}"
                                                           for s, t, mt in keys]
    head += ["params (total / active)", "tokens", "train tok/s", "inference FLOPs/token"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    index = m.set_index(["label", "budget", "suite", "task", "metric"])
    for _, r in runs.iterrows():
        cells = [f"**{r['label']}**" if r["label"] == comp.baseline else r["label"], str(r["budget"]), _f(r["flops"]),
                 str(r["seeds"])]
        for key in keys:
            try:
                e = index.loc[(r["label"], r["budget"], *key)]
                cells.append(_ci(e["value"], e["lo"], e["hi"]))
            except KeyError:
                cells.append("missing")
        cells += [f"{int(r['params']):,} / {int(r['active']):,}" if pd.notna(r["params"]) else "-",
                  f"{int(r['tokens']):,}", _f(r["tps"], 4), _f(r["infer"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _paired_lines(comp: Comparison) -> list[str]:
    p = comp.paired
    if not len(p):
        return [f"No paired comparison: no suite results shared with {comp.baseline}."]
    lines = ["| architecture | budget | task | metric | difference [95% CI] | p | p (Holm) | MDE (80% power) | test | n |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in p.iterrows():
        mark = " *" if r["significant"] else ""
        lines.append(f"| {r['label']} | {r['budget']} | {r['task']} | {r['metric']} | {_ci(r['diff'], r['lo'], r['hi'])}{mark} | "
                     f"{_f(r['p'])} | {_f(r['p_holm'])} | {_f(r['mde'])} | {r['test']} | {int(r['n'])} |")
    lines.append("")
    lines.append(f"Differences are architecture minus {comp.baseline} on the same items; * marks p < 0.05 after Holm's "
                 f"correction over the {len(p)} comparisons of this report. MDE: the smallest true difference this test "
                 "would detect 80% of the time; a non-significant row rules out differences larger than about its MDE.")
    return lines


def _scaling_lines(comp: Comparison) -> list[str]:
    s = comp.scaling.sort_values(["label", "achieved_flops"], kind="stable")
    lines = [f"| architecture | budget | FLOPs | validation loss | compute multiplier vs {comp.baseline} [95% CI] | seeds |",
             "|---|---|---|---|---|---|"]
    for _, r in s.iterrows():
        mult = _ci(r["multiplier"], r["lo"], r["hi"], 2) + (" (extrapolated)" if r["extrapolated"] else "")
        lines.append(f"| {r['label']} | {r['budget']} | {_f(r['achieved_flops'])} | {_f(r['val_loss'])} | {mult} | {int(r['seeds'])} |")
    fits = []
    for label, fit in comp.fits.items():
        fits.append(f"- {label}: " + (f"L(C) = {fit.E:.3f} + {fit.A:.4g}·C^-{fit.alpha:.3f}" if fit is not None
                                      else "no fit (needs 3 or more budgets)"))
    return lines + ["", "Fits of L(C) = E + A·C^-alpha (Huber loss on log loss, as Chinchilla):", *fits]


def render_readme(comp: Comparison, meta: dict, figures: dict) -> str:
    title = meta.get("experiment") or "comparison"
    parts = [f"# {title}", ""]
    if meta.get("description"):
        parts += [meta["description"], ""]
    parts += [f"Baseline: **{comp.baseline}**. {len(comp.runs)} runs; budgets "
              f"{', '.join(dict.fromkeys(map(str, comp.runs['budget'])))}; seeds "
              f"{', '.join(map(str, sorted(set(comp.runs['seed']))))}; corpus {', '.join(map(str, set(comp.runs['corpus'])))}, "
              f"sequence length {', '.join(map(str, set(comp.runs['seq_len'])))}.", ""]
    parts += [f"- {h}" for h in headlines(comp)] + [""]
    if comp.mismatches:
        parts += ["**These runs are not strictly comparable** (compared with --allow-mismatch):", ""]
        parts += [f"- {m}" for m in comp.mismatches] + [""]
    parts += ["## Compute multiplier", "",
              "How much compute the baseline needs to reach each architecture's validation loss, divided by the compute "
              "the architecture used (log-log interpolation between the baseline's measured budgets; >1: the "
              "architecture is worth more compute than it used).", "", *_scaling_lines(comp), ""]
    if "loss" in figures:
        parts += [f"![validation loss against FLOPs]({figures['loss']})", ""]
    parts += ["## Results", "", "Each cell: value [95% CI] (CLT over items, clustered where items share a cluster; "
              "over seeds for the validation figures).", "", *_main_table(comp), ""]
    parts += [f"## Paired differences against {comp.baseline}", "", *_paired_lines(comp), ""]
    if "forest" in figures:
        parts += [f"![paired differences]({figures['forest']})", ""]
    suite_figs = [(k.split(":", 1)[1], v) for k, v in figures.items() if k.startswith("suite:")]
    if suite_figs or "reliability" in figures:
        parts += ["## Suites against compute", ""]
        parts += [f"![{s} against FLOPs]({f})" for s, f in suite_figs]
        if "reliability" in figures:
            parts += ["", f"![reliability diagrams]({figures['reliability']})"]
        parts += [""]
    notes = []
    for label, budget, seed, suite in comp.missing:
        notes.append(f"- missing: {suite} results of {label} at {budget}, seed {seed}")
    for run in meta.get("missing_runs", []):
        notes.append(f"- missing run: {run['label']} at {run['budget']}, seed {run['seed']} ({run['why']})")
    for suite in meta.get("skipped_suites", []):
        notes.append(f"- suite {suite['name']} not run: {suite['reason']}")
    if notes:
        parts += ["## Missing", "", *notes, ""]
    parts += ["## Reproduce", "", "Regenerate every table and plot from this folder alone:", "", "```bash",
              "hmst-bench compare --manifest manifest.json --out .", "```", ""]
    if meta.get("command"):
        parts += ["Rerun the experiment itself (skips what is done):", "", "```bash", meta["command"], "```", ""]
    return "\n".join(parts)
