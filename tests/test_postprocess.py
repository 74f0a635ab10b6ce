"""A suite's own post-processing (`SuiteSpec.postprocess`): a third party's suite, registered
through a plugin, names a module of its own (the example in docs/evaluation.md, written to a
folder on sys.path), and `hmst-bench eval` imports it, calls it after the suite and shows its
rows; the built-in suites name theirs; a module that is missing or wrong is one line, early."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from conftest import REPO, run_cli
from hmst_bench import SuiteSpec, hookimpl
from hmst_bench.eval import runner
from hmst_bench.eval.suite import RECORD_KEYS
from hmst_bench.plugins import Registry

MODULE = "tp_margin"  # the third party's module, importable only from the test's folder
TASK = "longctx_kv_1x"  # a multiple-choice task that reads no benchmark data
LIMIT = 2


def doc_example() -> str:
    """The postprocess module docs/evaluation.md shows a plugin author, as a source file."""
    text = (REPO / "docs" / "evaluation.md").read_text()
    start = text.index("  ```python\n  # my_plugin/margin.py")
    block = text[start:text.index("  ```\n", start + 1)]
    return textwrap.dedent(block.split("\n", 1)[1])


class MarginPlugin:
    """A third party's plugin: one suite over a built-in task, with its own post-processing."""

    def __init__(self, postprocess: dict):
        self.postprocess = postprocess

    @hookimpl
    def register_suites(self, register):
        register(SuiteSpec("tp-margin", "longctx key-value recall at 1x, with the choices' margin", tasks=(TASK,),
                           task_dir=str(REPO / "suites" / "longctx"), postprocess=self.postprocess))


def registered(postprocess: dict) -> SuiteSpec:
    registry = Registry(strict=True)
    registry.add_plugin(MarginPlugin(postprocess), name="tp-margin", distribution="tp-margin-dist", version="1.0")
    return registry.suites()["tp-margin"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("postprocess") / "run"
    run_cli("train", "--arch", "dense-llama", "--size", "micro", "--budget", "3e10", "--corpus", "synthetic-facts",
            "--seq-len", "64", "--out", str(out))
    return out


@pytest.fixture
def modules(tmp_path, monkeypatch):
    """A folder on sys.path holding the third party's module, and one without `postprocess`."""
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / f"{MODULE}.py").write_text(doc_example())
    (folder / "tp_empty.py").write_text('"""A module that forgot its postprocess function."""\n')
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    for name in (MODULE, "tp_empty"):
        sys.modules.pop(name, None)


def test_third_party_postprocess_is_called_and_shown(run, modules, tmp_path):
    suite = registered({"margin": MODULE})
    assert suite.distribution == "tp-margin-dist" and suite.postprocess == {"margin": MODULE}
    out = tmp_path / "out"
    record, = runner.evaluate(run, [suite], limit=LIMIT, batch_size=8, progress=False, out_dir=out)
    margin = record["margin"]
    assert list(margin) == [TASK] and margin[TASK] >= 0.0
    assert set(record) == RECORD_KEYS | {"margin"}  # only what the suite asked for: no calibration, no longctx
    assert json.loads((out / "tp-margin.json").read_text())["margin"] == margin
    rows = runner.summary_rows(record, suite)
    assert rows[-1] == {"task": TASK, "metric": "margin", "filter": "none", "n_shot": 0, "value": margin[TASK],
                        "stderr": None, "n": LIMIT}
    assert [r["metric"] for r in rows if r["task"] == TASK][:2] == ["acc", "acc_norm"]  # lm-eval's own first


@pytest.mark.parametrize("module, message", [
    ("tp_missing", "suite 'tp-margin': cannot import its postprocess module 'tp_missing' (ModuleNotFoundError: "
                   "No module named 'tp_missing'); install the package that provides it"),
    ("tp_empty", "suite 'tp-margin': its postprocess module 'tp_empty' has no function "
                 "postprocess(record, lm, out_dir); add one"),
])
def test_a_wrong_module_is_one_line_before_the_model_loads(run, modules, tmp_path, module, message):
    out = tmp_path / "out"
    with pytest.raises(runner.EvalError) as exc:
        runner.evaluate(run, [registered({"margin": module})], limit=LIMIT, progress=False, out_dir=out)
    assert str(exc.value) == message
    assert not out.exists()  # it stopped before the output was planned, which follows loading the run


@pytest.mark.parametrize("postprocess, message", [
    (["hmst_bench.eval.calibration"], "postprocess must map a result key to a module name"),
    ({"samples": "tp_margin"}, "postprocess key 'samples' is written by the runner itself; choose another"),
    ({"two words": "tp_margin"}, "postprocess key 'two words' must be a word"),
    ({"margin": "tp_margin:postprocess"}, "postprocess module 'tp_margin:postprocess' for 'margin' must be a dotted"),
])
def test_spec_refuses_a_bad_postprocess(postprocess, message):
    with pytest.raises(ValueError, match=message):
        SuiteSpec("tp-margin", "a suite", tasks=(TASK,), postprocess=postprocess)


def test_builtin_suites_name_their_postprocess_modules():
    from hmst_bench.plugins import get_registry

    suites = get_registry().suites()
    calibration = {"calibration": "hmst_bench.eval.calibration"}
    for name in ("mmlu", "mmlu_stem", "mmlu_anatomy", "truthfulqa", "truthfulqa_mc1", "truthfulqa_mc2"):
        assert suites[name].postprocess == calibration, name
    assert suites["factqa"].postprocess == {"hallucination": "hmst_bench.eval.hallucination"}
    # calibration first, as before: longctx's postprocess shortens the logged prompts
    assert list(suites["longctx"].postprocess.items()) == [*calibration.items(), ("longctx", "hmst_bench.eval.longctx")]
    for name in ("gsm8k", "humaneval", "mbpp"):
        assert suites[name].postprocess == {}, name
    for suite in suites.values():  # every module named is importable and has postprocess and summary_rows
        for module in runner.postprocessors(suite).values():
            assert callable(module.summary_rows), (suite.name, module.__name__)


def test_suite_specs_stay_hashable():
    suite = SuiteSpec("s", "d", tasks=("t",), postprocess={"margin": MODULE})
    assert hash(suite) == hash(SuiteSpec("s", "d", tasks=("t",))) and suite != SuiteSpec("s", "d", tasks=("t",))
