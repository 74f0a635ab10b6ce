"""Calibration of multiple-choice answers, computed from a finished suite's per-sample log.

A suite asks for it with `SuiteSpec.postprocess={"calibration": "hmst_bench.eval.calibration"}`
(the built-in mmlu, truthfulqa and longctx suites do). `postprocess` reads the log-likelihoods
lm-eval logged for every choice, turns them into a confidence (softmax over the choices), and
stores per task and pooled per group: ECE over 10 equal-mass bins (HELM's binning) and over 15
equal-width bins, the multi-class Brier score, the selective-accuracy curve and its
risk-coverage area (AURC). It also draws `RUN/eval/<suite>-reliability.png`. `summary_rows` gives
the headline figures in the row format of `runner.summary_rows`. Definitions: docs/metrics.md,
section "Calibration".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

EM_BINS = 10  # equal-mass bins, as HELM's ece_10_bin
EW_BINS = 15  # equal-width bins, as Guo et al. (2017)
CURVE_POINTS = 100  # points of the selective-accuracy curve kept in the result file
FIGURE_PANELS = 8  # at most this many tasks or groups in one reliability diagram
HEADLINE = ("ece_em10", "ece_ew15", "brier", "aurc")  # the metrics summary_rows reports
DOCS = "docs/metrics.md#calibration"

MC2_REASON = ("several true answers per question (mc2 scores the probability mass on all of them); "
              "TruthfulQA calibration is measured on truthfulqa_mc1")


class _Skip(Exception):
    """A task that has no single gold choice to calibrate against; the message says why."""


# ---------------------------------------------------------------------------------------------
# the metrics, on plain arrays


def softmax(logliks: Sequence[float]) -> np.ndarray:
    """The choices' log-likelihoods as a probability distribution (float64, max subtracted).
    A choice at -inf gets probability 0; if every choice is -inf the distribution is uniform."""
    x = np.asarray(logliks, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("softmax needs a non-empty 1-D sequence of log-likelihoods")
    top = x.max()
    if not np.isfinite(top):  # all -inf (NaN and +inf are refused before this)
        return np.full(x.size, 1.0 / x.size)
    e = np.exp(x - top)
    return e / e.sum()


def equal_width_edges(n_bins: int = EW_BINS) -> np.ndarray:
    """Upper edges b/B, b = 1..B: bin b is (lo, hi], the first also holds 0."""
    return np.linspace(0.0, 1.0, n_bins + 1)[1:]


def equal_mass_edges(conf: Sequence[float], n_bins: int = EM_BINS) -> np.ndarray:
    """HELM's equal-mass upper edges (its `calibration` package's get_equal_bins), our code.

    Sort the confidences and cut them into min(B, N) consecutive runs whose sizes differ by at
    most one, the longer runs first (numpy's array_split). Each inner edge is the midpoint of the
    last value of one run and the first of the next; the last edge is 1.0; repeated edges are
    dropped. A bin is (previous edge, edge], the first also holds 0. Equal values therefore share
    a bin: a tie across a cut puts the edge on the tied value, and all of it in the lower bin."""
    s = np.sort(np.asarray(conf, dtype=np.float64))
    if s.size == 0:
        return np.array([1.0])
    k = min(n_bins, s.size)
    base, extra = divmod(s.size, k)
    ends = np.cumsum([base + 1] * extra + [base] * (k - extra))  # exclusive end of each run
    inner = [(s[e - 1] + s[e]) / 2.0 for e in ends[:-1]]
    return np.unique(np.array(inner + [1.0]))


def bin_index(conf: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The bin of each confidence: the first upper edge >= it (sklearn's calibration_curve rule)."""
    return np.searchsorted(edges[:-1], conf, side="left")


def bin_stats(conf: Sequence[float], correct: Sequence[float], edges: np.ndarray) -> list[dict]:
    """Per bin: its interval (lo, hi], count, mean confidence and accuracy (None when empty)."""
    conf, correct = np.asarray(conf, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    ids = bin_index(conf, edges)
    count = np.bincount(ids, minlength=edges.size)
    conf_sum = np.bincount(ids, weights=conf, minlength=edges.size)
    hit_sum = np.bincount(ids, weights=correct, minlength=edges.size)
    rows, lo = [], 0.0
    for b, hi in enumerate(edges):
        n = int(count[b])
        rows.append({"lo": float(lo), "hi": float(hi), "n": n,
                     "confidence": float(conf_sum[b] / n) if n else None,
                     "accuracy": float(hit_sum[b] / n) if n else None})
        lo = hi
    return rows


def ece_from_bins(bins: list[dict]) -> float:
    """sum over bins of (n_b / N) |accuracy_b - confidence_b|; empty bins weigh nothing."""
    total = sum(b["n"] for b in bins)
    if total == 0:
        return 0.0
    return float(sum(b["n"] * abs(b["accuracy"] - b["confidence"]) for b in bins if b["n"]) / total)


def ece_equal_mass(conf: Sequence[float], correct: Sequence[float], n_bins: int = EM_BINS) -> float:
    return ece_from_bins(bin_stats(conf, correct, equal_mass_edges(conf, n_bins)))


def ece_equal_width(conf: Sequence[float], correct: Sequence[float], n_bins: int = EW_BINS) -> float:
    return ece_from_bins(bin_stats(conf, correct, equal_width_edges(n_bins)))


def brier(probs: Sequence[np.ndarray], gold: Sequence[int]) -> float:
    """Multi-class Brier score: mean over documents of sum_j (p_j - [j = gold])^2, in [0, 2],
    over each document's own choices (not halved, whatever the number of choices). It is
    sklearn's brier_score_loss(..., scale_by_half=False) where every document has the same
    choices (tested); sklearn < 1.7, which the core still allows, has no multi-class form."""
    total = 0.0
    for p, g in zip(probs, gold):
        err = np.array(p, dtype=np.float64)
        err[g] -= 1.0
        total += float(err @ err)
    return total / len(probs) if len(probs) else 0.0


def selective_curve(conf: Sequence[float], correct: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy of the m most confident documents at coverage m / N, m = 1..N.

    Documents of equal confidence cannot be ordered, so each of them counts with its tie
    block's mean correctness: the curve is the expectation over every order of the ties."""
    conf, correct = np.asarray(conf, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    n = conf.size
    if n == 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(-conf, kind="stable")
    c, y = conf[order], correct[order]
    starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])  # first index of each tie block
    sizes = np.diff(np.r_[starts, n])
    block_mean = np.add.reduceat(y, starts) / sizes
    y = np.repeat(block_mean, sizes)
    m = np.arange(1, n + 1)
    return m / n, np.cumsum(y) / m


def aurc(conf: Sequence[float], correct: Sequence[float]) -> float:
    """Area under the risk-coverage curve: (1/N) sum_{m=1..N} (1 - accuracy of the top m)."""
    _, acc = selective_curve(conf, correct)
    return float(np.mean(1.0 - acc)) if acc.size else 0.0


def aurc_optimal(correct: Sequence[float]) -> float:
    """The AURC of a perfect ranking (every correct answer first): the floor for this accuracy."""
    y = np.sort(np.asarray(correct, dtype=np.float64))[::-1]
    return aurc(-np.arange(y.size, dtype=np.float64), y)


def curve_points(coverage: np.ndarray, accuracy: np.ndarray, points: int = CURVE_POINTS) -> dict:
    """The curve at min(N, points) coverages ceil(j N / K) / N, j = 1..K (all of it when N <= K)."""
    n = coverage.size
    k = min(n, points)
    idx = [math.ceil(j * n / k) - 1 for j in range(1, k + 1)]
    return {"coverage": [round(float(coverage[i]), 6) for i in idx],
            "accuracy": [round(float(accuracy[i]), 6) for i in idx]}


def metrics(probs: Sequence[np.ndarray], gold: Sequence[int], pred: Sequence[int] | None = None) -> dict:
    """Every calibration figure for one set of documents: probs[i] is document i's softmax over
    its choices, gold[i] its correct choice, pred[i] the chosen one (default: the first argmax)."""
    gold = np.asarray(gold, dtype=np.int64)
    pred = np.asarray([int(np.argmax(p)) for p in probs] if pred is None else pred, dtype=np.int64)
    conf = np.array([p[j] for p, j in zip(probs, pred)], dtype=np.float64)
    correct = (pred == gold).astype(np.float64)
    em, ew = bin_stats(conf, correct, equal_mass_edges(conf)), bin_stats(conf, correct, equal_width_edges())
    coverage, accuracy = selective_curve(conf, correct)
    counts = [len(p) for p in probs]
    return {
        "n": int(gold.size),
        "choices": [min(counts), max(counts)],
        "accuracy": float(correct.mean()),
        "confidence": float(conf.mean()),
        "ece_em10": ece_from_bins(em),
        "ece_ew15": ece_from_bins(ew),
        "brier": brier(probs, gold),
        "aurc": float(np.mean(1.0 - accuracy)),
        "aurc_optimal": aurc_optimal(correct),
        "bins_em10": em,
        "bins_ew15": ew,
        "selective": curve_points(coverage, accuracy),
    }


# ---------------------------------------------------------------------------------------------
# reading lm-eval's per-sample log


def _choice_logliks(sample: dict) -> list[float]:
    """(log-likelihood, is_greedy) per choice: filtered_resps, else the first of each resps."""
    resps = sample.get("filtered_resps")
    if not isinstance(resps, list) or not resps:
        resps = [r[0] if isinstance(r, list) and r else r for r in sample.get("resps") or []]
    lls = []
    for r in resps:
        if not (isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], (int, float))
                and not isinstance(r[0], bool)):
            raise _Skip("responses are not (log-likelihood, is_greedy) pairs")
        if math.isnan(r[0]) or r[0] == math.inf:
            raise _Skip(f"document {sample.get('doc_id')} has a log-likelihood of {r[0]}")
        lls.append(float(r[0]))
    if not lls:
        raise _Skip(f"document {sample.get('doc_id')} has no choices")
    return lls


