"""The report's figures (hmst_bench.report.plots): each function writes a PNG that matplotlib reads
back at the figure's size and dpi, the same bytes on a second render, no temp file left beside it;
NaN values (runs, CIs, differences, confidences) are left out without a crash; empty inputs raise
ValueError("nothing to plot: ..."); the forest plot stops at 40 rows; the loss fit is drawn over
the measured compute range only; the baseline is black and each architecture keeps its colour."""

from __future__ import annotations

import math

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from hmst_bench.report import plots

LABELS = [("dense-llama", True), ("hmst", False), ("gpt2-hsm", False)]
BUDGETS = ["1e11", "3e11", "1e12"]


class Fit:
    """A scaling fit as the report's fitter returns it; remembers every compute it was asked for."""

    def __init__(self, E: float, A: float, alpha: float):
        self.E, self.A, self.alpha, self.calls = E, A, alpha, []

    def __call__(self, compute: float) -> float:
        self.calls.append(float(compute))
        return self.E + self.A * compute ** -self.alpha


def runs_frame() -> pd.DataFrame:
    rows = []
    for k, (label, baseline) in enumerate(LABELS):
        for budget in BUDGETS:
            for seed in range(2):
                flops = float(budget) * (1.0 + 0.03 * seed)
                rows.append({"label": label, "baseline": baseline, "budget": budget, "seed": seed,
                             "achieved_flops": flops, "val_loss": 2.0 + 30.0 * flops ** -0.15 + 0.05 * k,
                             "val_bpb": 1.0 + 0.01 * seed, "tokens": int(flops / 1e6)})
    return pd.DataFrame(rows)


def metrics_frame(tasks=("mmlu", "arc"), suite="core") -> pd.DataFrame:
    rows = []
    for k, (label, baseline) in enumerate(LABELS):
        for b, budget in enumerate(BUDGETS):
            for task in tasks:
                value = 0.3 + 0.02 * b + 0.01 * k
                rows.append({"label": label, "baseline": baseline, "budget": budget,
                             "achieved_flops": float(budget), "suite": suite, "task": task, "metric": "acc",
                             "value": value, "lo": value - 0.04, "hi": value + 0.04})
    return pd.DataFrame(rows)


def paired_frame(n: int) -> pd.DataFrame:
    return pd.DataFrame([{"label": "hmst" if i % 2 else "gpt2-hsm", "budget": BUDGETS[i % 3], "suite": "core",
                          "task": f"task{i}", "metric": "acc", "diff": 0.01 * i - 0.1, "lo": 0.01 * i - 0.15,
                          "hi": 0.01 * i - 0.05, "p_holm": 0.01, "significant": i % 3 == 0} for i in range(n)])


def confidences(seed: int = 0, n: int = 300):
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.25, 1.0, n)
    return conf, (rng.uniform(size=n) < conf).astype(float)


def read_png(path, width_in: float, height_in: float) -> np.ndarray:
    """The PNG as matplotlib reads it, checked to be RGBA at the figure's size and 110 dpi."""
    image = matplotlib.image.imread(path)
    assert image.shape == (round(height_in * plots.DPI), round(width_in * plots.DPI), 4)
    return image


def assert_deterministic(render, tmp_path) -> bytes:
    """Render twice into fresh files: the same bytes, the path returned, nothing else in the folder."""
    first, second = tmp_path / "a" / "fig.png", tmp_path / "b" / "fig.png"
    assert render(first) == first and render(second) == second
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert b"Software" not in first.read_bytes()  # no matplotlib version in the file
    assert sorted(p.name for p in first.parent.iterdir()) == ["fig.png"]  # no temp file left
    return first.read_bytes()


# --- colours ------------------------------------------------------------------------------------


def test_baseline_is_black_and_architectures_keep_their_colour():
    with_baseline = plots.label_colours(["hmst", "dense-llama", "gpt2-hsm"], baselines=["dense-llama"])
    assert with_baseline == {"hmst": plots.PALETTE[0], "dense-llama": "black", "gpt2-hsm": plots.PALETTE[1]}
    # the forest plot has no baseline row: the architectures get the same colours
    assert plots.label_colours(["hmst", "gpt2-hsm"]) == {"hmst": plots.PALETTE[0], "gpt2-hsm": plots.PALETTE[1]}
    assert "black" not in plots.PALETTE and len(set(plots.PALETTE)) == len(plots.PALETTE)


def test_nan_baseline_flag_is_not_a_baseline():
    frame = pd.DataFrame({"label": ["a", "b"], "baseline": [np.nan, True]})
    assert plots._frame_colours(frame) == {"a": plots.PALETTE[0], "b": "black"}


