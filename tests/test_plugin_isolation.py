"""Hostile plugins, installed for real, cannot take a command down (issue 14).

Two throwaway distributions are pip-installed into their own --target folders (as in
test_third_party.py) and put on PYTHONPATH of real `hmst-bench` subprocesses:

- `hmst-bench-hostile`, one entry point per behaviour: `hx_exit` calls sys.exit(3) on import,
  `hx_kbint` raises KeyboardInterrupt on import, `hx_genexit` raises GeneratorExit in its
  register_architectures hook, `hx_badbuild` registers `hx-badbuild` whose build() raises and
  `hx-exitbuild` whose build() calls sys.exit(4),
  `hx_cmd` adds a command `hx-hello`, `hx_clash` tries to replace the built-in `plugins` command;
- `hmst-bench-hanging` (entry point `hx_hang`): its import touches the file named by
  $HX_MARKER, then sleeps $HX_SLEEP seconds (default an hour), like an import stuck on a
  network mount.

Each failure must be reported by `hmst-bench plugins` and be fatal only under --strict; commands
that need no plugin (data, --help, --version) never import one; a hanging import is interrupted
at HMST_BENCH_PLUGIN_TIMEOUT; a real Ctrl-C during plugin loading still stops the command.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli
from test_third_party import LLAMA_BUDGET, QUIET, _assert_budget, _assert_one_line_error, _env, _install, _json, _read_run

HOSTILE_DIST = "hmst-bench-hostile"
HANGING_DIST = "hmst-bench-hanging"


def _pyproject(dist: str, package: str, entry_points: dict[str, str]) -> str:
    eps = "\n".join(f'{name} = "{package}.{module}"' for name, module in entry_points.items())
    return f"""
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.0.1"
requires-python = ">=3.10"

[project.entry-points.hmst_bench]
{eps}

[tool.setuptools]
packages = ["{package}"]
"""


HOSTILE_FILES = {
    "pyproject.toml": _pyproject(HOSTILE_DIST, "hx", {
        "hx_exit": "exits", "hx_kbint": "interrupts", "hx_genexit": "genexit", "hx_badbuild": "badbuild",
        "hx_cmd": "command", "hx_clash": "clash",
    }),
    "hx/__init__.py": "",
    "hx/exits.py": "import sys\n\nsys.exit(3)\n",
    "hx/interrupts.py": "raise KeyboardInterrupt\n",
    "hx/genexit.py": '''
        from hmst_bench import hookimpl


        @hookimpl
        def register_architectures(register):
            raise GeneratorExit
        ''',
    "hx/badbuild.py": '''
        from dataclasses import dataclass

        from hmst_bench import ArchSpec, hookimpl


        @dataclass
        class Config:
            vocab_size: int = 300
            max_seq_len: int = 32


        def _build(config, tokenizer):
            raise RuntimeError("out of frobs\\nsecond line of the message")


        def _build_exits(config, tokenizer):
            raise SystemExit(4)


        @hookimpl
        def register_architectures(register):
            register(ArchSpec(name="hx-badbuild", description="build() raises", config_cls=Config,
                              sizes={"micro": {}}, build=_build))
            register(ArchSpec(name="hx-exitbuild", description="build() calls sys.exit", config_cls=Config,
                              sizes={"micro": {}}, build=_build_exits))
        ''',
    "hx/command.py": '''
        import click

        from hmst_bench import hookimpl


        @hookimpl
        def register_commands(cli):
            @cli.command("hx-hello")
            def hello():
                """Say hello from a plugin."""
                click.echo("hello from a plugin")
        ''',
    "hx/clash.py": '''
        import click

        from hmst_bench import hookimpl


        @hookimpl
        def register_commands(cli):
            @cli.command("plugins")
            def impostor():
                click.echo("not the real plugins command")
        ''',
}

HANGING_FILES = {
    "pyproject.toml": _pyproject(HANGING_DIST, "hx_hanging", {"hx_hang": "plugin"}),
    "hx_hanging/__init__.py": "",
    "hx_hanging/plugin.py": '''
        import os
        import time
        from pathlib import Path

        Path(os.environ["HX_MARKER"]).touch()  # the test sees that the import started
        time.sleep(float(os.environ.get("HX_SLEEP", "3600")))
        ''',
}

HOSTILE_FAILURES = {
    "hx_exit": "SystemExit: the plugin called sys.exit(3)",
    "hx_kbint": "KeyboardInterrupt raised by the plugin itself",
    "hx_genexit": "GeneratorExit",
}


@pytest.fixture(scope="module")
def hostile_site(tmp_path_factory) -> Path:
    return _install(tmp_path_factory, "hostile-dist", HOSTILE_FILES, HOSTILE_DIST)


@pytest.fixture(scope="module")
def hanging_site(tmp_path_factory) -> Path:
    return _install(tmp_path_factory, "hanging-dist", HANGING_FILES, HANGING_DIST)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    """~100 kB of Python source in one text file: tokenizers train in well under a second."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(stdlib.glob("[a-c]*.py"))[:30])
    out = tmp_path_factory.mktemp("corpus") / "code.txt"
    out.write_text(text[:100_000], encoding="utf-8")
    return out


