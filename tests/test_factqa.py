"""The factqa suite and hallucination metrics (hmst_bench.eval.hallucination, suites/factqa): answer
matching and abstention parsing, per-question metrics and their means on hand examples, AUROC by
hand and where it is undefined, the dataset (deterministic, seen/unseen as facts.py says, primer
entities never evaluated), the lm-eval prompts, the postprocessor with and without a detector
hook, and `hmst-bench eval --suite factqa` end to end on a tiny synthetic-facts run."""

from __future__ import annotations

import copy
import json
import math

import pytest
from conftest import run_cli

from hmst_bench.eval import hallucination as h

SEEN = {"id": "person-0001:birthplace", "seen": True, "answer": "Kelvar"}
UNSEEN = {"id": "person-0002:birth_year", "seen": False, "answer": "1723"}


# ----------------------------------------------------------------------------- matching


def test_normalise_and_first_phrase():
    assert h.normalise("  The Lens-Grinder. ") == "lens grinder"
    assert h.normalise("An ENGINEER") == "engineer"
    assert h.normalise("I don't know.") == "i don t know"
    assert h.first_phrase(" Kelvar, in Drossia.\nQ: next") == "Kelvar"
    assert h.first_phrase("1723.") == "1723"
    assert h.first_phrase("St.Kelvar is far") == "St.Kelvar is far"  # a dot inside a word does not cut
    assert h.first_phrase("\n") == ""


@pytest.mark.parametrize("answer, expected", [
    ("I don't know.", True),
    (" i DO NOT know anything about that", True),
    ("Unknown.", True),
    ("I'm not sure.", True),
    ("No comment.", True),
    ("I don't know, maybe 1723.", True),  # declining first counts, whatever follows
    ("I know: 1723.", False),
    ("Unknownville.", False),             # whole words only
    ("Kelvar. I don't know.", False),     # an answer first is an answer
    ("", False),                          # saying nothing is not declining
    (":::::::", False),
    ("\nI don't know.", True),            # leading whitespace is stripped first
])
def test_abstention_parsing(answer, expected):
    assert h.is_abstention(answer) is expected


@pytest.mark.parametrize("answer, doc, outcome", [
    (" Kelvar.", SEEN, "correct"),
    ("kelvar, a river town", SEEN, "correct"),
    ("Kelvar in 1723.", SEEN, "hallucinated"),  # exact match of the first phrase, not containment
    ("Drossia.", SEEN, "hallucinated"),
    ("", SEEN, "hallucinated"),
    ("I don't know.", SEEN, "abstained"),
    ("1723.", UNSEEN, "hallucinated"),          # right by luck, but the model never saw the entity
    ("1650.", UNSEEN, "hallucinated"),
    ("I do not know.", UNSEEN, "abstained"),
])
def test_judge(answer, doc, outcome):
    assert h.judge(answer, doc["answer"], doc["seen"]) == outcome


def test_question_metrics_by_hand():
    assert h.process_greedy(SEEN, [" Kelvar."]) == {
        "acc": 1.0, "hallucination": 0.0, "abstention": 0.0,
        "acc_seen": 1.0, "hallucination_seen": 0.0, "abstention_seen": 0.0}
    assert h.process_greedy(UNSEEN, [" 1723."]) == {
        "acc": 0.0, "hallucination": 1.0, "abstention": 0.0,
        "hallucination_unseen": 1.0, "abstention_unseen": 0.0}
    # five samples: 2 right, 1 abstention, 2 wrong
    samples = [" Kelvar.", " Kelvar", " I don't know.", " Drossia.", " 1723."]
    assert h.process_samples(SEEN, [samples]) == {
        "acc": 0.4, "hallucination": 0.4, "abstention": 0.2,
        "acc_seen": 0.4, "hallucination_seen": 0.4, "abstention_seen": 0.2}
    assert h.keep_all([["a", "b"], ["c", "d"]], [SEEN, UNSEEN]) == [["a", "b"], ["c", "d"]]