# --- loss against compute -------------------------------------------------------------------------


def test_loss_vs_flops_png_is_readable_and_deterministic(tmp_path):
    fits = {"dense-llama": Fit(2.0, 30.0, 0.15), "hmst": None}
    data = assert_deterministic(lambda p: plots.loss_vs_flops(runs_frame(), fits, p), tmp_path)
    read_png(tmp_path / "a" / "fig.png", 7.0, 5.0)
    # the fit is drawn: without it the picture differs
    bare = plots.loss_vs_flops(runs_frame(), {}, tmp_path / "bare.png")
    assert bare.read_bytes() != data


def test_fit_is_drawn_over_the_measured_range_without_nan_runs(tmp_path):
    runs = runs_frame()
    # a NaN loss at the largest compute: that run is left out, so the fit stops at the next one
    runs.loc[len(runs)] = {"label": "hmst", "baseline": False, "budget": "1e13", "seed": 0,
                           "achieved_flops": 1e13, "val_loss": math.nan, "val_bpb": math.nan, "tokens": 1}
    runs.loc[len(runs)] = {"label": "hmst", "baseline": False, "budget": "1e13", "seed": 1,
                           "achieved_flops": math.nan, "val_loss": 2.5, "val_bpb": 1.0, "tokens": 1}
    fit = Fit(2.0, 30.0, 0.15)
    plots.loss_vs_flops(runs, {"hmst": fit}, tmp_path / "loss.png")
    measured = runs.loc[(runs.label == "hmst") & runs.val_loss.notna(), "achieved_flops"].dropna()
    assert min(fit.calls) == pytest.approx(measured.min()) and max(fit.calls) == pytest.approx(measured.max())
    assert max(fit.calls) < 1e13


def test_loss_fit_is_not_drawn_on_bits_per_byte(tmp_path):
    fit = Fit(2.0, 30.0, 0.15)
    path = plots.loss_vs_flops(runs_frame(), {"hmst": fit}, tmp_path / "bpb.png", metric="val_bpb")
    read_png(path, 7.0, 5.0)
    assert fit.calls == []  # a fit of nats/token does not belong on a bits-per-byte axis


def test_fit_returning_nan_is_skipped(tmp_path):
    class NanFit(Fit):
        def __call__(self, compute):
            return math.nan

    read_png(plots.loss_vs_flops(runs_frame(), {"hmst": NanFit(math.nan, 1.0, math.nan)}, tmp_path / "f.png"),
             7.0, 5.0)


# --- metrics against compute -----------------------------------------------------------------------


def test_metric_vs_flops_png_with_nan_and_inverted_cis(tmp_path):
    metrics = metrics_frame()
    metrics.loc[0, ["lo", "hi"]] = math.nan  # CI unknown
    metrics.loc[1, "hi"] = math.nan  # half a CI: no bar
    metrics.loc[2, "lo"] = metrics.loc[2, "value"] + 0.1  # a bound on the wrong side of the value
    metrics.loc[3, "value"] = math.nan  # no value: left out
    assert_deterministic(lambda p: plots.metric_vs_flops(metrics, "core", p), tmp_path)
    read_png(tmp_path / "a" / "fig.png", 4.0 * 2 + 0.4, 3.2 + 1.0)  # two panels, one row


def test_metric_vs_flops_shows_at_most_six_panels(tmp_path):
    eight = plots.metric_vs_flops(metrics_frame([f"t{i}" for i in range(8)]), "core", tmp_path / "8.png")
    six = plots.metric_vs_flops(metrics_frame([f"t{i}" for i in range(6)]), "core", tmp_path / "6.png")
    read_png(eight, 4.0 * 3 + 0.4, 3.2 * 2 + 1.0)  # 2 rows of 3, not 3 rows
    read_png(six, 4.0 * 3 + 0.4, 3.2 * 2 + 1.0)
    assert eight.read_bytes() != six.read_bytes()  # the title says 6 of 8


def test_metric_vs_flops_other_suites_are_not_drawn(tmp_path):
    both = pd.concat([metrics_frame(["mmlu"], suite="core"), metrics_frame(["a", "b", "c"], suite="other")])
    read_png(plots.metric_vs_flops(both, "core", tmp_path / "core.png"), 4.0 + 0.4, 3.2 + 1.0)
    with pytest.raises(ValueError, match=r"^nothing to plot: .*'missing'.*core, other"):
        plots.metric_vs_flops(both, "missing", tmp_path / "none.png")


