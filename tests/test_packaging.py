"""The core distribution's packaging: a wheel built from the checkout holds every `hmst_bench`
subpackage and every file of the built-in suites, and setuptools does not warn while building it
(issue 15 item 7: a fixed package list left new folders out and printed ~340 warning lines)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _expected_files() -> set[str]:
    """Every module of hmst_bench and every file of suites/, as the wheel should name them."""
    want = set()
    for path in (ROOT / "hmst_bench").rglob("*.py"):
        if "__pycache__" not in path.parts:
            want.add(path.relative_to(ROOT).as_posix())
    for path in (ROOT / "suites").rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            want.add("hmst_bench_suites/" + path.relative_to(ROOT / "suites").as_posix())
    return want


def test_wheel_holds_every_subpackage_and_suite_file_without_warnings(tmp_path):
    # --no-build-isolation: the venv's own setuptools (the test extra), no index needed
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = proc.stdout + proc.stderr
    assert "absent from the `packages` configuration" not in log
    assert "Warning" not in log, log
    (wheel,) = tmp_path.glob("hmst_bench-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = _expected_files()
    assert {"hmst_bench/cli.py", "hmst_bench_suites/mmlu/_default_template_yaml",
            "hmst_bench_suites/factqa/factqa.yaml", "hmst_bench_suites/README.md"} <= want
    assert sorted(want - names) == []
    packages = {n.rsplit("/", 1)[0] for n in names if n.endswith("__init__.py")}
    subdirs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "hmst_bench").rglob("*")
               if p.is_dir() and p.name != "__pycache__" and any(p.glob("*.py"))}
    assert subdirs <= packages | {n.rsplit("/", 1)[0] for n in names}