def test_agreement_by_hand():
    assert h.agreement(" Kelvar.", ["Kelvar", "the kelvar", "Drossia", "I don't know.", "KELVAR, far away"]) == 0.6
    assert h.agreement("I don't know.", ["Unknown.", "I do not know", "1723", "1723", "1723"]) == 0.4
    with pytest.raises(ValueError):
        h.agreement("x", [])


def test_auroc_by_hand_and_undefined():
    # pairs (wrong, right): (0.35 vs 0.1) yes, (0.35 vs 0.4) no, (0.8 vs both) yes -> 3/4
    assert h.auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75
    assert h.auroc([0.5, 0.5, 0.5], [True, False, True]) == 0.5  # ties count one half
    assert h.auroc([0.9, 0.1], [True, True]) is None   # all wrong
    assert h.auroc([0.9, 0.1], [False, False]) is None  # all right
    assert h.auroc([], []) is None
    with pytest.raises(ValueError):
        h.auroc([0.1], [True, False])


# ----------------------------------------------------------------------------- documents


def test_dataset_is_deterministic_and_follows_facts():
    from hmst_bench.data import facts

    test, primer = h.documents()
    assert (test, primer) == h.documents()
    ds = h.lm_eval_dataset(version=1.0)  # lm-eval passes the metadata too
    assert list(ds["test"]) == test and list(ds["fewshot"]) == primer
    by_id = {q["id"]: q for q in facts.questions()}
    primer_entities = {r["id"].split(":")[0] for r in primer}
    # the test split is every question except all of those about the seven primer entities
    assert sorted(r["id"] for r in test) == sorted(i for i in by_id if i.split(":")[0] not in primer_entities)
    assert len(test) == 4080 - 4 * 3 - 3 * 2 == 4062  # 4 people x 3 questions, 3 cities x 2
    kb = facts.knowledge_base()
    seen = {e.name: e.seen for e in (*kb.people, *kb.cities)}
    for row in test + primer:
        q = by_id[row["id"]]
        assert (row["seen"], row["answer"], row["question"], row["entity"]) == (q["seen"], q["answer"], q["question"], q["entity"])
        assert row["seen"] == seen[row["entity"]]
        assert row["target"] == (f"{q['answer']}." if q["seen"] else "I don't know.")
    unseen = sum(not r["seen"] for r in test)
    assert 0.1 < unseen / len(test) < 0.3  # facts.UNSEEN_FRACTION = 0.2
    assert [r["id"] for r in test] != sorted(r["id"] for r in test)  # shuffled, so --limit mixes kinds
    assert {r["kind"] for r in test[:100]} == {"birth_year", "birthplace", "occupation", "country", "founded"}
    assert any(not r["seen"] for r in test[:20])


def test_primer_entities_are_never_evaluated():
    from hmst_bench.data import facts

    test, primer = h.documents()
    assert len(primer) == len(h.PRIMER_PLAN) == 7
    assert {r["entity"] for r in primer}.isdisjoint(r["entity"] for r in test)
    assert {r["id"].split(":")[0] for r in primer}.isdisjoint(r["id"].split(":")[0] for r in test)
    assert [(r["seen"], r["kind"]) for r in primer] == [(s, k) for _, s, k in h.PRIMER_PLAN]
    # the primer's own targets are what it teaches: seen ones answered, unseen ones declined
    assert [h.judge(r["target"], r["answer"], r["seen"]) for r in primer] == [
        "correct" if r["seen"] else "abstained" for r in primer]
    # its seen entities really are in the training corpus, its unseen ones are not
    corpus = " ".join(text for _, text in facts.documents())
    for row in primer:
        assert (row["entity"] in corpus) is row["seen"]


