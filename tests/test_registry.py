"""The plugin registry in-process: registration, isolation of failures (exceptions, sys.exit,
KeyboardInterrupt, hangs; a real Ctrl-C still interrupts), duplicates, strict mode, config
dataclass rules, and that start-up stays free of torch."""

import dataclasses
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest

from hmst_bench import ArchSpec, ConfigError, SuiteSpec, hookimpl
from hmst_bench.arch import config_from_dict, config_hash, config_to_dict, parse_override
from hmst_bench.plugins import ArchitectureNotFound, PluginLoadError, Registry


@dataclass
class ToyConfig:
    vocab_size: int = 100
    max_seq_len: int = 16
    width: int = 8
    heads: int = 2
    head_dim: int = field(init=False)

    def __post_init__(self):
        if self.width % self.heads:
            raise ConfigError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        self.head_dim = self.width // self.heads


def toy_spec(name="toy"):
    return ArchSpec(name=name, description="a toy", config_cls=ToyConfig, sizes={"micro": {"width": 8}}, build=lambda c, t: None)


class GoodPlugin:
    @hookimpl
    def register_architectures(self, register):
        register(toy_spec())

    @hookimpl
    def register_suites(self, register):
        register(SuiteSpec(name="toysuite", description="a toy suite", tasks=("toy_task",)))


class RaisingPlugin:
    @hookimpl
    def register_architectures(self, register):
        register(toy_spec("half-registered"))
        raise RuntimeError("boom while registering")


class TypoPlugin:
    @hookimpl
    def register_architecturez(self, register):  # not a hook: pluggy's check_pending rejects it
        pass


class WrongTypePlugin:
    @hookimpl
    def register_architectures(self, register):
        register("not a spec")


def test_good_plugin_registers_archs_and_suites():
    reg = Registry(strict=False)
    assert reg.add_plugin(GoodPlugin(), name="good", distribution="good-dist", version="1.0")
    assert list(reg.architectures()) == ["toy"]
    assert reg.arch("toy").distribution == "good-dist"
    assert list(reg.suites()) == ["toysuite"]
    rec = reg.plugins["good"]
    assert rec.hooks == ["register_architectures", "register_suites"]
    assert rec.architectures == ["toy"] and rec.suites == ["toysuite"]


@pytest.mark.parametrize(
    "plugin, needle",
    [(RaisingPlugin(), "RuntimeError: boom"), (TypoPlugin(), "register_architecturez"), (WrongTypePlugin(), "ArchSpec")],
)
def test_failing_plugin_is_recorded_and_leaves_nothing_behind(plugin, needle):
    reg = Registry(strict=False)
    reg.add_plugin(GoodPlugin(), name="good")
    assert not reg.add_plugin(plugin, name="bad", distribution="bad-dist")
    assert [f.name for f in reg.failures] == ["bad"]
    assert needle in reg.failures[0].error and reg.failures[0].distribution == "bad-dist"
    assert list(reg.architectures()) == ["toy"]  # nothing half-registered survives
    assert "bad" not in reg.plugins and not reg.pm.has_plugin("bad")


def test_strict_mode_raises_on_first_failure():
    reg = Registry(strict=True)
    with pytest.raises(PluginLoadError, match="bad.*boom"):
        reg.add_plugin(RaisingPlugin(), name="bad")


def test_duplicate_arch_names_both_distributions_and_is_unusable():
    reg = Registry(strict=False)
    reg.add_plugin(GoodPlugin(), name="a", distribution="dist-a")

    class Again:
        @hookimpl
        def register_architectures(self, register):
            register(toy_spec())

    reg.add_plugin(Again(), name="b", distribution="dist-b")
    with pytest.raises(ArchitectureNotFound, match="dist-a and dist-b"):
        reg.arch("toy")
    assert any("dist-a and dist-b" in f.error for f in reg.failures)
    assert "toy" not in reg.architectures()


def test_unknown_arch_lists_known_ones():
    reg = Registry(strict=False)
    reg.add_plugin(GoodPlugin(), name="good")
    with pytest.raises(ArchitectureNotFound, match="unknown architecture 'nope'; known: toy"):
        reg.arch("nope")


def test_installed_baselines_load_through_entry_points():
    reg = Registry(strict=True).load_entry_points()
    assert {"dense-llama", "dense-gpt2"} <= set(reg.architectures())
    assert reg.arch("dense-llama").distribution == "hmst-bench-baselines"


def test_env_selects_plugins(monkeypatch):
    monkeypatch.setenv("HMST_BENCH_PLUGINS", "no-such-plugin")
    reg = Registry().load_entry_points()
    assert reg.architectures() == {}


