"""Hallucination metrics for the `factqa` suite: closed-book QA over the synthetic-facts knowledge
base, where the model may abstain, and self-consistency / architecture detectors of wrong answers.

Pieces, in the order lm-eval and the runner use them:

- `lm_eval_dataset`: the `custom_dataset` of suites/factqa (a pure function of the facts seed):
  a `test` split of every question of `hmst_bench.data.facts.questions()` except those about the
  seven primer entities, in a fixed shuffled order, and a `fewshot` split, the primer, whose
  entities never appear in `test`.
- `judge`: one answer against its reference: "correct", "abstained" or "hallucinated".
- `process_greedy` / `process_samples`: lm-eval `process_results` for `factqa` (one greedy answer)
  and `factqa_sc` (m sampled answers, kept whole by the `keep_all` filter).
- `postprocess`: the factqa suite's post-processing (`SuiteSpec.postprocess`, key "hallucination").
  For a record holding `factqa`, it scores every greedy answer by its disagreement with the m
  samples and, when the model declares `hallucination_detector` (contract v2), by its
  `hallucination_scores(prompts, answers)`, and reports the AUROC of each for predicting that a
  (non-abstaining) greedy answer is wrong.
- `verify`: with verification on (`eval --verify`, recorded as the provenance's `verification`),
  answers whose detector score exceeds the threshold become abstentions; factqa then reports its
  rates with and without verification, and the detector's risk-coverage AURC.
- `summary_rows`: those corpus-level numbers as rows of the eval table (`runner.summary_rows`'s
  format).

Definitions are in docs/metrics.md ("Hallucination").
"""

from __future__ import annotations

import contextlib
import math
import random
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

GREEDY_TASK = "factqa"
SAMPLED_TASK = "factqa_sc"
ABSTAIN_ANSWER = "I don't know."
# an answer whose first line, normalised, is or starts with one of these declines to answer
ABSTENTION_PHRASES = ("I don't know", "I do not know", "I dont know", "I have no idea", "Unknown",
                      "No comment", "I have no comment", "I'm not sure", "I am not sure")
DETECTOR_METHOD = "hallucination_scores"

# The primer: (entity type, seen in training, question kind), in prompt order. Each line takes the
# first entity of that type and visibility, in knowledge-base order, not used by an earlier line;
# every question about these seven entities is left out of the test split.
PRIMER_PLAN = (
    ("person", True, "birthplace"),
    ("city", True, "country"),
    ("person", False, "birth_year"),
    ("person", True, "occupation"),
    ("city", True, "founded"),
    ("city", False, "country"),
    ("person", True, "birth_year"),
)

OUTCOMES = ("correct", "abstained", "hallucinated")
# the factqa sample metrics verification adds: 1 when the verified outcome is this one
VERIFIED = {"verified_acc": "correct", "verified_hallucination": "hallucinated", "verified_abstention": "abstained"}

# factqa's greedy generation arguments (suites/factqa/factqa.yaml; a test keeps the two equal), for
# code that answers factqa-style questions outside lm-eval (HMST's critic stage)
GREEDY_GENERATION = {"until": ["\n", "."], "do_sample": False, "temperature": 0.0, "max_gen_toks": 24}


# ----------------------------------------------------------------------------- matching


def normalise(text: str) -> str:
    """NFKC, lower case, every character that is not a letter or digit becomes a space, runs of
    spaces collapse, and one leading article (a, an, the) is dropped."""
    text = unicodedata.normalize("NFKC", text).lower()
    words = re.sub(r"[^\w]|_", " ", text).split()
    if words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words)


_ABSTAIN = tuple(normalise(p) for p in ABSTENTION_PHRASES)


def first_line(answer: str) -> str:
    return answer.strip().split("\n", 1)[0].strip()


def first_phrase(answer: str) -> str:
    """The answer's first line up to its first `.`, `,`, `;`, `!` or `?` that ends a word (is
    followed by a space or the end): "Kelvar, in Drossia." -> "Kelvar"."""
    return re.split(r"[.,;!?](?=\s|$)", first_line(answer), maxsplit=1)[0].strip()


