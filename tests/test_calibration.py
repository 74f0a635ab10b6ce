"""Calibration metrics (hmst_bench.eval.calibration): each definition of docs/metrics.md against a
hand-computed example (the arithmetic is in the comments), HELM's equal-mass binning with ties,
the softmax, perfect calibration, AURC of a perfect ranking, the reliability diagram PNG, the
postprocessor on a synthetic lm-eval record, and `hmst-bench eval --suite mmlu` end to end."""

from __future__ import annotations

import inspect
import json
import math

import numpy as np
import pytest
from conftest import SHARED_DATA, run_cli

from hmst_bench.eval import calibration as cal

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- softmax ---------------------------------------------------------------------------------


def test_softmax_normalises_the_choices():
    # lls (0, ln 3, 0): exp gives (1, 3, 1), sum 5, so p = (0.2, 0.6, 0.2)
    p = cal.softmax([0.0, math.log(3.0), 0.0])
    assert p == pytest.approx([0.2, 0.6, 0.2], abs=1e-12)
    assert p.sum() == pytest.approx(1.0, abs=1e-15)
    # shifting every log-likelihood changes nothing; very negative ones do not underflow:
    # (-1000, -1001): p = (1, e^-1) / (1 + e^-1) = (0.7310586, 0.2689414)
    assert cal.softmax([100.0, 100 + math.log(3.0), 100.0]) == pytest.approx(p, abs=1e-12)
    assert cal.softmax([-1000.0, -1001.0]) == pytest.approx([0.7310585786, 0.2689414214], abs=1e-9)
    # a choice at -inf gets 0; all at -inf is uniform
    assert cal.softmax([-math.inf, 0.0]).tolist() == [0.0, 1.0]
    assert cal.softmax([-math.inf] * 4).tolist() == [0.25] * 4


# --- ECE ---------------------------------------------------------------------------------------

CONF = [0.95, 0.85, 0.65, 0.62, 0.35]
CORRECT = [1, 0, 1, 0, 1]


def test_ece_equal_width_by_hand():
    # 15 bins of width 1/15 = 0.0667, each (lo, hi]:
    #   0.95 -> (0.933, 1.0]   n 1, conf 0.95,  acc 1    gap 0.05
    #   0.85 -> (0.800, 0.867] n 1, conf 0.85,  acc 0    gap 0.85
    #   0.65, 0.62 -> (0.600, 0.667] n 2, conf 0.635, acc 0.5  gap 0.135
    #   0.35 -> (0.333, 0.400] n 1, conf 0.35,  acc 1    gap 0.65
    # ECE = (1*0.05 + 1*0.85 + 2*0.135 + 1*0.65) / 5 = 1.82 / 5 = 0.364
    assert cal.ece_equal_width(CONF, CORRECT) == pytest.approx(0.364, abs=1e-12)
    bins = cal.bin_stats(CONF, CORRECT, cal.equal_width_edges(15))
    assert [b["n"] for b in bins] == [0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 1, 0, 1]
    assert bins[9]["confidence"] == pytest.approx(0.635) and bins[9]["accuracy"] == 0.5
    assert bins[0]["confidence"] is None and bins[0]["accuracy"] is None  # empty bins carry no value


def test_equal_width_bins_agree_with_sklearn_calibration_curve():
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(0)
    conf = rng.uniform(0.25, 1.0, 500)
    correct = (rng.uniform(size=500) < conf).astype(float)
    conf[:3] = [1 / 3, 0.4, 1.0]  # values on or near edges
    bins = [b for b in cal.bin_stats(conf, correct, cal.equal_width_edges(15)) if b["n"]]
    prob_true, prob_pred = calibration_curve(correct, conf, n_bins=15, strategy="uniform")
    assert [b["accuracy"] for b in bins] == pytest.approx(prob_true.tolist(), abs=1e-12)
    assert [b["confidence"] for b in bins] == pytest.approx(prob_pred.tolist(), abs=1e-12)