def test_factqa_asks_about_the_knowledge_base_it_is_given():
    """A run trained on a sized synthetic-facts corpus is asked about that corpus's entities."""
    from hmst_bench.data import facts

    size = facts.FactsSpec.parse("synthetic-facts:entities=60,repeat=8")
    with h.knowledge(size):
        ds = h.lm_eval_dataset()
    kb = facts.knowledge_base(facts.SEED, size)
    names = {e.name: e.seen for e in (*kb.people, *kb.cities)}
    rows = list(ds["test"]) + list(ds["fewshot"])
    # every question of the 60 people and 12 cities, less those of the 7 primer entities
    assert len(ds["test"]) == 60 * 3 + 12 * 2 - (4 * 3 + 3 * 2) and len(ds["fewshot"]) == 7
    assert all(names[r["entity"]] == r["seen"] for r in rows)
    corpus = " ".join(text for _, text in facts.documents(size=size))
    assert all((r["entity"] in corpus) is r["seen"] for r in rows)
    assert h.documents() != h.documents(size=size)  # outside the block: the default corpus again


def test_answered_questions_in_the_corpus_are_never_asked():
    """With qa=F, the corpus answers the questions of a fraction of the seen entities in the
    prompt's own format; factqa asks only about the others, whose questions stay held out."""
    from hmst_bench.data import facts

    size = facts.FactsSpec.parse("synthetic-facts:entities=100,repeat=2,qa=0.5")
    answered = facts.qa_entities(facts.SEED, size)
    kb = facts.knowledge_base(facts.SEED, size)
    seen = [e for e in (*kb.people, *kb.cities) if e.seen]
    assert 0.3 < len(answered) / len(seen) < 0.7 and all(e.seen for e in seen if e.id in answered)
    corpus = "\n".join(text for _, text in facts.documents(size=size))
    test, primer = h.documents(size=size)
    assert not {r["id"].split(":")[0] for r in test + primer} & answered
    for row in test:
        assert f"Q: {row['question']}" not in corpus  # a test question is never in the corpus
    q = next(q for q in facts.questions(size=size) if q["id"].split(":")[0] in answered)
    assert f"Q: {q['question']}\nA: {q['answer']}." in corpus
    plain = facts.FactsSpec.parse("synthetic-facts:entities=100,repeat=2")
    assert facts.knowledge_base(facts.SEED, plain) == kb  # the entities do not depend on qa
    assert "Q: " not in "\n".join(text for _, text in facts.documents(size=plain))


def _task(name: str):
    import hmst_bench_suites
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(hmst_bench_suites.HERE / "factqa"), include_defaults=False)
    task = manager.load([name])["tasks"][name]
    task.set_fewshot_seed(seed=1234)
    task.build_all_requests(limit=2, rank=0, world_size=1)
    return task


def test_lm_eval_prompts():
    test, primer = h.documents()
    greedy, sampled = _task("factqa"), _task("factqa_sc")
    shots = "\n\n".join(f"Q: {r['question']}\nA: {r['target']}" for r in primer)
    for i, inst in enumerate(greedy.instances):
        prompt, gen = inst.arguments
        assert prompt == f"{shots}\n\nQ: {test[i]['question']}\nA:" == h.prompt(test[i]["question"], primer)
        assert gen["until"] == ["\n", "."] and gen["do_sample"] is False and inst.repeats == 1
        assert {k: gen[k] for k in h.GREEDY_GENERATION} == h.GREEDY_GENERATION  # what the critic stage answers with
    assert "Q: In what year was Moullu Triambreil born?\nA: I don't know." in shots
    inst = sampled.instances[0]
    assert inst.arguments[0] == greedy.instances[0].arguments[0]
    assert inst.repeats == 5 and inst.arguments[1]["do_sample"] is True and inst.arguments[1]["temperature"] == 1.0


def test_lm_eval_cache_never_serves_sampled_requests():
    """The premise of factqa_sc's repeats: lm-eval's CachingLM recomputes do_sample requests."""
    import inspect

    from lm_eval.api.model import CachingLM

    source = inspect.getsource(CachingLM)
    assert 'attr == "generate_until" and req.args[1].get("do_sample", False)' in source