def is_abstention(answer: str) -> bool:
    """True when the first line, normalised, is or starts with one of ABSTENTION_PHRASES as whole
    words. Declining must be said: an empty or punctuation-only answer is not an abstention (it
    is judged like any other answer, i.e. wrong)."""
    text = normalise(first_line(answer))
    return any(text == p or text.startswith(p + " ") for p in _ABSTAIN)


def canonical(answer: str) -> str:
    """The form answers are compared in: "<abstain>" for an abstention, else the normalised
    first phrase."""
    return "<abstain>" if is_abstention(answer) else normalise(first_phrase(answer))


def judge(answer: str, reference: str, seen: bool) -> str:
    """"abstained" if the answer declines; else "correct" if the entity was seen in training and
    the normalised first phrase equals the normalised reference; else "hallucinated" (a wrong
    answer, or any answer at all about an entity the model never saw)."""
    if is_abstention(answer):
        return "abstained"
    if seen and normalise(first_phrase(answer)) == normalise(reference):
        return "correct"
    return "hallucinated"


def question_metrics(answer: str, doc: dict) -> dict[str, float]:
    """acc, hallucination, abstention (0/1, they sum to 1) and the same under the question's part:
    acc_seen, hallucination_seen, abstention_seen, or hallucination_unseen, abstention_unseen
    (no acc_unseen: a question about an unseen entity has no correct answer but "I don't know")."""
    outcome = judge(answer, doc["answer"], bool(doc["seen"]))
    values = {"acc": outcome == "correct", "hallucination": outcome == "hallucinated",
              "abstention": outcome == "abstained"}
    out = {k: float(v) for k, v in values.items()}
    part = "seen" if doc["seen"] else "unseen"
    for key, value in values.items():
        if part == "seen" or key != "acc":
            out[f"{key}_{part}"] = float(value)
    return out


def process_greedy(doc: dict, results: Sequence[Any]) -> dict[str, float]:
    """lm-eval process_results of `factqa`: results[0] is the one greedy answer."""
    return question_metrics(results[0], doc)


def process_samples(doc: dict, results: Sequence[Any]) -> dict[str, float]:
    """lm-eval process_results of `factqa_sc`: results[0] holds the m sampled answers; each metric
    is its mean over them (the rates of one answer sampled at the task's temperature)."""
    answers = list(results[0])
    per = [question_metrics(a, doc) for a in answers]
    return {key: sum(p[key] for p in per) / len(per) for key in per[0]}


def keep_all(resps: Iterable, docs: Iterable) -> list:
    """lm-eval filter for `factqa_sc`: keep every repeat's answer (the default keeps the first)."""
    return [list(r) for r in resps]


def agreement(greedy: str, samples: Sequence[str]) -> float:
    """Fraction of the sampled answers whose canonical form equals the greedy answer's."""
    if not samples:
        raise ValueError("agreement needs at least one sampled answer")
    target = canonical(greedy)
    return sum(canonical(s) == target for s in samples) / len(samples)


def auroc(scores: Sequence[float], wrong: Sequence[bool]) -> float | None:
    """ROC AUC of `scores` (higher = more likely wrong) for the labels `wrong`, by scikit-learn;
    None when it is undefined: no questions, or all of them right, or all of them wrong."""
    labels = [bool(w) for w in wrong]
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores for {len(labels)} labels")
    if not labels or all(labels) or not any(labels):
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score([int(x) for x in labels], [float(s) for s in scores]))


def _undefined_reason(wrong: Sequence[bool]) -> str | None:
    if not wrong:
        return "no question was answered (every greedy answer abstained)"
    if all(wrong):
        return "every answered question is wrong"
    if not any(wrong):
        return "every answered question is right"
    return None


# ----------------------------------------------------------------------------- documents


def _question_kind(q: dict) -> str:
    return q["id"].split(":", 1)[1]


def _entity_id(q: dict) -> str:
    return q["id"].split(":", 1)[0]


