"""Evaluation: suites registered by plugins (`SuiteSpec`); the lm-eval adapter lands with the evaluation issue."""

from hmst_bench.eval.suite import SuiteSpec

__all__ = ["SuiteSpec"]
