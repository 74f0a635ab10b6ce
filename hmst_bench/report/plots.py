"""The figures of a compute-matched comparison, one figure per function, each written as a PNG.

- `loss_vs_flops`: validation loss against achieved training compute, every run, the mean over
  seeds per budget, and the fitted L(C) = E + A·C^-alpha of each architecture;
- `metric_vs_flops`: one suite's metrics (95% CI) against achieved compute, a panel per task and metric;
- `forest`: paired differences against the baseline with their CIs, Holm-significant rows marked;
- `reliability`: reliability diagrams of several models side by side, over 10 equal-mass bins.

Inputs are the report's pandas frames (column names in each function's docstring). Every function
returns the path it wrote. Figures are drawn with matplotlib's Agg canvas directly (no pyplot, so
no global figure registry and no change to a notebook's backend), written atomically, and are
deterministic: fixed size and dpi, no "Software" or date metadata, so the same inputs give the
same bytes and a committed results folder can be checked by regenerating it. NaN values are left
out of a figure; an input with nothing to draw raises ValueError("nothing to plot: ...").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

DPI = 110
# tab10 without its grey, which reads as the baseline's black at a glance
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#bcbd22", "#17becf")
BASELINE_COLOUR = "black"
MAX_PANELS = 6  # metric_vs_flops: panels beyond these are left out (the title says so)
MAX_FOREST_ROWS = 40  # forest: rows beyond these are left out (the title says so)
REL_BINS = 10  # equal-mass bins, as the calibration metrics' ece_em10
REL_COLUMNS = 4  # reliability panels per row of the figure
COMPUTE_LABEL = "achieved training compute (FLOPs)"
Y_LABELS = {"val_loss": "validation loss (nats/token)", "val_bpb": "validation bits per byte"}
TITLES = {"val_loss": "Validation loss against training compute",
          "val_bpb": "Validation bits per byte against training compute"}


# ---------------------------------------------------------------------------------------------
# shared helpers


def label_colours(labels: Iterable[str], baselines: Iterable[str] = ()) -> dict[str, str]:
    """A colour per label, in the order given: baselines black, the others the palette in turn.
    A baseline takes no palette slot, so an architecture has the same colour in a figure that
    shows the baseline and in one that does not (the forest plot). Beyond 9 labels colours repeat."""
    baselines = set(baselines)
    colours, slot = {}, 0
    for label in dict.fromkeys(labels):
        if label in baselines:
            colours[label] = BASELINE_COLOUR
        else:
            colours[label] = PALETTE[slot % len(PALETTE)]
            slot += 1
    return colours


def _frame_colours(frame: pd.DataFrame) -> dict[str, str]:
    """label_colours of a frame's labels, its baselines being the labels of rows marked baseline."""
    marked = frame["baseline"].map(_truthy)
    return label_colours(frame["label"], frame.loc[marked, "label"])


def _truthy(value: Any) -> bool:
    """bool(value), with NaN/None as False (bool(float('nan')) is True)."""
    return False if value is None or (isinstance(value, float) and math.isnan(value)) else bool(value)


def _require(frame: pd.DataFrame | None, columns: Sequence[str], what: str) -> None:
    if frame is None or len(frame) == 0:
        raise ValueError(f"nothing to plot: {what} is empty")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks the column(s) {', '.join(missing)}")


def _numbers(column: pd.Series) -> np.ndarray:
    """A column as float64, anything that is not a number as NaN."""
    return pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)


def _positive(values: np.ndarray) -> np.ndarray:
    """Where a value can sit on a log axis: finite and above zero."""
    return np.isfinite(values) & (values > 0)