def _row(q: dict) -> dict:
    return {
        "id": q["id"],
        "kind": _question_kind(q),
        "entity": q["entity"],
        "seen": bool(q["seen"]),
        "question": q["question"],
        "answer": q["answer"],
        # the ideal response: the fact for a seen entity, an abstention for an unseen one
        "target": f"{q['answer']}." if q["seen"] else ABSTAIN_ANSWER,
    }


_knowledge: Any = None  # the FactsSpec of the evaluated run's corpus, set by `knowledge`


@contextlib.contextmanager
def knowledge(size: Any) -> Iterator[None]:
    """The knowledge base (`facts.FactsSpec`) the factqa tasks built inside ask about: the
    evaluated run's training corpus when that is synthetic-facts, so a sized corpus is asked
    about its own entities."""
    global _knowledge
    previous, _knowledge = _knowledge, size
    try:
        yield
    finally:
        _knowledge = previous


def documents(seed: int | None = None, size: Any = None) -> tuple[list[dict], list[dict]]:
    """(test rows, primer rows) for the facts knowledge base of `seed` (default facts.SEED) and
    `size` (a facts.FactsSpec; default the one `knowledge` set, else the default corpus).

    The primer follows PRIMER_PLAN; the test split is every other question, shuffled with
    random.Random(f"factqa:{seed}") so that the first N (`--limit N`) mix kinds and parts."""
    from hmst_bench.data import facts

    seed = facts.SEED if seed is None else int(seed)
    size = size or _knowledge or facts.FactsSpec()
    kb = facts.knowledge_base(seed, size)
    by_id = {q["id"]: q for q in facts.questions(seed, size)}
    answered = facts.qa_entities(seed, size)  # answered in the corpus: never asked
    used: set[str] = set(answered)
    primer, taken = [], set()
    for kind, seen, question in PRIMER_PLAN:
        pool = [e for e in (kb.people if kind == "person" else kb.cities) if e.seen == seen and e.id not in taken]
        # an entity factqa could ask about; in a knowledge base too small for that, one the corpus answers
        entity = next((e for e in pool if e.id not in used), None) or next((e for e in pool if e.id in answered), None)
        if entity is None:
            raise ValueError(f"{size.text} has too few {'seen' if seen else 'unseen'} {kind}s for factqa's primer; "
                             "use a larger entities=N")
        used.add(entity.id)
        taken.add(entity.id)
        primer.append(_row(by_id[f"{entity.id}:{question}"]))
    test = [_row(q) for q in by_id.values() if _entity_id(q) not in used]
    random.Random(f"factqa:{seed}").shuffle(test)
    return test, primer


def prompt(question: str, primer: Sequence[dict]) -> str:
    """The factqa prompt lm-eval builds for `question` (suites/factqa: the primer rows as
    "Q: ...\nA: <target>" joined by blank lines, then the question); a test keeps them equal."""
    shots = "\n\n".join(f"Q: {row['question']}\nA: {row['target']}" for row in primer)
    return f"{shots}\n\nQ: {question}\nA:"


def lm_eval_dataset(facts_seed: int | None = None, **_ignored) -> Any:
    """The `custom_dataset` hook (lm-eval passes metadata and dataset_kwargs; others are ignored):
    a DatasetDict with the `test` and `fewshot` splits of `documents(facts_seed)`."""
    import datasets

    test, primer = documents(facts_seed)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(test),
                                 "fewshot": datasets.Dataset.from_list(primer)})


# ----------------------------------------------------------------------------- corpus level


def _prompt(sample: dict) -> str:
    args = sample["arguments"]
    if isinstance(args, dict):  # lm-eval's saved form: {"gen_args_0": {"arg_0": prompt, ...}}
        return args["gen_args_0"]["arg_0"]
    return args[0][0]


def _greedy_answer(sample: dict) -> str:
    resp = sample["filtered_resps"][0]
    return resp if isinstance(resp, str) else resp[0]


def _scored(scores: Sequence[float], wrong: Sequence[bool]) -> dict:
    value = auroc(scores, wrong)
    out = {"auroc": value, "n": len(wrong), "n_wrong": int(sum(wrong))}
    if value is None:
        out["auroc_undefined"] = _undefined_reason(wrong)
    return out