def test_ece_equal_mass_by_hand():
    # 5 documents, 10 bins asked: min(10, 5) = 5 runs of one document each, edges at the midpoints
    # 0.485, 0.635, 0.75, 0.9 and 1.0; each bin's gap is |conf - correct|:
    #   0.35/1 -> 0.65, 0.62/0 -> 0.62, 0.65/1 -> 0.35, 0.85/0 -> 0.85, 0.95/1 -> 0.05
    # ECE = (0.65 + 0.62 + 0.35 + 0.85 + 0.05) / 5 = 2.52 / 5 = 0.504
    assert cal.equal_mass_edges(CONF, 10) == pytest.approx([0.485, 0.635, 0.75, 0.9, 1.0])
    assert cal.ece_equal_mass(CONF, CORRECT) == pytest.approx(0.504, abs=1e-12)
    # 2 bins over 0.1..0.5: runs of 3 and 2 (the longer first), edge (0.3 + 0.4) / 2 = 0.35
    #   bin (0, 0.35]: conf 0.2,  acc 1/3 -> gap 0.13333, n 3
    #   bin (0.35, 1]: conf 0.45, acc 1   -> gap 0.55,    n 2
    # ECE = (3 * 0.13333 + 2 * 0.55) / 5 = (0.4 + 1.1) / 5 = 0.3
    conf, correct = [0.1, 0.2, 0.3, 0.4, 0.5], [0, 0, 1, 1, 1]
    assert cal.equal_mass_edges(conf, 2) == pytest.approx([0.35, 1.0])
    assert cal.ece_equal_mass(conf, correct, 2) == pytest.approx(0.3, abs=1e-12)


def test_equal_mass_binning_keeps_ties_together():
    # sorted 0.3 0.3 0.3 | 0.3 0.8 0.9: the cut falls inside the tie, so its edge is
    # (0.3 + 0.3) / 2 = 0.3 and all four 0.3s go to the lower bin (p <= edge): bins of 4 and 2.
    #   bin (0, 0.3]: conf 0.3,  acc 1/4 -> gap 0.05
    #   bin (0.3, 1]: conf 0.85, acc 1   -> gap 0.15
    # ECE = (4 * 0.05 + 2 * 0.15) / 6 = 0.5 / 6 = 0.083333
    conf, correct = [0.8, 0.3, 0.3, 0.9, 0.3, 0.3], [1, 1, 0, 1, 0, 0]
    edges = cal.equal_mass_edges(conf, 2)
    assert edges == pytest.approx([0.3, 1.0])
    assert [b["n"] for b in cal.bin_stats(conf, correct, edges)] == [4, 2]
    assert cal.ece_equal_mass(conf, correct, 2) == pytest.approx(0.5 / 6, abs=1e-12)
    # one value everywhere: the repeated edges collapse; the second bin is empty and weighs nothing
    bins = cal.bin_stats([0.5] * 4, [1, 0, 1, 0], cal.equal_mass_edges([0.5] * 4, 2))
    assert [(b["hi"], b["n"], b["accuracy"]) for b in bins] == [(0.5, 4, 0.5), (1.0, 0, None)]
    assert cal.ece_from_bins(bins) == 0.0
    # the test cases of HELM's `calibration` package (uncertainty-calibration), ties included
    assert cal.ece_equal_mass([0.1, 0.7, 0.5, 0.9], [0, 1, 0, 1], 2) == pytest.approx(0.25)
    assert cal.ece_equal_mass([0.1, 0.1, 0.7], [0, 1, 1], 2) == pytest.approx(0.4 * 2 / 3 + 0.3 / 3)
    assert cal.ece_equal_mass([0.1] * 4 + [0.7], [0, 1, 0, 0, 1], 2) == pytest.approx(0.15 * 4 / 5 + 0.3 / 5)
    assert cal.ece_equal_mass([0.6, 0.7, 0.8, 0.9], [0, 0, 1, 1], 2) == pytest.approx(0.4)


def test_perfect_calibration_gives_zero_ece():
    # 10 answers at confidence 0.8 of which 8 are right, 5 at 0.6 of which 3 are right: every bin's
    # accuracy equals its confidence. Equal-mass: runs of 2,2,2,2,2,1,1,1,1,1 over five 0.6s and
    # ten 0.8s give the edges 0.6, 0.8, 1.0 (ties collapse), so bins of 5, 10 and 0.
    conf = [0.8] * 10 + [0.6] * 5
    correct = [1] * 8 + [0] * 2 + [1] * 3 + [0] * 2
    assert cal.ece_equal_width(conf, correct) == pytest.approx(0.0, abs=1e-12)
    assert cal.ece_equal_mass(conf, correct) == pytest.approx(0.0, abs=1e-12)
    assert [b["n"] for b in cal.bin_stats(conf, correct, cal.equal_mass_edges(conf))] == [5, 10, 0]


# --- Brier -------------------------------------------------------------------------------------


