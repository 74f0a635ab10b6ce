"""Evaluation: suites registered by plugins (`SuiteSpec`), the benchmark store (`store`), the
lm-eval model adapter (`lm`, model name "hmst-bench") and `hmst-bench eval` (`runner`)."""

from hmst_bench.eval.suite import SuiteSpec

__all__ = ["SuiteSpec"]
