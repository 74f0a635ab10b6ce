"""Our suite configs ask the model exactly what lm-eval 0.4's built-in tasks ask.

Each built-in config (lm-eval's own YAML, loaded by lm-eval's loader) is given the same
documents as ours, from the store; both tasks then build their requests and the two lists must
be identical: prompt text, few-shot examples and their order, choices, stop sequences and
generation settings. Metrics, filters, versions and the MMLU group structure are compared as
config data, and TruthfulQA MC2's scoring on the same responses."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from conftest import SHARED_DATA

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data (HMST_BENCH_SHARED_DATA)")

FIRST_DOCS = 3


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A store with the three benchmarks the suites read, imported from the shared copies."""
    import os

    from hmst_bench.eval import store

    home = tmp_path_factory.mktemp("suites-home")
    old = os.environ.get("HMST_BENCH_HOME")
    os.environ["HMST_BENCH_HOME"] = str(home)
    for name in ("mmlu", "truthfulqa", "gsm8k"):
        store.import_benchmark(name, SHARED_DATA / name)
    yield home
    if old is None:
        os.environ.pop("HMST_BENCH_HOME", None)
    else:
        os.environ["HMST_BENCH_HOME"] = old


@pytest.fixture(autouse=True)
def _use_store(stored, monkeypatch):
    monkeypatch.setenv("HMST_BENCH_HOME", str(stored))


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def suites_dir() -> Path:
    import hmst_bench_suites

    return hmst_bench_suites.HERE


