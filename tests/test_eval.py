"""`hmst-bench eval` end to end: a dense run evaluated offline on mmlu, truthfulqa and gsm8k from
the store; result files in lm-eval's format with provenance; a repeat served from the cache; an
interrupted evaluation resuming; agreement with lm-eval's HFLM on the run's transformers copy;
one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import SHARED_DATA, run_cli, run_cli_read_only

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data (HMST_BENCH_SHARED_DATA)")

SUITES = "mmlu,truthfulqa,gsm8k"
LIMIT = 3


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("eval-home")
    env = {"HMST_BENCH_HOME": str(home)}
    for name in ("mmlu", "truthfulqa", "gsm8k"):
        run_cli("data", "import", name, str(SHARED_DATA / name), env=env)
    return home


@pytest.fixture(scope="module")
def evaluated(home, tmp_path_factory):
    """A dense-llama micro run, evaluated once through the CLI; returns (run, --json output)."""
    run = tmp_path_factory.mktemp("eval-run") / "run"
    env = {"HMST_BENCH_HOME": str(home)}
    run_cli("train", "--arch", "dense-llama", "--size", "micro", "--budget", "5e10", "--corpus", "synthetic-facts",
            "--out", str(run), env=env)
    proc = run_cli("eval", "--run", str(run), "--suite", SUITES, "--limit", str(LIMIT), "--json", env=env)
    return run, json.loads(proc.stdout), proc.stderr


def test_eval_writes_result_files_in_lm_eval_format(evaluated):
    run, summary, stderr = evaluated
    assert [s["suite"] for s in summary] == ["mmlu", "truthfulqa", "gsm8k"]
    for suite in ("mmlu", "truthfulqa", "gsm8k"):
        record = json.loads((run / "eval" / f"{suite}.json").read_text())
        for key in ("results", "configs", "versions", "n-shot", "samples", "provenance"):
            assert key in record
        for rows in record["samples"].values():
            assert len({r["doc_id"] for r in rows}) == LIMIT
            for row in rows:
                assert {"doc_id", "arguments", "resps", "filtered_resps", "target"} <= set(row)
        prov = record["provenance"]
        assert prov["limit"] == LIMIT and prov["weights_sha256"] and prov["model_sha256"] and prov["config_hash"]
        assert set(prov["versions"]) >= {"hmst-bench", "lm-eval", "torch"}
        assert all(len(d["sha256"]) == 64 for d in prov["data"].values())
        assert prov["requests"]["from_cache"] == 0 and prov["requests"]["total"] > 0
    mmlu = json.loads((run / "eval" / "mmlu.json").read_text())
    assert mmlu["provenance"]["requests"]["total"] == 57 * LIMIT * 4
    assert 0.0 <= mmlu["groups"]["mmlu"]["acc,none"] <= 1.0
    assert mmlu["versions"]["mmlu_abstract_algebra"] == 1.0
    gsm = json.loads((run / "eval" / "gsm8k.json").read_text())
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(gsm["results"]["gsm8k"])
    assert gsm["n-shot"]["gsm8k"] == 5
    assert "truthfulqa_mc2" in stderr and "wrote" in stderr  # the terminal table


def test_repeat_is_served_from_the_cache(evaluated, home):
    run, first, _ = evaluated
    proc = run_cli("eval", "--run", str(run), "--suite", SUITES, "--limit", str(LIMIT), "--json",
                   env={"HMST_BENCH_HOME": str(home)})
    again = json.loads(proc.stdout)
    for a, b in zip(first, again):
        assert b["provenance"]["requests"]["from_cache"] == b["provenance"]["requests"]["total"]
        assert b["provenance"]["requests"]["computed"] == 0
        assert a["metrics"] == b["metrics"]


def test_interrupted_evaluation_resumes_from_the_cache(evaluated, home, tmp_path, monkeypatch):
    """A failure half-way through leaves the answers computed so far in the cache; the next
    run computes only the rest and ends with the same numbers as an uninterrupted one."""
    from hmst_bench.eval import runner
    from hmst_bench.plugins import get_registry
    from hmst_bench.train.rundir import load_run

    monkeypatch.setenv("HMST_BENCH_HOME", str(home))
    run = tmp_path / "run"
    shutil.copytree(evaluated[0], run, ignore=shutil.ignore_patterns("eval"))
    suite = get_registry().suites()["truthfulqa_mc2"]
    model = load_run(run).model
    real = model.score
    calls = {"n": 0}

    def failing_after_two_batches(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    from hmst_bench.eval import lm as lm_module

    original_init = lm_module.HmstBenchLM.__init__

    def init_with(self, *a, **kw):
        original_init(self, *a, **kw)
        self.model.score = failing_after_two_batches
        self._score = failing_after_two_batches

    monkeypatch.setattr(lm_module.HmstBenchLM, "__init__", init_with)
    with pytest.raises(KeyboardInterrupt):
        runner.evaluate(run, [suite], limit=LIMIT, batch_size=4, progress=False)
    assert not (run / "eval" / "truthfulqa_mc2.json").exists()
    from sqlitedict import SqliteDict

    db, = (run / "eval" / "cache").glob("*.db")
    with SqliteDict(str(db)) as kept:
        assert len(kept) == 8  # the answers of the two batches that finished
    monkeypatch.setattr(lm_module.HmstBenchLM, "__init__", original_init)
    record, = runner.evaluate(run, [suite], limit=LIMIT, batch_size=4, progress=False)
    req = record["provenance"]["requests"]
    assert req["from_cache"] == 8 and req["computed"] == req["total"] - 8  # two batches of four were kept
    reference = json.loads((evaluated[0] / "eval" / "truthfulqa.json").read_text())
    assert record["results"]["truthfulqa_mc2"]["acc,none"] == pytest.approx(
        reference["results"]["truthfulqa_mc2"]["acc,none"], abs=1e-6)


def test_agrees_with_hflm_on_the_transformers_copy(evaluated, home, monkeypatch):
    """lm-eval's own HFLM on RUN/hf, same tasks and documents: per-sample log-likelihoods
    within 1e-4 and identical accuracies on mmlu, truthfulqa_mc1 and truthfulqa_mc2."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from hmst_bench.eval.runner import task_manager
    from hmst_bench.plugins import get_registry

    monkeypatch.setenv("HMST_BENCH_HOME", str(home))
    run = evaluated[0]
    suites = get_registry().suites()
    hflm = HFLM(pretrained=str(run / "hf"), device="cpu", batch_size=8, max_length=128)
    out = lm_eval.simple_evaluate(model=hflm, tasks=["mmlu", "truthfulqa_mc1", "truthfulqa_mc2"], limit=LIMIT,
                                  task_manager=task_manager([suites["mmlu"], suites["truthfulqa"]]), log_samples=True)
    ours = {}
    for suite in ("mmlu", "truthfulqa"):
        record = json.loads((run / "eval" / f"{suite}.json").read_text())
        ours.update({t: {r["doc_id"]: r for r in rows} for t, rows in record["samples"].items()})
        for name, values in {**record["results"], **record.get("groups", {})}.items():
            assert values["acc,none"] == pytest.approx(
                (out["groups"].get(name) or out["results"][name])["acc,none"], abs=1e-9), name
    compared = 0
    for task, rows in out["samples"].items():
        for row in rows:
            mine = ours[task][row["doc_id"]]
            for (ll_a, greedy_a), (ll_b, greedy_b) in zip((r[0] for r in mine["resps"]), (r[0] for r in row["resps"])):
                assert float(ll_a) == pytest.approx(float(ll_b), abs=1e-4)
                assert bool(greedy_a) == bool(greedy_b)
                compared += 1
    assert compared == 57 * LIMIT * 4 + sum(len(r["resps"]) for t in ("truthfulqa_mc1", "truthfulqa_mc2")
                                              for r in ours[t].values())