def test_brier_multiclass_by_hand():
    # doc 1: p = (0.7, 0.2, 0.1), gold 0: 0.3^2 + 0.2^2 + 0.1^2 = 0.09 + 0.04 + 0.01 = 0.14
    # doc 2: p = (0.5, 0.5), gold 1 (two choices only): 0.5^2 + 0.5^2 = 0.5
    # Brier = (0.14 + 0.5) / 2 = 0.32; not halved, also for the two-choice document
    probs = [np.array([0.7, 0.2, 0.1]), np.array([0.5, 0.5])]
    assert cal.brier(probs, [0, 1]) == pytest.approx(0.32, abs=1e-12)
    # a sure right answer scores 0, a sure wrong one 2, uniform over k choices 1 - 1/k
    assert cal.brier([np.array([1.0, 0.0, 0.0, 0.0])], [0]) == 0.0
    assert cal.brier([np.array([0.0, 1.0, 0.0, 0.0])], [0]) == pytest.approx(2.0)
    assert cal.brier([np.full(4, 0.25)], [2]) == pytest.approx(0.75)
    # docs/metrics.md's MMLU example: lls (-1.2, -0.9, -1.5, -2.0), answer B:
    # p = (0.282485, 0.381315, 0.209270, 0.126929); Brier = 0.282485^2 + 0.618685^2 + 0.209270^2
    # + 0.126929^2 = 0.079798 + 0.382771 + 0.043794 + 0.016111 = 0.522474
    p = cal.softmax([-1.2, -0.9, -1.5, -2.0])
    assert p == pytest.approx([0.282485, 0.381315, 0.209270, 0.126929], abs=1e-6)
    assert cal.brier([p], [1]) == pytest.approx(0.522474, abs=1e-6)


def test_brier_is_sklearns_unhalved_multiclass_brier():
    metrics = pytest.importorskip("sklearn.metrics")
    if "scale_by_half" not in inspect.signature(metrics.brier_score_loss).parameters:
        pytest.skip("scikit-learn < 1.7 has no multi-class Brier score")
    rng = np.random.default_rng(2)
    for k in (2, 4):
        probs = [cal.softmax(rng.normal(size=k) * 3) for _ in range(50)]
        gold = rng.integers(k, size=50)
        ours = cal.brier(probs, gold)
        theirs = metrics.brier_score_loss(gold, np.stack(probs), labels=list(range(k)), scale_by_half=False)
        assert ours == pytest.approx(theirs, abs=1e-12)


# --- selective accuracy and AURC ---------------------------------------------------------------


def test_selective_curve_and_aurc_by_hand():
    # by confidence 0.9 0.8 0.7 0.6 the answers are right, wrong, right, wrong:
    #   m = 1: risk 0, m = 2: 1/2, m = 3: 1/3, m = 4: 2/4
    # AURC = (0 + 0.5 + 0.33333 + 0.5) / 4 = 1.33333 / 4 = 0.333333
    conf, correct = [0.7, 0.9, 0.6, 0.8], [1, 1, 0, 0]
    coverage, accuracy = cal.selective_curve(conf, correct)
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert accuracy == pytest.approx([1.0, 0.5, 2 / 3, 0.5])
    assert cal.aurc(conf, correct) == pytest.approx(4 / 12, abs=1e-12)


def test_aurc_of_a_perfect_ranking_is_the_floor():
    # right, right, wrong, wrong by confidence: risks 0, 0, 1/3, 1/2 -> AURC = (5/6) / 4 = 5/24
    conf, correct = [0.9, 0.8, 0.7, 0.6], [1, 1, 0, 0]
    assert cal.aurc(conf, correct) == pytest.approx(5 / 24, abs=1e-12)
    assert cal.aurc_optimal(correct) == pytest.approx(5 / 24, abs=1e-12)
    assert cal.aurc_optimal([1, 1, 1]) == 0.0 and cal.aurc_optimal([0, 0]) == 1.0
    # the worst ranking (wrong first): risks 1, 1, 2/3, 1/2 -> 3.16667 / 4 = 0.791667
    assert cal.aurc([0.6, 0.7, 0.8, 0.9], correct) == pytest.approx(19 / 24, abs=1e-12)