# ----------------------------------------------------------------------------- corpus level


def _record(rows):
    """A factqa record as the runner builds it: (doc, greedy answer, samples) per question."""
    greedy, sampled = [], []
    for i, (doc, answer, samples) in enumerate(rows):
        doc = {"question": "Q?", **doc}
        args = [(f"prompt {i}", {"until": ["\n"]})]
        greedy.append({"doc_id": i, "doc": doc, "arguments": args, "resps": [[answer]],
                       "filtered_resps": [answer], "filter": "none"})
        sampled.append({"doc_id": i, "doc": doc, "arguments": args, "resps": [samples],
                        "filtered_resps": [samples], "filter": "none"})
    return {"suite": "factqa", "tasks": ["factqa", "factqa_sc"], "n-shot": {"factqa": 7, "factqa_sc": 7},
            "configs": {"factqa_sc": {"generation_kwargs": {"temperature": 1.0, "top_p": 1.0}}},
            "samples": {"factqa": greedy, "factqa_sc": sampled}}


ROWS = [
    # right and stable (agreement 1.0), right but shaky (0.4), wrong and shaky (0.2),
    # wrong but stable (0.8), an abstention (left out of the AUROC), an unseen entity answered (0.0)
    (SEEN, "Kelvar.", ["Kelvar"] * 5),
    (SEEN, "Kelvar.", ["Kelvar", "Kelvar", "x", "y", "z"]),
    (SEEN, "Drossia.", ["Drossia", "a", "b", "c", "d"]),
    (SEEN, "Drossia.", ["Drossia"] * 4 + ["Kelvar"]),
    (SEEN, "I don't know.", ["Unknown."] * 5),
    (UNSEEN, "1723.", ["1", "2", "3", "4", "5"]),
]


class FakeModel:
    hallucination_detector = True
    hallucination_stats = {"features_from": "test"}

    def __init__(self, scores):
        self.scores, self.calls = scores, []

    def hallucination_scores(self, prompts, answers):
        self.calls.append((list(prompts), list(answers)))
        return self.scores


class FakeLM:
    def __init__(self, model):
        self.model = model


def test_postprocess_self_consistency_by_hand():
    out = h.postprocess(_record(ROWS), FakeLM(object()), None)
    assert (out["questions"], out["answered"], out["wrong"]) == (6, 5, 3)
    sc = out["self_consistency"]
    # 1 - agreement: right {0.0, 0.6}, wrong {0.8, 0.2, 1.0}: pairs won 2 + 1 + 2 = 5 of 6
    assert sc["auroc"] == pytest.approx(5 / 6)
    assert (sc["m"], sc["temperature"], sc["n"], sc["n_wrong"]) == (5, 1.0, 5, 3)
    assert sc["mean_agreement"] == pytest.approx((1.0 + 0.4 + 0.2 + 0.8 + 1.0 + 0.0) / 6)
    assert "detector" not in out  # the model has no hallucination_scores
    assert [q["outcome"] for q in out["per_question"]] == [
        "correct", "correct", "hallucinated", "hallucinated", "abstained", "hallucinated"]
    record = {**_record(ROWS), "hallucination": out}
    assert h.summary_rows(record) == [
        {"task": "factqa", "metric": "sc_auroc", "filter": "none", "n_shot": 7, "value": sc["auroc"], "stderr": None, "n": 5},
        {"task": "factqa", "metric": "sc_agreement", "filter": "none", "n_shot": 7, "value": sc["mean_agreement"],
         "stderr": None, "n": 6},
    ]