def _hang_env(hanging_site: Path, marker: Path, timeout: str, sleep: str = "3600", *more: Path) -> dict:
    return {**_env(hanging_site, *more), "HX_MARKER": str(marker), "HX_SLEEP": sleep,
            "HMST_BENCH_PLUGIN_TIMEOUT": timeout}


# ----------------------------------------------------------------------------- sys.exit, KeyboardInterrupt, GeneratorExit


def test_hostile_plugins_are_reported_and_commands_still_work(hostile_site, small_corpus, tmp_path):
    env = _env(hostile_site)
    rows = {r["name"]: r for r in _json(run_cli("plugins", "--json", env=env))}
    for name, needle in HOSTILE_FAILURES.items():
        assert rows[name]["status"] == "failed" and rows[name]["distribution"] == HOSTILE_DIST, rows[name]
        assert needle in rows[name]["error"], rows[name]
    assert rows["baselines"]["status"] == "ok" and rows["hx_badbuild"]["status"] == "ok"
    table = run_cli("plugins", env={**env, "COLUMNS": "250"}).stderr
    assert "sys.exit(3)" in table and "KeyboardInterrupt" in table

    archs = {a["name"] for a in _json(run_cli("list", "archs", "--json", env=env))}
    assert {"dense-llama", "hx-badbuild"} <= archs
    assert _json(run_cli("data", "list", "--json", env=env))
    out = tmp_path / "R"
    run_cli("train", "--arch", "dense-llama", "--size", "micro", "--budget", LLAMA_BUDGET, "--corpus", str(small_corpus),
            "--out", str(out), *QUIET, env=env)
    info, _ = _read_run(out)
    _assert_budget(info)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_strict_mode_stops_at_a_hostile_plugin(how, hostile_site, tmp_path):
    args = ("list", "archs")
    if how == "flag":
        proc = run_cli("--strict", *args, env=_env(hostile_site), check=False)
    else:
        proc = run_cli(*args, env=_env(hostile_site, strict="1"), check=False)
    _assert_one_line_error(proc, HOSTILE_DIST, "failed")
    for name, needle in HOSTILE_FAILURES.items():  # each is fatal on its own
        proc = run_cli("--strict", *args, env=_env(hostile_site, plugins=f"baselines,{name}"), check=False)
        _assert_one_line_error(proc, name, HOSTILE_DIST, needle)


# ----------------------------------------------------------------------------- build() raises


@pytest.mark.parametrize("arch, needle, out_exists", [
    ("hx-badbuild", "RuntimeError: out of frobs", False),
    ("hx-badbuild", "RuntimeError: out of frobs", True),
    ("hx-exitbuild", "SystemExit: the plugin called sys.exit(4)", False),
])
def test_a_failing_build_is_one_line_and_leaves_nothing(arch, needle, out_exists, hostile_site, small_corpus, tmp_path):
    """Today's behaviour before the fix: a traceback (RuntimeError) or a silent exit 4 (sys.exit)."""
    out = tmp_path / "R"
    if out_exists:
        out.mkdir()
    proc = run_cli("train", "--arch", arch, "--size", "micro", "--budget", "1e9", "--corpus", str(small_corpus),
                   "--out", str(out), env=_env(hostile_site), check=False)
    assert proc.returncode == 1
    _assert_one_line_error(proc, arch, HOSTILE_DIST, "build() failed", needle)
    assert "second line" not in proc.stderr
    assert (list(out.iterdir()) == []) if out_exists else not out.exists()