def _run_detector(model: Any, prompts: list[str], answers: list[str]) -> list[float]:
    import torch

    with torch.no_grad():
        scores = list(model.hallucination_scores(prompts, answers))
    if len(scores) != len(answers):
        raise ValueError(f"returned {len(scores)} scores for {len(answers)} answers")
    scores = [float(s) for s in scores]
    if not all(math.isfinite(s) for s in scores):
        raise ValueError("returned a score that is not a finite number")
    return scores


def postprocess(record: dict, lm: Any, out_dir: Any = None) -> dict:
    """The "hallucination" post-processing of the factqa suite; {} for a record without the `factqa` task.

    Over the questions whose greedy answer is not an abstention, label = the answer is wrong
    (judge() says "hallucinated"); report the AUROC of 1 - agreement (self-consistency, when the
    record holds `factqa_sc`) and of the model's `hallucination_scores` (when it has one)."""
    samples = record.get("samples") or {}
    greedy_rows = samples.get(GREEDY_TASK)
    if not greedy_rows:
        return {}
    greedy_rows = [s for s in greedy_rows if s.get("filter", "none") == "none"]
    sampled = {s["doc_id"]: list(s["filtered_resps"][0]) for s in samples.get(SAMPLED_TASK) or []}

    questions = []
    for s in sorted(greedy_rows, key=lambda s: s["doc_id"]):
        doc, answer = s["doc"], _greedy_answer(s)
        row = {"doc_id": s["doc_id"], "id": doc["id"], "seen": bool(doc["seen"]), "answer": first_line(answer),
               "reference": doc["answer"], "outcome": judge(answer, doc["answer"], bool(doc["seen"]))}
        if s["doc_id"] in sampled:
            row["samples"] = [first_line(a) for a in sampled[s["doc_id"]]]
            row["agreement"] = agreement(answer, sampled[s["doc_id"]])
        questions.append((s, answer, row))
    answered = [(s, a, r) for s, a, r in questions if r["outcome"] != "abstained"]
    wrong = [r["outcome"] == "hallucinated" for _, _, r in answered]
    out: dict[str, Any] = {
        "task": GREEDY_TASK,
        "label": "greedy answer is wrong; questions whose greedy answer abstained are left out",
        "questions": len(questions), "answered": len(answered), "wrong": int(sum(wrong)),
    }

    if sampled and all("agreement" in r for _, _, r in questions):
        config = (record.get("configs") or {}).get(SAMPLED_TASK) or {}
        gen = config.get("generation_kwargs") or {}
        out["self_consistency"] = {
            "task": SAMPLED_TASK,
            "m": min(len(v) for v in sampled.values()),
            "temperature": gen.get("temperature"),
            "top_p": gen.get("top_p", 1.0),
            "mean_agreement": sum(r["agreement"] for _, _, r in questions) / len(questions),
            **_scored([1.0 - r["agreement"] for _, _, r in answered], wrong),
        }

    model = getattr(lm, "model", None)  # lm-eval's own models (HFLM) have no hmst-bench model
    if getattr(model, "hallucination_detector", False):
        detector: dict[str, Any] = {"method": DETECTOR_METHOD}
        try:
            scores = _run_detector(model, [_prompt(s) for s, _, _ in answered],
                                   [first_line(a) for _, a, _ in answered]) if answered else []
        except Exception as exc:  # noqa: BLE001 - a broken detector is reported, not fatal to the suite
            detector.update({"auroc": None, "error": f"{type(exc).__name__}: {exc}"})
        else:
            for (_, _, r), score in zip(answered, scores):
                r["detector_score"] = score
            detector.update(_scored(scores, wrong))
            detector.update(dict(model.hallucination_stats))
            detector.update(_risk_coverage(scores, wrong))
        out["detector"] = detector
    settings = (record.get("provenance") or {}).get("verification")
    if settings and "error" not in out.get("detector", {}):
        out["verification"] = verify([r for _, _, r in questions], settings)
        for sample, _, r in questions:  # per-question metrics, so comparisons can pair them by item
            for key, outcome in VERIFIED.items():
                sample[key] = float(r["verified_outcome"] == outcome)
            sample["metrics"] = list(sample.get("metrics") or []) + [k for k in VERIFIED if k not in (sample.get("metrics") or [])]

    out["per_question"] = [r for _, _, r in questions]
    return out