def _fails(*args, match: str, env: dict):
    proc = run_cli(*args, env=env, check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert match in lines[0], lines[0]
    return lines[0]


def test_bad_input_is_one_line(evaluated, home, tmp_path):
    run = evaluated[0]
    env = {"HMST_BENCH_HOME": str(home)}
    _fails("eval", "--run", str(run), "--suite", "mmlu,nosuch", match="unknown suite 'nosuch'; known: factqa, gsm8k, humaneval, longctx, mbpp, mmlu", env=env)
    _fails("eval", "--run", str(run), "--suite", "mmlu", "--limit", "0", match="--limit must be at least 1", env=env)
    _fails("eval", "--run", str(tmp_path), "--suite", "mmlu", match="is not a run directory", env=env)
    no_weights = tmp_path / "unfinished"
    no_weights.mkdir()
    shutil.copy(run / "run.json", no_weights / "run.json")
    _fails("eval", "--run", str(no_weights), "--suite", "truthfulqa", match="never reached its first checkpoint", env=env)
    empty = {"HMST_BENCH_HOME": str(tmp_path / "empty-home")}
    _fails("eval", "--run", str(run), "--suite", "gsm8k", match="run `hmst-bench data import gsm8k PATH`", env=empty)


def test_broken_run_directory_is_one_line(evaluated, home, tmp_path):
    """A cut model.safetensors, and a run.json that is not an object or lacks `config`: one line
    naming the file and the fix, never a traceback, and nothing written into the run."""
    run = evaluated[0]
    env = {"HMST_BENCH_HOME": str(home)}
    weights = (run / "model.safetensors").read_bytes()
    cases = {
        "half-weights": ("model.safetensors", weights[: len(weights) // 2], "model.safetensors is truncated or corrupt"),
        "header-only": ("model.safetensors", weights[:100], "model.safetensors is truncated or corrupt"),
        "empty-weights": ("model.safetensors", b"", "model.safetensors is truncated or corrupt"),
        "list-record": ("run.json", b"[]\n", "run.json holds a JSON list, not a run's record"),
    }
    info = json.loads((run / "run.json").read_text())
    cases["no-config"] = ("run.json", json.dumps({k: v for k, v in info.items() if k != "config"}).encode(),
                          "run.json lacks 'config'")
    cases["string-config"] = ("run.json", json.dumps({**info, "config": "tiny"}).encode(),
                              "run.json has a malformed 'config'")
    for name, (file, data, message) in cases.items():
        broken = tmp_path / name
        shutil.copytree(run, broken, ignore=shutil.ignore_patterns("eval"))
        (broken / file).write_bytes(data)
        line = _fails("eval", "--run", str(broken), "--suite", "truthfulqa_mc1", "--limit", "1", match=message, env=env)
        assert str(broken / file) in line and "train the run again" in line, line
        assert not (broken / "eval").exists(), name


def test_short_window_scores_what_fits_and_counts_it(home, tmp_path):
    """A run trained with --seq-len 32 on TruthfulQA, whose answers outgrow the window: evaluated
    (exit 0, no traceback), with the cut requests counted in the provenance and under the table,
    the same when served from the cache."""
    env = {"HMST_BENCH_HOME": str(home)}
    run = tmp_path / "run32"
    run_cli("train", "--arch", "dense-llama", "--size", "micro", "--budget", "2e10", "--seq-len", "32",
            "--corpus", "synthetic-facts", "--out", str(run), env=env)
    counts = []
    for _ in range(2):
        proc = run_cli("eval", "--run", str(run), "--suite", "truthfulqa_mc1", "--limit", "4", "--json", env=env)
        assert "Traceback" not in proc.stderr
        summary, = json.loads(proc.stdout)
        req = summary["provenance"]["requests"]
        record = json.loads((run / "eval" / "truthfulqa_mc1.json").read_text())
        assert record["provenance"]["requests"] == req and record["provenance"]["window"] == 32
        cut = req["truncated"]
        assert cut["continuation"] > 0 and cut["context"] > 0 and cut["prompt"] == 0
        assert cut["continuation"] + cut["context"] <= req["total"]
        assert (f"note: 32-token window: {cut['context']:,} contexts cut on the left; {cut['continuation']:,} "
                "continuations longer than the window, scored on their last 32 tokens") in proc.stderr
        assert all(isinstance(r["value"], float) for r in summary["metrics"])
        counts.append((cut, req["from_cache"]))
    assert counts[0][0] == counts[1][0] and counts[0][1] == 0 and counts[1][1] == req["total"]


def test_read_only_run_is_evaluated_and_nothing_lost(evaluated, home, tmp_path):
    """A run folder that cannot be written (a read-only mount, which binds root too): evaluated
    without the cache, one warning line before any work, results shown and not saved, exit 0;
    with --no-cache the same; --out DIR saves results and cache there; a read-only cache folder
    alone only turns the cache off."""
    env = {"HMST_BENCH_HOME": str(home)}
    run = tmp_path / "shared-run"
    shutil.copytree(evaluated[0], run, ignore=shutil.ignore_patterns("eval"))
    reference = json.loads((evaluated[0] / "eval" / "truthfulqa.json").read_text())["results"]["truthfulqa_mc1"]
    args = ("eval", "--run", str(run), "--suite", "truthfulqa_mc1", "--limit", str(LIMIT), "--json")

    for extra, without in (((), "without the request cache; "), (("--no-cache",), "")):
        proc = run_cli_read_only([run], *args, *extra, env=env)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert lines[0] == (f"warning: {run / 'eval'} is not writable (Read-only file system): evaluating {without}"
                            "the results are shown but not saved; --out DIR saves them elsewhere")
        assert sum("warning" in line for line in lines) == 1 and "; not saved" in proc.stderr
        summary, = json.loads(proc.stdout)
        assert summary["file"] is None and summary["provenance"]["requests"]["computed"] > 0
        acc = next(r["value"] for r in summary["metrics"] if r["metric"] == "acc")
        assert acc == pytest.approx(reference["acc,none"], abs=1e-9)
        assert not (run / "eval").exists()

    out = tmp_path / "results"
    proc = run_cli_read_only([run], *args, "--out", str(out), env=env)
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
    summary, = json.loads(proc.stdout)
    assert summary["file"] == str(out / "truthfulqa_mc1.json") and json.loads((out / "truthfulqa_mc1.json").read_text())
    assert len(list((out / "cache").glob("*.db"))) == 1 and not (run / "eval").exists()

    (run / "eval" / "cache").mkdir(parents=True)  # writable results, a read-only cache
    proc = run_cli_read_only([run / "eval" / "cache"], *args, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith(f"warning: {run / 'eval' / 'cache'} is not writable (Read-only file system): "
                                  "evaluating without the request cache\n"), proc.stderr
    assert (run / "eval" / "truthfulqa_mc1.json").exists() and not any((run / "eval" / "cache").iterdir())


def test_a_result_that_fails_to_write_is_still_reported(evaluated, home, tmp_path, monkeypatch):
    """Writable when checked, not when written (a full disk): every suite still runs and is shown
    (and printed with --json), then one error line names the file; exit status 1."""
    import errno

    from click.testing import CliRunner

    from hmst_bench import cli
    from hmst_bench.eval import runner

    monkeypatch.setenv("HMST_BENCH_HOME", str(home))
    run = tmp_path / "run"
    shutil.copytree(evaluated[0], run, ignore=shutil.ignore_patterns("eval"))

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runner, "atomic_write", full)
    result = CliRunner().invoke(cli.cli, ["eval", "--run", str(run), "--suite", "truthfulqa_mc1,mmlu_anatomy",
                                          "--limit", "2", "--json", "--no-cache"])
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    assert [s["suite"] for s in summary] == ["truthfulqa_mc1", "mmlu_anatomy"] and all(s["file"] is None for s in summary)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: could not write {run / 'eval' / 'truthfulqa_mc1.json'} (No space left on device) "
                           "and 1 more; every suite was evaluated and reported"), last
    assert "Traceback" not in result.stderr


def test_lm_eval_cli_passthrough(evaluated, home):
    run = evaluated[0]
    proc = run_cli("lm-eval", "--model", "hmst-bench", "--model_args", f"run={run}", "--tasks", "truthfulqa_mc1",
                   "--limit", "2", env={"HMST_BENCH_HOME": str(home), "TQDM_DISABLE": "1"})
    assert "truthfulqa_mc1" in proc.stdout and "acc" in proc.stdout