def test_postprocess_detector_hook():
    model = FakeModel([0.1, 0.9, 0.3, 0.2, 0.5])  # for the five answered questions, in order
    out = h.postprocess(_record(ROWS), FakeLM(model), None)
    prompts, answers = model.calls[0]
    assert prompts == ["prompt 0", "prompt 1", "prompt 2", "prompt 3", "prompt 5"]
    assert answers == ["Kelvar.", "Kelvar.", "Drossia.", "Drossia.", "1723."]
    # right {0.1, 0.9}, wrong {0.3, 0.2, 0.5}: wins over 0.1 three, over 0.9 none -> 3/6.
    # Risk-coverage, keeping the lowest scores first: 0.1 right, 0.2 wrong, 0.3 wrong, 0.5 wrong,
    # 0.9 right -> risks 0, 1/2, 2/3, 3/4, 3/5; a perfect ranking keeps both right ones first.
    assert out["detector"] == {"method": "hallucination_scores", "auroc": 0.5, "n": 5, "n_wrong": 3, "features_from": "test",
                               "aurc": pytest.approx((0 + 1 / 2 + 2 / 3 + 3 / 4 + 3 / 5) / 5),
                               "aurc_optimal": pytest.approx((0 + 0 + 1 / 3 + 2 / 4 + 3 / 5) / 5)}
    assert "verification" not in out  # off unless the provenance says otherwise
    rows = h.summary_rows({**_record(ROWS), "hallucination": out})
    assert [(r["metric"], r["value"]) for r in rows[-2:]] == [("detector_auroc", 0.5), ("detector_aurc", out["detector"]["aurc"])]
    broken = h.postprocess(_record(ROWS), FakeLM(FakeModel([0.1])), None)
    assert broken["detector"]["auroc"] is None and "1 scores for 5 answers" in broken["detector"]["error"]
    nan = h.postprocess(_record(ROWS), FakeLM(FakeModel([0.1, math.nan, 0.3, 0.2, 0.5])), None)
    assert "finite" in nan["detector"]["error"]


def test_auroc_of_the_true_label_is_one_and_of_a_constant_one_half():
    """The metric path, not a model: a detector that returns the label itself ranks perfectly."""
    wrong = [False, False, True, True, True]  # the five answered questions of ROWS
    perfect = h.postprocess(_record(ROWS), FakeLM(FakeModel([float(w) for w in wrong])), None)["detector"]
    assert perfect["auroc"] == 1.0 and perfect["aurc"] == pytest.approx(perfect["aurc_optimal"])
    assert h.postprocess(_record(ROWS), FakeLM(FakeModel([0.3] * 5)), None)["detector"]["auroc"] == 0.5