def test_ties_count_with_their_block_mean():
    # 0.9 right, 0.9 wrong, 0.5 right: the tied pair counts 0.5 each, so accuracy 0.5, 0.5, 2/3;
    # AURC = (0.5 + 0.5 + 1/3) / 3 = 0.444444, the mean of the two orders' AURCs:
    #   right first (0, 1/2, 1/3) -> 0.277778; wrong first (1, 1/2, 1/3) -> 0.611111
    conf, correct = [0.9, 0.9, 0.5], [1, 0, 1]
    assert cal.selective_curve(conf, correct)[1] == pytest.approx([0.5, 0.5, 2 / 3])
    assert cal.aurc(conf, correct) == pytest.approx((0.5 + 0.5 + 1 / 3) / 3, abs=1e-12)
    assert cal.aurc(conf[::-1], correct[::-1]) == cal.aurc(conf, correct)  # input order is irrelevant


def test_curve_points_keep_at_most_100():
    coverage, accuracy = cal.selective_curve(np.linspace(1, 0, 250), np.ones(250))
    pts = cal.curve_points(coverage, accuracy)
    assert len(pts["coverage"]) == 100 and pts["coverage"][0] == 0.012 and pts["coverage"][-1] == 1.0
    assert cal.curve_points(*cal.selective_curve([0.5, 0.4], [1, 0]))["coverage"] == [0.5, 1.0]


# --- metrics(), the postprocessor, the figure ---------------------------------------------------


def test_metrics_from_log_likelihoods():
    # doc 0: lls (0, ln 3, 0) -> p (0.2, 0.6, 0.2), chooses 1, gold 1: right, confidence 0.6
    # doc 1: lls (ln 1, ln 1) -> p (0.5, 0.5), a tie: the first choice (0), as lm-eval's acc; gold 1
    # accuracy 1/2, mean confidence 0.55; Brier ((0.04 + 0.16 + 0.04) + (0.25 + 0.25)) / 2 = 0.37
    probs = [cal.softmax([0.0, math.log(3.0), 0.0]), cal.softmax([0.0, 0.0])]
    m = cal.metrics(probs, [1, 1])
    assert m["n"] == 2 and m["choices"] == [2, 3]
    assert m["accuracy"] == 0.5 and m["confidence"] == pytest.approx(0.55)
    assert m["brier"] == pytest.approx(0.37)
    # equal-width: 0.6 in (0.533, 0.6] gap 0.4, 0.5 in (0.467, 0.533] gap 0.5 -> (0.4 + 0.5) / 2
    assert m["ece_ew15"] == pytest.approx(0.45)
    # AURC: 0.6 right then 0.5 wrong: risks 0, 1/2 -> 0.25
    assert m["aurc"] == pytest.approx(0.25) and m["aurc_optimal"] == pytest.approx(0.25)


def _sample(doc_id: int, lls: list[float], target, filt: str = "none") -> dict:
    return {"doc_id": doc_id, "target": target, "filter": filt,
            "arguments": [["Q?", f" {'ABCDEFG'[i]}"] for i in range(len(lls))],
            "resps": [[[ll, False]] for ll in lls], "filtered_resps": [[ll, False] for ll in lls]}


def _record() -> dict:
    mc = {"output_type": "multiple_choice", "target_delimiter": " "}
    rng = np.random.default_rng(1)
    samples = {t: [_sample(i, rng.normal(size=4).tolist(), int(rng.integers(4))) for i in range(12)]
               for t in ("sub_a", "sub_b")}
    samples["sub_b"][0]["target"] = "C"  # a choice given by its text: index 2
    samples["multi_mc2"] = [_sample(0, [-1.0, -2.0], 0)]
    samples["gen"] = [{"doc_id": 0, "target": "x", "filter": "none", "resps": [["x"]], "filtered_resps": ["x"]}]
    return {
        "suite": "toy", "tasks": ["grp", "multi_mc2", "gen"],
        "configs": {"sub_a": mc, "sub_b": mc, "multi_mc2": {**mc, "process_results": "def f(doc, results): ..."},
                    "gen": {"output_type": "generate_until"}},
        "group_subtasks": {"grp": ["sub_a", "sub_b"]}, "n-shot": {"sub_a": 0, "sub_b": 0},
        "samples": samples, "provenance": {"arch": "toy", "limit": 12},
    }