# ----------------------------------------------------------------------------- plugin commands


def test_plugin_commands_are_found_and_cannot_replace_built_ins(hostile_site):
    env = _env(hostile_site, plugins="hx_cmd,hx_clash")
    assert run_cli("hx-hello", env=env).stdout.strip() == "hello from a plugin"  # the clash is reported, not fatal
    proc = run_cli("--strict", "hx-hello", env=env, check=False)
    _assert_one_line_error(proc, "hx_clash", HOSTILE_DIST, "'plugins' exists already")
    proc = run_cli("hx-nope", env=env, check=False)  # an unknown name loads the plugins, then says so
    assert proc.returncode == 2 and "No such command 'hx-nope'" in proc.stderr


# ----------------------------------------------------------------------------- a hanging import


@pytest.mark.parametrize("args", [
    ("data", "list", "--json"),
    ("data", "import", "gsm8k", "{gsm}"),
    ("--help",),
    ("--version",),
    ("train", "--help"),
    ("score-code", "--help"),
])
def test_commands_without_plugins_never_import_one(args, hanging_site, tmp_path):
    """With no time limit, a command that loaded plugins would hang until the subprocess timeout."""
    gsm = tmp_path / "gsm"
    gsm.mkdir()
    row = json.dumps({"question": "What is 1+1?", "answer": "1+1=2\n#### 2"}) + "\n"
    for split in ("train", "test"):
        (gsm / f"{split}.jsonl").write_text(row)
    marker = tmp_path / "imported"
    t0 = time.monotonic()
    proc = run_cli(*(a.format(gsm=gsm) for a in args), env=_hang_env(hanging_site, marker, timeout="0"), timeout=60)
    assert time.monotonic() - t0 < 60
    assert proc.returncode == 0 and not marker.exists(), proc.stderr


def test_a_hanging_import_is_interrupted_at_the_time_limit(hanging_site, tmp_path):
    marker = tmp_path / "imported"
    env = _hang_env(hanging_site, marker, timeout="2")
    t0 = time.monotonic()
    rows = {r["name"]: r for r in _json(run_cli("plugins", "--json", env=env, timeout=120))}
    assert time.monotonic() - t0 < 60 and marker.exists()
    assert rows["hx_hang"]["status"] == "failed" and rows["hx_hang"]["distribution"] == HANGING_DIST
    assert "did not finish within 2 s (HMST_BENCH_PLUGIN_TIMEOUT)" in rows["hx_hang"]["error"]
    assert rows["hx_hang"]["seconds"] >= 2 and rows["baselines"]["status"] == "ok"
    assert "dense-llama" in {a["name"] for a in _json(run_cli("list", "archs", "--json", env=env, timeout=120))}
    proc = run_cli("--strict", "list", "archs", env=env, check=False, timeout=120)
    _assert_one_line_error(proc, "hx_hang", "did not finish within 2 s")


def test_a_slow_plugin_is_named_once(hanging_site, tmp_path):
    env = _hang_env(hanging_site, tmp_path / "imported", timeout="60", sleep="5.5")
    proc = run_cli("list", "archs", "--json", env=env, timeout=120)
    rows = {r["name"] for r in _json(proc)}
    assert "dense-llama" in rows
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "hx_hang" in warnings[0] and "took 5." in warnings[0] and "HMST_BENCH_PLUGINS" in warnings[0]


def test_a_real_ctrl_c_while_plugins_load_stops_the_command(hanging_site, tmp_path):
    """No time limit: the import would hang for an hour. SIGINT ends the command at once, as a
    Ctrl-C does, without a traceback and without going on as if the plugin had merely failed."""
    marker = tmp_path / "imported"
    env = {**os.environ, **_hang_env(hanging_site, marker, timeout="0")}
    # a terminal's Ctrl-C: SIGINT at its default, even where the test itself was started in the
    # background of a script (which starts it ignored, and children inherit that)
    proc = subprocess.Popen([sys.executable, "-m", "hmst_bench.cli", "list", "archs", "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the plugin import never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, (proc.returncode, stderr)
    assert "Aborted!" in stderr and "Traceback" not in stderr, stderr
    assert stdout == ""  # no list: the command did not go on without the plugin