def _risk_coverage(scores: Sequence[float], wrong: Sequence[bool]) -> dict:
    """AURC of the detector (answers kept from the lowest score up; risk = share wrong among the
    kept; calibration.aurc) and that of a perfect ranking, over the answered questions."""
    if not wrong:
        return {"aurc": None, "aurc_optimal": None}
    from hmst_bench.eval.calibration import aurc, aurc_optimal

    correct = [0.0 if w else 1.0 for w in wrong]
    return {"aurc": aurc([-s for s in scores], correct), "aurc_optimal": aurc_optimal(correct)}


def rates(outcomes: Sequence[str], seen: Sequence[bool]) -> dict[str, float]:
    """The factqa rates of a list of outcomes (`question_metrics`' keys, as means; a part with
    no question is left out)."""
    out: dict[str, float] = {}
    for part, keep in (("", None), ("_seen", True), ("_unseen", False)):
        chosen = [o for o, s in zip(outcomes, seen) if keep is None or s == keep]
        if not chosen:
            continue
        for key, outcome in (("acc", "correct"), ("hallucination", "hallucinated"), ("abstention", "abstained")):
            if key != "acc" or part != "_unseen":
                out[key + part] = sum(o == outcome for o in chosen) / len(chosen)
    return out


def verify(rows: Sequence[dict], settings: dict) -> dict:
    """Verification: every answer whose detector score exceeds settings["threshold"] is withheld
    (becomes the abstention); answers the detector accepts, and abstentions, are unchanged.
    A threshold of None (a model without a detector) withholds nothing, so such a model's verified
    rates are its plain ones. Returns the settings, how many answers were withheld and the rates
    without and with it; each row gets its `verified_outcome`."""
    threshold = settings["threshold"]
    for r in rows:
        withheld = threshold is not None and r["outcome"] != "abstained" and r["detector_score"] > float(threshold)
        r["verified_outcome"] = "abstained" if withheld else r["outcome"]
    seen = [r["seen"] for r in rows]
    return {**settings, "withheld": sum(r["verified_outcome"] != r["outcome"] for r in rows),
            "withheld_correct": sum(r["verified_outcome"] != r["outcome"] and r["outcome"] == "correct" for r in rows),
            "without": rates([r["outcome"] for r in rows], seen),
            "with": rates([r["verified_outcome"] for r in rows], seen)}


def summary_rows(record: dict) -> list[dict]:
    """Rows (task, metric, filter, n_shot, value, stderr, n) for the numbers `postprocess` adds:
    sc_auroc and sc_agreement (with `factqa_sc`), detector_auroc (with a detector). A value is
    NaN where it is undefined (an AUROC over all-right or all-wrong answers; the result file
    holds null and the reason), so tables format every row as a number."""
    extra = record.get("hallucination") or {}
    n_shot = (record.get("n-shot") or {}).get(GREEDY_TASK)
    rows = []

    def add(metric: str, value: float | None, n: int) -> None:
        rows.append({"task": GREEDY_TASK, "metric": metric, "filter": "none", "n_shot": n_shot,
                     "value": math.nan if value is None else value, "stderr": None, "n": n})

    sc = extra.get("self_consistency")
    if sc:
        add("sc_auroc", sc.get("auroc"), sc.get("n"))
        add("sc_agreement", sc.get("mean_agreement"), extra.get("questions"))
    detector = extra.get("detector")
    if detector:
        add("detector_auroc", detector.get("auroc"), detector.get("n"))
        add("detector_aurc", detector.get("aurc"), detector.get("n"))
    verification = extra.get("verification")
    if verification:
        for key in ("acc", "hallucination", "abstention"):
            add(f"verified_{key}", verification["with"].get(key), extra.get("questions"))
    return rows
