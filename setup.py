"""The package list, which pyproject.toml cannot express (everything else lives there).

The built-in suites live in `suites/` but install as `hmst_bench_suites`; setuptools'
`packages.find` cannot add that prefix, and a fixed `packages = [...]` list misses every new
folder (setuptools then warns about each suite folder it ships as bare data). Here every
`hmst_bench` subpackage and every suite folder is found when the distribution is built.
"""
from setuptools import find_namespace_packages, setup

_SKIP = ["*__pycache__*", "*.egg-info*"]
core = find_namespace_packages(include=["hmst_bench", "hmst_bench.*"], exclude=_SKIP)
suites = ["hmst_bench_suites"] + [f"hmst_bench_suites.{name}" for name in find_namespace_packages("suites", exclude=_SKIP)]
setup(packages=core + suites)