def test_postprocess_on_a_record(tmp_path):
    record = _record()
    out = cal.postprocess(record, None, tmp_path)
    assert set(out["tasks"]) == {"sub_a", "sub_b"} and set(out["skipped"]) == {"multi_mc2"}
    assert "gen" not in out["tasks"] and "gen" not in out["skipped"]  # not multiple choice: ignored
    # the string target "C" read as index 2
    _, _, gold, _ = cal.task_documents(record, "sub_b")
    assert gold[0] == 2
    # the group pools its members' documents
    grp = out["groups"]["grp"]
    assert grp["n"] == 24 and grp["tasks"] == 2
    docs = [cal.task_documents(record, t) for t in ("sub_a", "sub_b")]
    pooled = cal.metrics(docs[0][1] + docs[1][1], docs[0][2] + docs[1][2])
    for key in ("accuracy", "ece_em10", "ece_ew15", "brier", "aurc"):
        assert grp[key] == pytest.approx(pooled[key])
    # accuracy is lm-eval's acc: the first argmax of the log-likelihoods
    acc_a = np.mean([float(np.argmax([r[0] for r in s["filtered_resps"]]) == s["target"])
                     for s in record["samples"]["sub_a"]])
    assert out["tasks"]["sub_a"]["accuracy"] == pytest.approx(acc_a)
    assert out["figure"] == "toy-reliability.png"
    json.dumps(out, allow_nan=False)  # strict JSON: no NaN anywhere
    # summary rows: the suite's own tasks and groups, in the runner's row format
    record["calibration"] = out
    rows = cal.summary_rows(record)
    assert [(r["task"], r["metric"]) for r in rows] == [("grp", m) for m in cal.HEADLINE]
    assert set(rows[0]) == {"task", "metric", "filter", "n_shot", "value", "stderr", "n"}
    assert rows[0]["n"] == 24 and rows[2]["value"] == grp["brier"]
    assert cal.summary_rows({"tasks": ["x"]}) == []


def test_postprocess_without_multiple_choice_is_empty(tmp_path):
    record = _record()
    record["configs"] = {"gen": {"output_type": "generate_until"}}
    record["samples"] = {"gen": record["samples"]["gen"]}
    assert cal.postprocess(record, None, tmp_path) == {}
    assert list(tmp_path.iterdir()) == []


def test_reliability_diagram_is_a_png(tmp_path):
    record = _record()
    cal.postprocess(record, None, tmp_path)
    path = tmp_path / "toy-reliability.png"
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000
    from PIL import Image

    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


# --- end to end through the CLI ----------------------------------------------------------------

LIMIT = 2


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data (HMST_BENCH_SHARED_DATA)")
def test_eval_mmlu_writes_calibration_and_diagram(tmp_path):
    run = tmp_path / "run"
    # trained under the session's home, whose tokenizer and token caches other tests share;
    # the benchmark store in a home of its own, so no other test sees MMLU imported
    run_cli("train", "--arch", "dense-llama", "--size", "micro", "--budget", "3e10", "--corpus", "synthetic-facts",
            "--out", str(run))
    env = {"HMST_BENCH_HOME": str(tmp_path / "home")}
    run_cli("data", "import", "mmlu", str(SHARED_DATA / "mmlu"), env=env)
    run_cli("eval", "--run", str(run), "--suite", "mmlu", "--limit", str(LIMIT), env=env)
    record = json.loads((run / "eval" / "mmlu.json").read_text())
    c = record["calibration"]
    assert c["skipped"] == {} and len(c["tasks"]) == 57
    assert {"mmlu", "mmlu_stem", "mmlu_humanities", "mmlu_social_sciences", "mmlu_other"} <= set(c["groups"])
    pooled = c["groups"]["mmlu"]
    assert pooled["n"] == 57 * LIMIT and pooled["choices"] == [4, 4]
    for key in ("ece_em10", "ece_ew15", "brier", "aurc", "aurc_optimal", "bins_em10", "bins_ew15", "selective"):
        assert key in pooled
    assert 0.0 <= pooled["ece_em10"] <= 1.0 and 0.0 <= pooled["brier"] <= 2.0 and 0.0 <= pooled["aurc"] <= 1.0
    assert len(pooled["bins_ew15"]) == 15 and sum(b["n"] for b in pooled["bins_em10"]) == 57 * LIMIT
    assert pooled["confidence"] >= 0.25  # the top of four probabilities
    # our top-label accuracy is lm-eval's acc
    assert pooled["accuracy"] == pytest.approx(record["groups"]["mmlu"]["acc,none"], abs=1e-12)
    png = run / "eval" / c["figure"]
    assert png.name == "mmlu-reliability.png" and png.read_bytes()[:8] == PNG_SIGNATURE
    assert [r["task"] for r in cal.summary_rows(record)] == ["mmlu"] * 4