def _gold(sample: dict, n_choices: int, delimiter: str) -> int:
    """The gold index as lm-eval's acc reads it: an int, or a string matched to a choice."""
    target = sample.get("target")
    args = [a for a in sample.get("arguments") or [] if isinstance(a, (list, tuple)) and len(a) == 2]
    if len(args) > 1 and len({a[1] for a in args}) == 1 and len({a[0] for a in args}) > 1:
        raise _Skip("multiple-input task (the choices are contexts; the log holds no gold index)")
    if isinstance(target, str):  # the answer text, as lm-eval's choices.index(gold) reads it
        texts = [a[1] for a in args]
        texts = [t[len(delimiter):] if delimiter and t.startswith(delimiter) else t for t in texts]
        if target not in texts:
            raise _Skip(f"document {sample.get('doc_id')}'s target is not one of its choices")
        target = texts.index(target)
    if isinstance(target, list):
        raise _Skip("several gold choices per document")
    if not isinstance(target, int) or isinstance(target, bool) or not 0 <= target < n_choices:
        raise _Skip(f"document {sample.get('doc_id')}'s target {target!r} is not a choice index")
    return target


def task_documents(record: dict, task: str) -> tuple[str, list[np.ndarray], list[int], list[int]]:
    """(filter, softmax per document, gold index, chosen index) of one multiple-choice task.
    Raises _Skip for a task without one gold choice among its choices."""
    config = (record.get("configs") or {}).get(task) or {}
    if any(isinstance(m, dict) and m.get("metric") == "acc_mutual_info" for m in config.get("metric_list") or []):
        raise _Skip("acc_mutual_info: half the log-likelihoods are unconditional")
    if config.get("process_results"):
        raise _Skip(MC2_REASON if task.endswith("_mc2") else
                    "custom process_results: the score is not a single gold choice")
    rows = (record.get("samples") or {}).get(task) or []
    filters = list(dict.fromkeys(r.get("filter", "none") for r in rows))
    if not filters:
        raise _Skip("no documents")
    filt = "none" if "none" in filters else filters[0]
    delimiter = config.get("target_delimiter", " ")
    probs, gold, pred = [], [], []
    for row in sorted((r for r in rows if r.get("filter", "none") == filt), key=lambda r: r.get("doc_id", 0)):
        lls = _choice_logliks(row)
        gold.append(_gold(row, len(lls), delimiter if isinstance(delimiter, str) else " "))
        probs.append(softmax(lls))
        pred.append(int(np.argmax(lls)))  # lm-eval's acc: first choice of the highest log-likelihood
    return filt, probs, gold, pred