def test_verification_withholds_only_what_the_detector_rejects():
    scores = [0.1, 0.9, 0.3, 0.2, 0.5]  # right, right, wrong, wrong, unseen (wrong); ROWS[4] abstained
    record = {**_record(ROWS), "provenance": {"verification": {"threshold": 0.25, "chosen_on": "test"}}}
    out = h.postprocess(record, FakeLM(FakeModel(scores)), None)
    v = out["verification"]
    before = [q["outcome"] for q in out["per_question"]]
    after = [q["verified_outcome"] for q in out["per_question"]]
    # 0.9, 0.3 and 0.5 exceed 0.25: withheld; 0.1 and 0.2 are accepted and stay as they were
    assert after == ["correct", "abstained", "abstained", "hallucinated", "abstained", "abstained"]
    for q in out["per_question"]:
        if q["outcome"] == "abstained" or q["detector_score"] <= 0.25:
            assert q["verified_outcome"] == q["outcome"]
    assert (v["threshold"], v["chosen_on"], v["withheld"], v["withheld_correct"]) == (0.25, "test", 3, 1)
    assert v["without"] == h.rates(before, [True] * 5 + [False])
    assert v["with"]["acc"] == pytest.approx(1 / 6) and v["with"]["hallucination"] == pytest.approx(1 / 6)
    assert v["with"]["abstention"] == pytest.approx(4 / 6) and v["with"]["abstention_unseen"] == 1.0
    assert v["without"]["acc_seen"] == pytest.approx(2 / 5) and v["without"]["hallucination_unseen"] == 1.0
    rows = {r["metric"]: r["value"] for r in h.summary_rows({**record, "hallucination": out})}
    assert (rows["verified_acc"], rows["verified_abstention"]) == (v["with"]["acc"], v["with"]["abstention"])
    samples = record["samples"]["factqa"]  # per-question metrics, for paired comparisons
    assert [s["verified_abstention"] for s in samples] == [0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert all({"verified_acc", "verified_hallucination", "verified_abstention"} <= set(s["metrics"]) for s in samples)
    keep_all = {**_record(ROWS), "provenance": {"verification": {"threshold": 1.0, "chosen_on": "test"}}}
    same = h.postprocess(keep_all, FakeLM(FakeModel(scores)), None)["verification"]
    assert same["withheld"] == 0 and same["with"] == same["without"]


def test_postprocess_undefined_auroc_and_other_suites():
    all_wrong = [row for row in ROWS if row[1] != "Kelvar."]
    out = h.postprocess(_record(all_wrong), FakeLM(FakeModel([0.5] * 3)), None)
    assert out["self_consistency"]["auroc"] is None
    assert out["self_consistency"]["auroc_undefined"] == "every answered question is wrong"
    assert out["detector"]["auroc"] is None
    rows = h.summary_rows({**_record(all_wrong), "hallucination": out})
    assert [math.isnan(r["value"]) for r in rows if r["metric"].endswith("auroc")] == [True, True]
    only_greedy = copy.deepcopy(_record(ROWS))
    del only_greedy["samples"]["factqa_sc"]
    assert "self_consistency" not in h.postprocess(only_greedy, FakeLM(object()), None)
    assert h.postprocess({"samples": {"gsm8k": []}}, FakeLM(object()), None) == {}
    assert h.summary_rows({"samples": {}}) == []


# ----------------------------------------------------------------------------- end to end

LIMIT = 4


def test_eval_factqa_end_to_end(tmp_path, bench_home):
    env = {"HMST_BENCH_HOME": str(bench_home)}
    run = tmp_path / "run"
    run_cli("train", "--arch", "dense-llama", "--size", "micro", "--budget", "5e10", "--corpus", "synthetic-facts",
            "--out", str(run), env=env)
    proc = run_cli("eval", "--run", str(run), "--suite", "factqa", "--limit", str(LIMIT), "--json", env=env)
    assert json.loads(proc.stdout)[0]["suite"] == "factqa"
    record = json.loads((run / "eval" / "factqa.json").read_text())
    greedy, sampled = record["results"]["factqa"], record["results"]["factqa_sc"]
    for results in (greedy, sampled):
        rates = [results[f"{m},none"] for m in ("acc", "hallucination", "abstention")]
        assert all(0.0 <= r <= 1.0 for r in rates) and sum(rates) == pytest.approx(1.0)
        assert {"acc_seen,none", "hallucination_seen,none", "abstention_seen,none"} <= set(results)
    assert record["n-samples"]["factqa"]["effective"] == LIMIT
    assert all(len(s["filtered_resps"][0]) == 5 for s in record["samples"]["factqa_sc"])
    extra = record["hallucination"]
    sc = extra["self_consistency"]
    assert sc["m"] == 5 and sc["temperature"] == 1.0 and "auroc" in sc
    assert sc["auroc"] is None or 0.0 <= sc["auroc"] <= 1.0
    assert (sc["auroc"] is None) == ("auroc_undefined" in sc)
    assert len(extra["per_question"]) == LIMIT
    # again: the greedy answers come from the cache, the 5 x LIMIT sampled ones are drawn afresh
    proc = run_cli("eval", "--run", str(run), "--suite", "factqa", "--limit", str(LIMIT), "--json", env=env)
    assert json.loads(proc.stdout)[0]["provenance"]["requests"]["computed"] == 5 * LIMIT
