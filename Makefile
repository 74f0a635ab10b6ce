# hmst-bench: `make demo` compares every architecture with dense-llama at three small budgets (about
# 2.5 minutes on 2 idle CPU cores, report in results/demo/); `make test` runs the tests.
# Both build .venv first, idempotently: torch (pinned below; pip picks the build for the platform)
# before anything that depends on it, then the core, the baselines and every plugins/* distribution in editable mode.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
PLUGIN_DIRS := $(sort $(dir $(wildcard plugins/*/pyproject.toml)))
STAMP  := $(VENV)/.installed
SHARED_DATA ?= $(abspath ../shared/data)

.PHONY: demo test bench venv clean sandbox-tools

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py baselines/pyproject.toml $(wildcard plugins/*/pyproject.toml) Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]" -e baselines $(addprefix -e ,$(PLUGIN_DIRS))
	touch $@

# the demo's optional suites (MMLU, TruthfulQA) join when their data is in the store: imported here
# from ../shared/data where that folder exists
demo: $(STAMP)
	@for b in mmlu truthfulqa; do test ! -d "$(SHARED_DATA)/$$b" || $(VENV)/bin/hmst-bench data import $$b "$(SHARED_DATA)/$$b" >/dev/null 2>&1 || true; done
	$(VENV)/bin/hmst-bench experiment run experiments/demo.toml --jobs 2

# bubblewrap runs generated code (HumanEval, MBPP); installed from Debian where we may, else the
# sandbox tests skip and `score-code`/`eval --suite humaneval` refuse with a one-line fix.
sandbox-tools:
	@command -v bwrap >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	  command -v apt-get >/dev/null 2>&1 && { $$SUDO apt-get install -y -q bubblewrap >/dev/null 2>&1 || \
	    { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q bubblewrap >/dev/null 2>&1; }; }; \
	  command -v bwrap >/dev/null 2>&1 || echo "note: bubblewrap is not installed (apt-get install -y bubblewrap); sandbox tests will skip"; }

test: $(STAMP) sandbox-tools
	HMST_BENCH_SHARED_DATA="$(SHARED_DATA)" $(PY) -m pytest -q

bench: $(STAMP) sandbox-tools
	$(PY) benchmarks/train_throughput.py
	HMST_BENCH_SHARED_DATA="$(SHARED_DATA)" $(PY) benchmarks/eval_throughput.py
	$(PY) benchmarks/hsm_head.py
	$(PY) benchmarks/hrm.py
	$(PY) benchmarks/hmst.py
	$(PY) benchmarks/early_exit.py
	$(PY) benchmarks/hmst_controller.py
	HMST_BENCH_SHARED_DATA="$(SHARED_DATA)" $(PY) benchmarks/sandbox_throughput.py
	$(PY) benchmarks/experiment_overhead.py

clean:
	rm -rf $(VENV) runs results/demo .pytest_cache