def _leaves(name: str, subtasks: dict) -> list[str]:
    if name not in subtasks:
        return [name]
    return [leaf for sub in subtasks[name] for leaf in _leaves(sub, subtasks)]


# ---------------------------------------------------------------------------------------------
# the postprocessor, its figure and its table rows


def postprocess(record: dict, lm: Any, out_dir: Optional[Path]) -> dict:
    """Calibration of every multiple-choice task of a suite, pooled per group, and the suite's
    reliability diagram in out_dir (none when out_dir is None). Empty when the suite has no
    multiple-choice task."""
    configs = record.get("configs") or {}
    mc = [t for t in (record.get("samples") or {}) if (configs.get(t) or {}).get("output_type") == "multiple_choice"]
    if not mc:
        return {}
    tasks, skipped, docs = {}, {}, {}
    for task in mc:
        try:
            filt, probs, gold, pred = task_documents(record, task)
        except _Skip as why:
            skipped[task] = str(why)
            continue
        docs[task] = (probs, gold, pred)
        tasks[task] = {"filter": filt, **metrics(probs, gold, pred)}
    groups = {}
    subtasks = record.get("group_subtasks") or {}
    for group in subtasks:
        members = [t for t in _leaves(group, subtasks) if t in docs]
        if not members:
            continue
        pooled = [[x for t in members for x in docs[t][i]] for i in range(3)]
        groups[group] = {"filter": tasks[members[0]]["filter"], "tasks": len(members),
                         **metrics(*pooled)}
        missing = [t for t in _leaves(group, subtasks) if t in skipped]
        if missing:
            groups[group]["skipped_tasks"] = missing
    out = {"definitions": DOCS, "confidence": "softmax over the choices' log-likelihoods, of the chosen choice",
           "tasks": tasks, "groups": groups, "skipped": skipped, "figure": None}
    panels = _panels(record, out)
    if panels and out_dir is not None:  # None: the results cannot be saved, so neither can a figure
        name = f"{record.get('suite', 'suite')}-reliability.png"
        reliability_diagram(panels, Path(out_dir) / name, title=_figure_title(record))
        out["figure"] = name
    return out


