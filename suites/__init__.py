"""The built-in evaluation suites (importable as `hmst_bench_suites`; registered through the
`hmst_bench` entry point `suites` in the core's pyproject, like any third-party plugin).

Each folder holds lm-eval task configs whose prompts, few-shot selection, filters, metrics and
versions are those of lm-eval 0.4's built-in task of the same name (tests/test_suites.py renders
both on the same documents and compares the requests); only the data source differs: every
config reads its documents from the hmst-bench store through `hmst_bench.eval.store`.
"""

from __future__ import annotations

from pathlib import Path

from hmst_bench import hookimpl
from hmst_bench.eval.suite import SuiteSpec

HERE = Path(__file__).resolve().parent
MMLU_CATEGORIES = ("stem", "humanities", "social_sciences", "other")
# metrics computed after lm-eval from a suite's sample log (SuiteSpec.postprocess: result key -> module)
CALIBRATION = {"calibration": "hmst_bench.eval.calibration"}  # of every multiple-choice task
HALLUCINATION = {"hallucination": "hmst_bench.eval.hallucination"}  # factqa's detectors of wrong answers
LONGCTX = {"longctx": "hmst_bench.eval.longctx"}  # the per-length table; shortens the logged prompts


def mmlu_subjects() -> list[str]:
    """The 57 subjects, one task config each (suites/mmlu/mmlu_<subject>.yaml)."""
    return sorted(p.stem[len("mmlu_"):] for p in (HERE / "mmlu").glob("mmlu_*.yaml"))


def builtin_suites() -> list[SuiteSpec]:
    mmlu_dir, tqa_dir, gsm_dir = (str(HERE / d) for d in ("mmlu", "truthfulqa", "gsm8k"))
    suites = [
        SuiteSpec("mmlu", "MMLU, 57 subjects (14,042 questions), accuracy weighted by size; lm-eval `mmlu`",
                  tasks=("mmlu",), task_dir=mmlu_dir, data=("mmlu",), postprocess=CALIBRATION),
        SuiteSpec("truthfulqa", "TruthfulQA multiple choice: MC1 and MC2 (817 questions)",
                  tasks=("truthfulqa_mc1", "truthfulqa_mc2"), task_dir=tqa_dir, data=("truthfulqa",),
                  postprocess=CALIBRATION),
        SuiteSpec("truthfulqa_mc1", "TruthfulQA MC1: accuracy of the single true answer; lm-eval `truthfulqa_mc1`",
                  tasks=("truthfulqa_mc1",), task_dir=tqa_dir, data=("truthfulqa",), postprocess=CALIBRATION),
        SuiteSpec("truthfulqa_mc2", "TruthfulQA MC2: probability mass on the true answers; lm-eval `truthfulqa_mc2`",
                  tasks=("truthfulqa_mc2",), task_dir=tqa_dir, data=("truthfulqa",), postprocess=CALIBRATION),
        SuiteSpec("gsm8k", "GSM8K, 5-shot, greedy, strict and flexible exact match (1,319 problems); lm-eval `gsm8k`",
                  tasks=("gsm8k",), task_dir=gsm_dir, data=("gsm8k",)),
        SuiteSpec("humaneval", "HumanEval (164 problems), pass@k with the code run in the sandbox; lm-eval `humaneval`",
                  tasks=("humaneval",), task_dir=str(HERE / "humaneval"), data=("humaneval",), executes_code=True),
        SuiteSpec("mbpp", "MBPP test split (500 problems), 3-shot, pass@k in the sandbox; lm-eval `mbpp`",
                  tasks=("mbpp",), task_dir=str(HERE / "mbpp"), data=("mbpp",), executes_code=True),
        SuiteSpec("factqa", "synthetic-facts closed-book QA (4,062 questions): accuracy, hallucination and abstention "
                  "rates, seen/unseen; 5 samples each for the self-consistency AUROC",
                  tasks=("factqa", "factqa_sc"), task_dir=str(HERE / "factqa"), postprocess=HALLUCINATION),
        SuiteSpec("longctx", "key-value and passkey recall at 1x, 4x and 16x the model's window (100 documents each), "
                  "multiple choice of 10 (chance 0.1), accuracy and needle-in-window fraction per length",
                  tasks=("longctx",), task_dir=str(HERE / "longctx"), postprocess={**CALIBRATION, **LONGCTX}),
    ]
    for category in MMLU_CATEGORIES:
        suites.append(SuiteSpec(f"mmlu_{category}", f"MMLU {category.replace('_', ' ')} subjects",
                                tasks=(f"mmlu_{category}",), task_dir=mmlu_dir, data=("mmlu",), postprocess=CALIBRATION))
    for subject in mmlu_subjects():
        suites.append(SuiteSpec(f"mmlu_{subject}", f"MMLU {subject.replace('_', ' ')}",
                                tasks=(f"mmlu_{subject}",), task_dir=mmlu_dir, data=("mmlu",), postprocess=CALIBRATION))
    return suites


@hookimpl
def register_suites(register):
    for suite in builtin_suites():
        register(suite)