# ----------------------------------------------------------------------------- the config contract


def test_spec_rejects_config_without_required_fields():
    @dataclass
    class NoWindow:
        vocab_size: int = 10

    with pytest.raises(TypeError, match="max_seq_len"):
        ArchSpec(name="x", description="", config_cls=NoWindow, sizes={"micro": {}}, build=lambda c, t: None)
    with pytest.raises(ValueError, match="unknown size"):
        ArchSpec(name="x", description="", config_cls=ToyConfig, sizes={"huge": {}}, build=lambda c, t: None)


def test_derived_fields_are_recomputed_and_validated():
    spec = toy_spec()
    cfg = spec.make_config("micro", {"width": 12, "heads": 3})
    assert cfg.head_dim == 4
    assert dataclasses.replace(cfg, width=24).head_dim == 8  # replace re-derives
    with pytest.raises(ConfigError, match="divisible"):
        spec.make_config("micro", {"width": 10, "heads": 3})
    with pytest.raises(ConfigError, match="no size 'base'"):
        spec.make_config("base")
    with pytest.raises(ConfigError, match="no field 'depth'"):
        spec.make_config("micro", {"depth": 3})


def test_config_round_trip_and_hash():
    cfg = toy_spec().make_config("micro")
    d = config_to_dict(cfg)
    assert d["head_dim"] == 4  # derived fields are recorded...
    assert config_from_dict(ToyConfig, d) == cfg  # ...and recomputed, not passed, on load
    with pytest.raises(ConfigError, match="derived"):
        config_from_dict(ToyConfig, {**d, "head_dim": 5})
    assert config_hash(cfg) == config_hash(config_from_dict(ToyConfig, d))
    assert config_hash(cfg) != config_hash(dataclasses.replace(cfg, width=16))


def test_parse_override_types():
    assert parse_override("width=16", ToyConfig) == ("width", 16)
    with pytest.raises(ConfigError, match="no field"):
        parse_override("nope=1", ToyConfig)
    with pytest.raises(ConfigError, match="FIELD=VALUE"):
        parse_override("width", ToyConfig)


