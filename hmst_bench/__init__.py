"""hmst-bench: train novel LLM architectures and dense baselines to equal measured compute, then
evaluate them on the same benchmarks.

The public API a plugin or a user script needs:

    from hmst_bench import ArchSpec, ConfigError, hookimpl, load_run, LanguageModel

Importing this package is cheap (no torch); `LanguageModel` and `load_run` import torch when
first reached.
"""

from hmst_bench.arch import SIZE_NAMES, ArchSpec, ConfigError
from hmst_bench.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["ArchSpec", "CONTRACT_VERSION", "ConfigError", "LanguageModel", "SIZE_NAMES", "SuiteSpec", "hookimpl", "load_run", "__version__"]


def __getattr__(name):  # lazy, so `import hmst_bench` stays light
    if name == "load_run":
        from hmst_bench.train.rundir import load_run

        return load_run
    if name in ("LanguageModel", "CONTRACT_VERSION"):
        import hmst_bench.model

        return getattr(hmst_bench.model, name)
    if name == "SuiteSpec":
        from hmst_bench.eval.suite import SuiteSpec

        return SuiteSpec
    raise AttributeError(f"module 'hmst_bench' has no attribute {name!r}")