# --- forest ----------------------------------------------------------------------------------------


def test_forest_png_is_readable_and_deterministic(tmp_path):
    paired = paired_frame(6).astype({"significant": object})
    paired.loc[0, ["lo", "hi"]] = math.nan  # unknown CI: the point alone
    paired.loc[1, "significant"] = math.nan  # unknown: drawn as not significant
    paired.loc[2, "diff"] = math.nan  # no difference: left out
    assert_deterministic(lambda p: plots.forest(paired, p), tmp_path)
    read_png(tmp_path / "a" / "fig.png", 8.5, 1.9 + 0.26 * 5)


def test_forest_stops_at_forty_rows(tmp_path):
    rows, cut, dropped = plots._forest_rows(paired_frame(45))
    assert (len(rows), cut, dropped) == (40, 5, 0)
    assert list(rows["task"]) == [f"task{i}" for i in range(40)]  # the first 40, in order
    cut45 = plots.forest(paired_frame(45), tmp_path / "45.png")
    full40 = plots.forest(paired_frame(40), tmp_path / "40.png")
    read_png(cut45, 8.5, 1.9 + 0.26 * 40)
    read_png(full40, 8.5, 1.9 + 0.26 * 40)
    read_png(plots.forest(paired_frame(39), tmp_path / "39.png"), 8.5, 1.9 + 0.26 * 39)  # grows with rows
    assert cut45.read_bytes() != full40.read_bytes()  # "+5 more" in the title


def test_forest_nan_rows_do_not_count_towards_the_forty():
    paired = paired_frame(42)
    paired.loc[[0, 1, 2], "diff"] = math.nan
    rows, cut, dropped = plots._forest_rows(paired)
    assert (len(rows), cut, dropped) == (39, 0, 3)


# --- reliability ------------------------------------------------------------------------------------


def test_reliability_png_with_nan_pairs(tmp_path):
    conf, correct = confidences(0)
    conf[:5] = math.nan
    correct[5:10] = math.nan
    panels = {"dense-llama": (conf, correct), "hmst": confidences(1), "empty": ([math.nan], [1.0])}
    assert_deterministic(lambda p: plots.reliability(panels, p, title="mmlu"), tmp_path)
    read_png(tmp_path / "a" / "fig.png", 3.4 * 3 + 0.4, 3.6 + 0.4)


def test_reliability_wraps_after_four_panels(tmp_path):
    panels = {f"m{i}": confidences(i, 50) for i in range(5)}
    read_png(plots.reliability(panels, tmp_path / "r.png"), 3.4 * 4 + 0.4, 3.6 * 2)


def test_reliability_refuses_mismatched_inputs(tmp_path):
    with pytest.raises(ValueError, match="3 confidences but 2 outcomes"):
        plots.reliability({"a": ([0.5, 0.6, 0.7], [1, 0])}, tmp_path / "r.png")
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        plots.reliability({"a": ([1.5, 0.6], [1, 0])}, tmp_path / "r.png")
    assert not (tmp_path / "r.png").exists()


# --- empty inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("call", [
    lambda frame, path: plots.loss_vs_flops(frame, {}, path),
    lambda frame, path: plots.metric_vs_flops(frame, "core", path),
    lambda frame, path: plots.forest(frame, path),
], ids=["loss_vs_flops", "metric_vs_flops", "forest"])
@pytest.mark.parametrize("frame", [
    pd.DataFrame(),
    runs_frame().iloc[:0], metrics_frame().iloc[:0], paired_frame(1).iloc[:0],
], ids=["no-columns", "no-runs", "no-metrics", "no-pairs"])
def test_empty_inputs_raise(call, frame, tmp_path):
    with pytest.raises(ValueError, match=r"^nothing to plot: [^\n]+$"):
        call(frame, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_all_nan_inputs_raise(tmp_path):
    runs = runs_frame().assign(val_loss=math.nan)
    with pytest.raises(ValueError, match="^nothing to plot: "):
        plots.loss_vs_flops(runs, {}, tmp_path / "l.png")
    with pytest.raises(ValueError, match="^nothing to plot: "):
        plots.metric_vs_flops(metrics_frame().assign(value=math.nan), "core", tmp_path / "m.png")
    with pytest.raises(ValueError, match="^nothing to plot: "):
        plots.forest(paired_frame(3).assign(diff=math.nan), tmp_path / "f.png")
    with pytest.raises(ValueError, match="^nothing to plot: "):
        plots.reliability({}, tmp_path / "r.png")