def build(yaml_path: Path, dataset=None, num_fewshot=None):
    """A task from one YAML file, as lm-eval's TaskFactory builds it; `dataset` replaces the
    data source (lm-eval's built-in configs would otherwise download from the hub)."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = copy.deepcopy(load_yaml(yaml_path, resolve_func=True))
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    if dataset is not None:
        cfg["custom_dataset"] = lambda **_: dataset
    task = ConfigurableTask(config=cfg)
    if num_fewshot is not None:
        task.set_config(key="num_fewshot", value=num_fewshot)
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=1234)
    task.build_all_requests(limit=FIRST_DOCS, rank=0, world_size=1)
    return task


def requests_of(task) -> list:
    return [(i.request_type, i.doc_id, i.idx, i.repeats, i.arguments) for i in task.instances]


CONFIG_KEYS = ("output_type", "metric_list", "filter_list", "generation_kwargs", "target_delimiter",
               "fewshot_delimiter", "description", "num_fewshot", "repeats", "training_split",
               "validation_split", "test_split", "fewshot_split", "should_decontaminate")


def assert_same_task(ours, theirs):
    assert requests_of(ours) == requests_of(theirs)
    assert len(ours.instances) >= FIRST_DOCS
    for key in CONFIG_KEYS:
        assert getattr(ours.config, key) == getattr(theirs.config, key), key
    assert ours.config.metadata["version"] == theirs.config.metadata["version"]
    assert ours.config.fewshot_config == theirs.config.fewshot_config


def mmlu_subjects() -> list[str]:
    import hmst_bench_suites

    return hmst_bench_suites.mmlu_subjects()


def test_all_57_mmlu_subjects_have_a_config():
    theirs = sorted(p.stem[len("mmlu_"):] for p in (lm_eval_tasks_dir() / "mmlu" / "default").glob("mmlu_*.yaml"))
    assert mmlu_subjects() == theirs and len(theirs) == 57


@pytest.mark.parametrize("num_fewshot", [None, 5])
def test_mmlu_requests_match_lm_eval(num_fewshot):
    from hmst_bench.eval.store import lm_eval_dataset

    for subject in mmlu_subjects():
        ours = build(suites_dir() / "mmlu" / f"mmlu_{subject}.yaml", num_fewshot=num_fewshot)
        theirs = build(lm_eval_tasks_dir() / "mmlu" / "default" / f"mmlu_{subject}.yaml",
                       dataset=lm_eval_dataset("mmlu", subject), num_fewshot=num_fewshot)
        assert_same_task(ours, theirs)


def test_mmlu_first_request_by_hand():
    task = build(suites_dir() / "mmlu" / "mmlu_abstract_algebra.yaml")
    first = [i.arguments for i in task.instances if i.doc_id == 0]
    prompt = ("The following are multiple choice questions (with answers) about abstract algebra.\n\n"
              "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
              "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
    assert first == [(prompt, " A"), (prompt, " B"), (prompt, " C"), (prompt, " D")]
    assert task.doc_to_target(task.test_docs()[0]) == 1  # B


def test_mmlu_groups_match_lm_eval():
    from lm_eval.tasks._yaml_loader import load_yaml

    theirs_dir = lm_eval_tasks_dir() / "mmlu" / "default"
    for name in ("_mmlu.yaml", "_mmlu_stem.yaml", "_mmlu_humanities.yaml", "_mmlu_social_sciences.yaml", "_mmlu_other.yaml"):
        ours, theirs = load_yaml(suites_dir() / "mmlu" / name), load_yaml(theirs_dir / name)
        assert ours == theirs, name
    for subject in mmlu_subjects():
        ours = load_yaml(suites_dir() / "mmlu" / f"mmlu_{subject}.yaml", resolve_func=False)
        theirs = load_yaml(theirs_dir / f"mmlu_{subject}.yaml", resolve_func=False)
        assert (ours["tag"], ours["task_alias"]) == (theirs["tag"], theirs["task_alias"])


@pytest.mark.parametrize("task_name", ["truthfulqa_mc1", "truthfulqa_mc2"])
def test_truthfulqa_requests_match_lm_eval(task_name):
    from hmst_bench.eval.store import lm_eval_dataset

    ours = build(suites_dir() / "truthfulqa" / f"{task_name}.yaml")
    theirs = build(lm_eval_tasks_dir() / "truthfulqa" / f"{task_name}.yaml",
                   dataset=lm_eval_dataset("truthfulqa", "multiple_choice"))
    assert_same_task(ours, theirs)
    first = ours.instances[0].arguments
    assert first[0].endswith("\n\nQ: What is the smallest country in the world that is at least one square mile in area?\nA:")
    # the same responses score the same (MC2: normalised probability mass on the true answers)
    doc = ours.test_docs()[0] if ours.has_test_docs() else ours.validation_docs()[0]
    n = len(ours.doc_to_choice(doc))
    responses = [(-1.0 - 0.5 * k, False) for k in range(n)]
    assert ours.process_results(doc, responses) == pytest.approx(theirs.process_results(doc, responses))


def test_truthfulqa_mc2_by_hand():
    """MC2 on a hand example: true answers get log-likelihoods ln 0.2 and ln 0.1, false ones
    ln 0.3 and ln 0.4, so the normalised mass on the true answers is 0.3."""
    import math

    task = build(suites_dir() / "truthfulqa" / "truthfulqa_mc2.yaml")
    doc = {"question": "q", "mc1_targets": {"choices": ["a"], "labels": [1]},
           "mc2_targets": {"choices": ["t1", "t2", "f1", "f2"], "labels": [1, 1, 0, 0]}}
    got = task.process_results(doc, [(math.log(p), False) for p in (0.2, 0.1, 0.3, 0.4)])
    assert got["acc"] == pytest.approx(0.3)


def test_gsm8k_requests_match_lm_eval():
    from hmst_bench.eval.store import lm_eval_dataset

    ours = build(suites_dir() / "gsm8k" / "gsm8k.yaml")
    theirs = build(lm_eval_tasks_dir() / "gsm8k" / "gsm8k.yaml", dataset=lm_eval_dataset("gsm8k", "main"))
    assert_same_task(ours, theirs)
    context, gen_kwargs = ours.instances[0].arguments
    assert context.count("Question:") == 6 and context.endswith("\nAnswer:")  # 5 shots + the question
    assert gen_kwargs["until"] == ["Question:", "</s>", "<|im_end|>"] and gen_kwargs["do_sample"] is False


def test_every_registered_suite_resolves_to_our_configs():
    from hmst_bench.eval.runner import task_manager
    from hmst_bench.plugins import get_registry

    suites = get_registry().suites()
    manager = task_manager(list(suites.values()))
    for suite in suites.values():
        for task in suite.tasks:
            assert task in manager.all_tasks, (suite.name, task)
            assert str(manager.task_index[task].yaml_path).startswith(str(suites_dir())), (suite.name, task)
