"""Shared fixtures. Every test runs with its own HMST_BENCH_HOME under one session-wide cache
folder, so tokenizers and token arrays are built once per test session, never in ~/.cache."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HMST_BENCH_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def bench_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hmst-bench-home")


@pytest.fixture(autouse=True)
def _isolated_home(bench_home, monkeypatch):
    monkeypatch.setenv("HMST_BENCH_HOME", str(bench_home))
    monkeypatch.delenv("HMST_BENCH_PLUGINS", raising=False)
    monkeypatch.delenv("HMST_BENCH_STRICT", raising=False)


@pytest.fixture
def fresh_registry():
    """Install an empty Registry for the test; restore the previous one afterwards."""
    from hmst_bench.plugins import Registry, use_registry

    registry = Registry(strict=False)
    previous = use_registry(registry)
    yield registry
    use_registry(previous)


def store_home(home: Path, *benchmarks: str) -> Path:
    """`home` as an HMST_BENCH_HOME whose benchmark store holds `benchmarks`, imported from
    ../shared/data through the CLI as a user would; skips the test when that folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("needs ../shared/data (HMST_BENCH_SHARED_DATA)")
    for name in benchmarks:
        run_cli("data", "import", name, str(SHARED_DATA / name), env={"HMST_BENCH_HOME": str(home)})
    return home


def run_cli(*args: str, env: dict | None = None, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `hmst-bench ARGS` in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "hmst_bench.cli", *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"hmst-bench {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The single stderr line of a command that failed as a user-facing error (no traceback)."""
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def run_cli_read_only(folders: list[Path], *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `hmst-bench ARGS` with `folders` read-only even to root: chmod binds no one here (the
    tests run as root), so each folder is bound read-only over itself in a bubblewrap mount
    namespace. Skips where bubblewrap is missing or cannot mount; fails if the folders stay writable."""
    import shutil

    bwrap = shutil.which("bwrap")
    if bwrap is None:
        pytest.skip("needs bubblewrap (apt-get install -y bubblewrap) for a read-only mount that binds root")
    prefix = [bwrap, "--dev-bind", "/", "/"]  # devices too: the code sandbox nests its own bwrap inside
    for folder in folders:
        prefix += ["--ro-bind", str(folder), str(folder)]
    started = subprocess.run([*prefix, "true"], capture_output=True, text=True)
    if started.returncode != 0:
        pytest.skip(f"bubblewrap cannot make a mount namespace here: {started.stderr.strip()}")
    for folder in folders:  # the condition under test must really hold
        probe = subprocess.run([*prefix, sys.executable, "-c", f"open({str(folder / '.write-probe')!r}, 'w')"],
                               capture_output=True, text=True)
        assert probe.returncode != 0 and "Read-only file system" in probe.stderr, probe.stderr
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*prefix, sys.executable, "-m", "hmst_bench.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


@contextlib.contextmanager
def no_deprecations():
    """Fails the block on any Python warning (FutureWarning, DeprecationWarning, ...) and on any
    warning transformers logs (its `warning_once` cache is cleared first, so a message an earlier
    test already logged in this process is still seen)."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    hf_logging.warning_once.cache_clear()
    handler = Collect(level=logging.WARNING)
    root = hf_logging.get_logger("transformers")
    root.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield
    finally:
        root.removeHandler(handler)
    assert [r.getMessage() for r in records] == []


def row_generators(input_ids, seed: int) -> list:
    """One seeded torch.Generator per row of `input_ids`, for `generate(..., generators=...)`."""
    import torch

    return [torch.Generator().manual_seed(seed + i) for i in range(len(input_ids))]