def test_cli_start_does_not_import_torch():
    code = (
        "import sys; sys.argv=['hmst-bench','--help']\n"
        "from hmst_bench.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "from hmst_bench.plugins import get_registry\n"
        "assert get_registry().architectures(), 'plugins should be loaded'\n"
        "heavy = [m for m in ('torch', 'transformers', 'accelerate', 'lm_eval') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_builtin_suites_are_listed():
    """The core's own `suites` entry point registers mmlu (+ 4 categories + 57 subjects),
    truthfulqa (+ mc1, mc2), gsm8k, humaneval, mbpp, factqa and longctx; the table folds the
    subjects into one row."""
    import json

    from conftest import run_cli

    listed = {r["name"]: r for r in json.loads(run_cli("list", "suites", "--json").stdout)}
    assert len(listed) == 1 + 4 + 57 + 3 + 1 + 3 + 1
    assert listed["longctx"]["tasks"] == ["longctx"]
    assert listed["humaneval"]["tasks"] == ["humaneval"] and listed["factqa"]["tasks"] == ["factqa", "factqa_sc"]
    assert listed["truthfulqa"]["tasks"] == ["truthfulqa_mc1", "truthfulqa_mc2"]
    assert listed["mmlu_virology"]["distribution"] == "hmst-bench"
    table = run_cli("list", "suites", env={"COLUMNS": "200"}).stderr
    assert "mmlu_<subject>" in table and "mmlu_virology" not in table and "gsm8k" in table


# ----------------------------------------------------------------------------- hostile plugin code


def _hook_plugin(body):
    """A plugin whose register_architectures hook runs `body()` and then registers `toy`."""

    class Plugin:
        @hookimpl
        def register_architectures(self, register):
            body()
            register(toy_spec())

    return Plugin()


def _exit():
    sys.exit(3)


def _interrupt():
    raise KeyboardInterrupt


def _generator_exit():
    raise GeneratorExit


@pytest.mark.parametrize(
    "body, needle",
    [(_exit, "SystemExit: the plugin called sys.exit(3)"), (_interrupt, "KeyboardInterrupt raised by the plugin itself"),
     (_generator_exit, "GeneratorExit")],
)
def test_base_exceptions_from_a_hook_are_recorded_not_raised(body, needle):
    reg = Registry(strict=False)
    reg.add_plugin(GoodPlugin(), name="good")
    assert not reg.add_plugin(_hook_plugin(body), name="hostile", distribution="hostile-dist")
    assert [f.name for f in reg.failures] == ["hostile"] and needle in reg.failures[0].error
    assert list(reg.architectures()) == ["toy"] and not reg.pm.has_plugin("hostile")
    with pytest.raises(PluginLoadError, match="hostile.*" + needle.split(":")[0]):
        Registry(strict=True).add_plugin(_hook_plugin(body), name="hostile")


def _real_sigint():
    os.kill(os.getpid(), signal.SIGINT)  # delivered like a Ctrl-C
    time.sleep(5)  # the handler interrupts this


def _sigint_turned_into_import_error():
    try:
        _real_sigint()
    except KeyboardInterrupt:
        raise ImportError("optional dependency missing") from None


def _sigint_swallowed():
    try:
        _real_sigint()
    except KeyboardInterrupt:
        pass


@pytest.mark.parametrize("body", [_real_sigint, _sigint_turned_into_import_error, _sigint_swallowed])
def test_a_real_sigint_while_a_plugin_loads_interrupts(body):
    """A SIGINT delivered while plugin code runs is the user's Ctrl-C, whatever the plugin does
    with it; the handler that was there before is back afterwards."""
    # Python's own handler, as in a terminal (a test started in a script's background inherits
    # SIGINT ignored, and an ignored SIGINT is rightly no Ctrl-C)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        reg = Registry(strict=False)
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            reg.add_plugin(_hook_plugin(body), name="p")
        assert time.monotonic() - t0 < 4
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert not reg.failures
    finally:
        signal.signal(signal.SIGINT, outer)


def _hang():
    time.sleep(60)


def _hang_and_hide_the_alarm():
    try:
        time.sleep(60)
    except BaseException:  # a plugin that turns everything into its own error
        raise ValueError("something else") from None


@pytest.mark.parametrize("body", [_hang, _hang_and_hide_the_alarm])
def test_a_hanging_hook_is_interrupted_at_the_time_limit(body):
    before = signal.getsignal(signal.SIGALRM)
    reg = Registry(strict=False, timeout=0.5)
    reg.add_plugin(GoodPlugin(), name="good")
    t0 = time.monotonic()
    assert not reg.add_plugin(_hook_plugin(body), name="slow", distribution="slow-dist")
    assert time.monotonic() - t0 < 5
    assert "did not finish within 0.5 s (HMST_BENCH_PLUGIN_TIMEOUT)" in reg.failures[0].error
    assert reg.failures[0].seconds >= 0.5
    assert list(reg.architectures()) == ["toy"]
    assert signal.getsignal(signal.SIGALRM) is before and signal.getitimer(signal.ITIMER_REAL)[0] == 0


def test_time_limit_leaves_a_running_timer_alone():
    """Someone else's SIGALRM timer (pytest-timeout, say) is neither replaced nor cancelled."""
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30)
        reg = Registry(strict=False, timeout=0.01)
        assert reg.add_plugin(_hook_plugin(lambda: time.sleep(0.2)), name="p")  # no limit applied
        assert 0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 30 and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_plugin_commands_cannot_replace_existing_ones():
    import click

    @click.group()
    def group():
        pass

    @group.command("plugins")
    def real():
        pass

    class Adds:
        @hookimpl
        def register_commands(self, cli):
            cli.command("extra")(lambda: None)

    class Replaces:
        @hookimpl
        def register_commands(self, cli):
            cli.command("mine")(lambda: None)
            cli.command("plugins")(lambda: None)

    class Exits:
        @hookimpl
        def register_commands(self, cli):
            cli.command("half")(lambda: None)
            sys.exit(2)

    reg = Registry(strict=False)
    for name, plugin in (("adds", Adds()), ("replaces", Replaces()), ("exits", Exits())):
        assert reg.add_plugin(plugin, name=name)
    reg.register_commands(group)
    assert group.commands["plugins"] is real  # taken back, with everything else the failing plugin added
    assert sorted(group.commands) == ["extra", "plugins"]
    assert {f.name: f.error for f in reg.failures} == {
        "replaces": "command 'plugins' exists already; a plugin cannot replace it",
        "exits": "SystemExit: the plugin called sys.exit(2)",
    }


def test_a_callers_own_sigint_handler_keeps_its_meaning():
    """Under a handler that only takes note (the trainer's "finish the step"), a SIGINT while a
    plugin loads neither fails the plugin nor raises."""
    noted = []
    previous = signal.signal(signal.SIGINT, lambda *a: noted.append(1))
    try:
        reg = Registry(strict=False)
        assert reg.add_plugin(_hook_plugin(lambda: os.kill(os.getpid(), signal.SIGINT)), name="p")
        assert noted == [1] and list(reg.architectures()) == ["toy"]
    finally:
        signal.signal(signal.SIGINT, previous)