def _names(record: dict, calibration: dict) -> list[str]:
    """Tasks and groups to show, in runner.summary_rows's order: the suite's own, then any other
    calibrated task that is not inside one of the suite's groups."""
    inner = {t for subs in (record.get("group_subtasks") or {}).values() for t in subs}
    known = {**calibration.get("tasks", {}), **calibration.get("groups", {})}
    own = list(record.get("tasks") or [])
    names = own + [t for t in calibration.get("tasks", {}) if t not in own and t not in inner]
    return [n for n in dict.fromkeys(names) if n in known]


def _panels(record: dict, calibration: dict) -> dict[str, dict]:
    known = {**calibration.get("tasks", {}), **calibration.get("groups", {})}
    return {n: known[n] for n in _names(record, calibration)[:FIGURE_PANELS]}


def _figure_title(record: dict) -> str:
    prov = record.get("provenance") or {}
    limit = prov.get("limit")
    return f"{record.get('suite', '')}  ({prov.get('arch') or 'run'}, limit {limit or 'none'})"


def reliability_diagram(panels: dict[str, dict], path: Path, title: str = "") -> Path:
    """One column per task or group: accuracy against confidence over the 15 equal-width bins
    (bars; the diagonal is perfect calibration, red the gap) with the 10 equal-mass bins as
    points; the count of documents per bin; the selective-accuracy curve with the perfect
    ranking's. Written with matplotlib's Agg canvas (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from hmst_bench.util import atomic_save

    cols = len(panels)
    fig = Figure(figsize=(4.2 * cols, 9.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, cols, squeeze=False, gridspec_kw={"height_ratios": [3, 1.2, 2.2]})
    for col, (name, m) in enumerate(panels.items()):
        rel, hist, sel = axes[0][col], axes[1][col], axes[2][col]
        width = 1.0 / len(m["bins_ew15"])
        full = [b for b in m["bins_ew15"] if b["n"]]
        lo = [b["lo"] for b in full]
        rel.bar(lo, [b["accuracy"] for b in full], width=width, align="edge", color="#4c72b0",
                edgecolor="black", linewidth=0.6, label="accuracy (15 equal-width bins)")
        rel.bar(lo, [b["confidence"] - b["accuracy"] for b in full], bottom=[b["accuracy"] for b in full],
                width=width, align="edge", color="#dd4444", alpha=0.35, edgecolor="#dd4444", label="gap")
        mass = [b for b in m["bins_em10"] if b["n"]]
        rel.plot([b["confidence"] for b in mass], [b["accuracy"] for b in mass], "o", color="#ff9f1c",
                 markeredgecolor="black", markersize=5, label="10 equal-mass bins")
        rel.plot([0, 1], [0, 1], "--", color="gray", linewidth=1)
        rel.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy",
                title=f"{name}  (n={m['n']})\nECE em10 {m['ece_em10']:.3f}  ew15 {m['ece_ew15']:.3f}  "
                      f"Brier {m['brier']:.3f}")
        rel.title.set_fontsize(9)
        rel.legend(loc="upper left", fontsize=7)
        hist.bar([b["lo"] for b in m["bins_ew15"]], [b["n"] for b in m["bins_ew15"]], width=width, align="edge",
                 color="#8c8c8c", edgecolor="black", linewidth=0.6)
        hist.set(xlim=(0, 1), xlabel="confidence (softmax of the chosen answer)", ylabel="documents")
        cov, acc = m["selective"]["coverage"], m["selective"]["accuracy"]
        sel.plot(cov, acc, color="#4c72b0", label=f"selective accuracy (AURC {m['aurc']:.3f})")
        n, hits = m["n"], round(m["accuracy"] * m["n"])
        sel.plot(cov, [min(1.0, hits / max(1, round(c * n))) for c in cov], "--", color="gray",
                 label=f"perfect ranking (AURC {m['aurc_optimal']:.3f})")
        sel.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="coverage (most confident first)", ylabel="accuracy")
        sel.legend(loc="lower left", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return path


def summary_rows(record: dict) -> list[dict]:
    """Rows (task, metric, filter, n_shot, value, stderr, n) of the headline calibration figures
    (ece_em10, ece_ew15, brier, aurc), for the same tasks and groups runner.summary_rows shows;
    [] for a record without calibration."""
    calibration = record.get("calibration") or {}
    known = {**calibration.get("tasks", {}), **calibration.get("groups", {})}
    rows = []
    for name in _names(record, calibration):
        entry = known[name]
        for metric in HEADLINE:
            rows.append({"task": name, "metric": metric, "filter": entry["filter"],
                         "n_shot": (record.get("n-shot") or {}).get(name), "value": entry[metric],
                         "stderr": None, "n": entry["n"]})
    return rows