def _figure(width: float, height: float):
    """A figure on the Agg canvas (no pyplot), laid out by matplotlib's constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path | str) -> Path:
    """Write the PNG atomically; without the Software entry the bytes depend only on the drawing."""
    from hmst_bench.util import atomic_save

    path = Path(path)
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None}))
    return path


def _error_bars(ax, x, y, lo, hi, colour: str) -> None:
    """CI bars where both ends are known; an end on the wrong side of the value draws as zero
    (matplotlib refuses negative error lengths, and a bad CI must not hide the point)."""
    x, y, lo, hi = (np.asarray(v, dtype=np.float64) for v in (x, y, lo, hi))
    ok = np.isfinite(lo) & np.isfinite(hi)
    if ok.any():
        err = [np.clip(y[ok] - lo[ok], 0, None), np.clip(hi[ok] - y[ok], 0, None)]
        ax.errorbar(x[ok], y[ok], yerr=err, fmt="none", ecolor=colour, elinewidth=1, capsize=3)


# ---------------------------------------------------------------------------------------------
# loss against compute


def loss_vs_flops(runs: pd.DataFrame, fits: Mapping[str, Any] | None, path: Path | str,
                  metric: str = "val_loss") -> Path:
    """Log-log plot of `metric` (a runs column) against achieved FLOPs.

    runs: label, baseline, budget, achieved_flops and the metric, one row per run (seed). Every run
    is a small point, so the spread over seeds shows; per label the mean over seeds at each budget
    is joined by a line; fits[label] (E, A, alpha, callable on a compute) is drawn dashed over
    that label's measured compute range. Fits are of the loss in nats, so they are drawn only
    for metric "val_loss"."""
    _require(runs, ["label", "baseline", "budget", "achieved_flops", metric], "runs")
    colours = _frame_colours(runs)
    data = runs.assign(_x=_numbers(runs["achieved_flops"]), _y=_numbers(runs[metric]))
    data = data[_positive(data["_x"].to_numpy()) & _positive(data["_y"].to_numpy())]
    if data.empty:
        raise ValueError(f"nothing to plot: no run has a finite, positive achieved_flops and {metric}")
    fits = (fits or {}) if metric == "val_loss" else {}

    fig = _figure(7.0, 5.0)
    ax = fig.add_subplot()
    any_fit = False
    for label, colour in colours.items():
        own = data[data["label"] == label]
        if own.empty:
            continue
        fit = fits.get(label)
        ax.scatter(own["_x"], own["_y"], s=10, color=colour, alpha=0.45, linewidths=0)
        means = own.groupby("budget", sort=False)[["_x", "_y"]].mean().sort_values("_x", kind="stable")
        ax.plot(means["_x"], means["_y"], "-o", color=colour, markersize=4, linewidth=1.5,
                label=_fit_legend(label, fit))
        if fit is not None:
            any_fit |= _draw_fit(ax, fit, own["_x"].min(), own["_x"].max(), colour)
    ax.legend(handles=ax.get_legend_handles_labels()[0] + _loss_key(any_fit), fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel=COMPUTE_LABEL, ylabel=Y_LABELS.get(metric, metric),
           title=TITLES.get(metric, f"{metric} against training compute"))
    _plain_log_labels(ax.yaxis)
    return _save(fig, path)


def _plain_log_labels(axis) -> None:
    """Label a log axis 2.5, 3 rather than 2.5×10^0: losses span less than a decade, so the
    labels are mostly on minor ticks (minor labels still thin out over several decades)."""
    from matplotlib.ticker import LogFormatter

    axis.set_major_formatter(LogFormatter())
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _fit_legend(label: str, fit: Any) -> str:
    if fit is None:
        return label
    return f"{label} (fit: E={fit.E:.3g}, alpha={fit.alpha:.3g})"


def _draw_fit(ax, fit: Any, lo: float, hi: float, colour: str) -> bool:
    """The fit over [lo, hi] (log-spaced), dashed; whether any of it was finite enough to draw.
    The fit is called one compute at a time: it promises a scalar call, not a vectorised one."""
    grid = np.geomspace(lo, hi, 64)
    curve = np.array([float(fit(c)) for c in grid])
    ok = _positive(curve)
    if ok.any():
        ax.plot(grid[ok], curve[ok], "--", color=colour, linewidth=1.2)
    return bool(ok.any())


def _loss_key(with_fit: bool) -> list:
    """Legend entries that say what the marks mean, in grey so they match no label."""
    from matplotlib.lines import Line2D

    key = [Line2D([], [], linestyle="none", marker="o", markersize=4, color="grey", alpha=0.6,
                  label="one run (each seed)"),
           Line2D([], [], marker="o", markersize=4, color="grey", label="mean over seeds per budget")]
    if with_fit:
        key.append(Line2D([], [], linestyle="--", color="grey", label="fit L(C) = E + A·C^-alpha"))
    return key


# ---------------------------------------------------------------------------------------------
# a suite's metrics against compute


def metric_vs_flops(metrics: pd.DataFrame, suite: str, path: Path | str) -> Path:
    """One panel per (task, metric) of `suite` (the first MAX_PANELS in the order given): value
    with its 95% CI against achieved FLOPs (log), a line per label.

    metrics: label, baseline, budget, achieved_flops, suite, task, metric, value, lo, hi (NaN
    where unknown). A row without a finite value is left out; an unknown CI draws no bar."""
    _require(metrics, ["label", "baseline", "achieved_flops", "suite", "task", "metric", "value", "lo", "hi"],
             "metrics")
    colours = _frame_colours(metrics)  # the whole frame: a label keeps its colour from suite to suite
    data = metrics[metrics["suite"] == suite]
    data = data.assign(_x=_numbers(data["achieved_flops"]), _y=_numbers(data["value"]),
                       _lo=_numbers(data["lo"]), _hi=_numbers(data["hi"]))
    data = data[_positive(data["_x"].to_numpy()) & np.isfinite(data["_y"].to_numpy())]
    if data.empty:
        known = ", ".join(map(str, dict.fromkeys(metrics["suite"])))
        raise ValueError(f"nothing to plot: no finite value for suite {suite!r} (suites: {known})")
    panels = list(dict.fromkeys(zip(data["task"], data["metric"])))
    shown = panels[:MAX_PANELS]

    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig = _figure(4.0 * cols + 0.4, 3.2 * rows + 1.0)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    for ax, (task, name) in zip(axes, shown):
        _metric_panel(ax, data[(data["task"] == task) & (data["metric"] == name)], colours)
        ax.set_title(f"{task} · {name}", fontsize=9)
        ax.set(xscale="log", xlabel=COMPUTE_LABEL, ylabel=name)
    plotted = [label for label in colours if label in set(data["label"])]
    fig.legend(handles=_label_handles(plotted, colours), loc="outside lower center",
               ncols=min(4, len(plotted)), fontsize=8)
    more = f"  (first {len(shown)} of {len(panels)} task·metric panels)" if len(panels) > len(shown) else ""
    fig.suptitle(f"{suite}: metrics against training compute, 95% CI{more}", fontsize=10)
    return _save(fig, path)


def _metric_panel(ax, rows: pd.DataFrame, colours: Mapping[str, str]) -> None:
    for label, colour in colours.items():
        own = rows[rows["label"] == label].sort_values("_x", kind="stable")
        if own.empty:
            continue
        ax.plot(own["_x"], own["_y"], "-o", color=colour, markersize=4, linewidth=1.3)
        _error_bars(ax, own["_x"], own["_y"], own["_lo"], own["_hi"], colour)


def _label_handles(labels: Sequence[str], colours: Mapping[str, str]) -> list:
    from matplotlib.lines import Line2D

    return [Line2D([], [], marker="o", markersize=4, color=colours[label], label=label) for label in labels]


# ---------------------------------------------------------------------------------------------
# paired differences


def forest(paired: pd.DataFrame, path: Path | str) -> Path:
    """Forest plot of paired differences (architecture minus baseline), one row per
    (label, budget, task, metric) in the order given: the difference, its 95% CI, a dashed line
    at 0; rows significant after Holm's correction have a filled marker and a "*" in their name.

    paired: label, budget, suite, task, metric, diff, lo, hi, p_holm, significant. Rows without a
    finite diff are left out; at most MAX_FOREST_ROWS rows are drawn (the title says how many
    more there were). The figure grows taller with the rows."""
    _require(paired, ["label", "budget", "task", "metric", "diff", "lo", "hi", "significant"], "paired")
    rows, cut, dropped = _forest_rows(paired)
    if rows.empty:
        raise ValueError("nothing to plot: no paired difference is a finite number")
    colours = label_colours(paired["label"])  # no baseline here: it is what the rows subtract

    n = len(rows)
    fig = _figure(8.5, 1.9 + 0.26 * n)
    ax = fig.add_subplot()
    ys = np.arange(n)[::-1]  # the first row on top
    names = []
    for y, row in zip(ys, rows.to_dict("records")):
        colour, significant = colours[row["label"]], _truthy(row["significant"])
        if np.isfinite(row["_lo"]) and np.isfinite(row["_hi"]):
            ax.hlines(y, row["_lo"], row["_hi"], color=colour, linewidth=1.6)
        ax.plot(row["_diff"], y, "o", markersize=6, color=colour,
                markerfacecolor=colour if significant else "white")
        names.append(f"{row['label']} @ {row['budget']} · {row['task']} {row['metric']}"
                     + (" *" if significant else ""))
    ax.axvline(0.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_yticks(ys, names, fontsize=8)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel("difference, architecture − baseline (each metric in its own unit)")
    ax.legend(handles=_forest_key(), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0),
              ncols=2, frameon=False)
    ax.set_title(_forest_title(cut, dropped), fontsize=10, pad=24)
    return _save(fig, path)


def _forest_rows(paired: pd.DataFrame) -> tuple[pd.DataFrame, int, int]:
    """(the rows to draw, how many more were cut, how many had no finite diff), in the order given,
    with the numbers as float columns _diff, _lo, _hi."""
    data = paired.assign(_diff=_numbers(paired["diff"]), _lo=_numbers(paired["lo"]), _hi=_numbers(paired["hi"]))
    finite = data[np.isfinite(data["_diff"].to_numpy())]
    return finite.iloc[:MAX_FOREST_ROWS], max(0, len(finite) - MAX_FOREST_ROWS), len(data) - len(finite)


def _forest_title(cut: int, dropped: int) -> str:
    title = "Paired difference against the baseline, 95% CI"
    notes = ([f"first {MAX_FOREST_ROWS} rows, +{cut} more"] if cut else []) + \
            ([f"{dropped} without a difference left out"] if dropped else [])
    return title + (f"  ({'; '.join(notes)})" if notes else "")


def _forest_key() -> list:
    from matplotlib.lines import Line2D

    return [Line2D([], [], linestyle="none", marker="o", color="grey", label="significant (Holm) *"),
            Line2D([], [], linestyle="none", marker="o", color="grey", markerfacecolor="white",
                   label="not significant")]


# ---------------------------------------------------------------------------------------------
# reliability


def reliability(panels: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: Path | str,
                title: str = "") -> Path:
    """Reliability diagrams side by side (REL_COLUMNS per row), one per label: accuracy against
    confidence over 10 equal-mass bins (the bins of hmst_bench.eval.calibration, HELM's binning),
    each bin a bar over its interval and a point at its mean confidence, with the diagonal of
    perfect calibration and the ECE in the panel title.

    panels: label -> (confidence of the chosen answer, correct 0/1), two arrays of one length.
    Pairs with a NaN are left out. (calibration.reliability_diagram draws a finished calibration
    result, whose Brier score needs every choice's probability; these inputs do not carry it.)"""
    from hmst_bench.eval.calibration import bin_stats, ece_from_bins, equal_mass_edges

    if not panels:
        raise ValueError("nothing to plot: no reliability panel given")
    colours = label_colours(panels)
    cols = min(REL_COLUMNS, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _figure(3.4 * cols + 0.4, 3.6 * rows + (0.4 if title else 0.0))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, (label, pair) in zip(axes, panels.items()):
        conf, correct = _calibration_pair(label, pair)
        if conf.size:
            bins = bin_stats(conf, correct, equal_mass_edges(conf, REL_BINS))
            _reliability_panel(ax, bins, colours[label])
            heading = f"{label}  (n={conf.size})\nECE {ece_from_bins(bins):.3f} ({REL_BINS} equal-mass bins)"
        else:
            ax.text(0.5, 0.5, "no finite confidence", ha="center", va="center", fontsize=9)
            heading = f"{label}  (n=0)\nECE n/a"
        ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
        ax.set_title(heading, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _calibration_pair(label: str, pair: tuple[Sequence[float], Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) as float arrays without the pairs that hold a NaN; a caller's mix-up
    (lengths that differ, a confidence outside [0, 1]) is refused rather than drawn."""
    conf, correct = (np.asarray(a, dtype=np.float64).ravel() for a in pair)
    if conf.shape != correct.shape:
        raise ValueError(f"reliability panel {label!r}: {conf.size} confidences but {correct.size} outcomes")
    keep = np.isfinite(conf) & np.isfinite(correct)
    conf, correct = conf[keep], correct[keep]
    if ((conf < 0) | (conf > 1)).any():
        raise ValueError(f"reliability panel {label!r}: a confidence is outside [0, 1]")
    return conf, correct


def _reliability_panel(ax, bins: list[dict], colour: str) -> None:
    full = [b for b in bins if b["n"]]
    ax.bar([b["lo"] for b in full], [b["accuracy"] for b in full], width=[b["hi"] - b["lo"] for b in full],
           align="edge", color=colour, alpha=0.3, edgecolor=colour, linewidth=0.6)
    ax.plot([b["confidence"] for b in full], [b["accuracy"] for b in full], "-o", color=colour,
            markersize=4, linewidth=1.2)
