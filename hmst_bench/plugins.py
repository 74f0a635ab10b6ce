"""The plugin registry: loads every `hmst_bench` entry point in isolation and collects what they register.

One broken plugin must never break the tool: each entry point is imported, registered and asked
for its architectures/suites inside its own guard, and a failure is recorded (name,
distribution, error) for `hmst-bench plugins` to show. Strict mode (`--strict` or
`HMST_BENCH_STRICT=1`) turns the first failure into an error instead. `HMST_BENCH_PLUGINS=a,b`
restricts loading to the named entry points (or distributions).

The guard (`_Guard`) catches BaseException, not only Exception: a plugin calling `sys.exit` at
import, raising KeyboardInterrupt or GeneratorExit, is a broken plugin like any other. Two
things are told apart from plugin misbehaviour:

- a real Ctrl-C: while plugin code runs, SIGINT goes through a handler that notes its delivery
  before doing what the previous handler did. A KeyboardInterrupt (or anything else) that
  arrives after a delivered SIGINT interrupts the command, as Ctrl-C always does; one that a
  plugin raised by itself, with no SIGINT delivered, is recorded as that plugin's failure. (A
  plugin that sends itself SIGINT is indistinguishable from the user and interrupts.)
- a hang: plugin code runs under a time limit (`HMST_BENCH_PLUGIN_TIMEOUT` seconds, default 30,
  0 for none) enforced by SIGALRM in the main thread. The handler raises inside the plugin's
  own code, so the import is really aborted (Python code, and C calls that retry on EINTR such
  as sleep, waits and reads), not left running in a thread that cannot be killed; the plugin is
  then reported as failed. A C extension that loops without checking for signals cannot be
  interrupted this way. Outside the main thread (no signal handlers there) there is no limit.
  Plugins that finish but take more than `SLOW_SECONDS` are listed with their time so the CLI
  can name them.

The registry itself is loaded lazily: the CLI only asks for it in commands that need plugins
(train, eval, list, plugins, a plugin's own command), so `data ...`, `score-code`, `--help` and
`--version` never import an architecture plugin and cannot be delayed by one.

Tests build their own `Registry()` and `add_plugin()` objects into it, then install it with
`use_registry()`, the way llm's tests register plugins in fixtures.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Optional

import pluggy

from hmst_bench import hookspecs
from hmst_bench.arch import ArchSpec
from hmst_bench.eval.suite import SuiteSpec

ENTRY_POINT_GROUP = "hmst_bench"
DEFAULT_TIMEOUT = 30.0  # seconds a plugin's import (or hook) may take before it is abandoned as failed
SLOW_SECONDS = 5.0  # a plugin slower than this to load is named in a warning by the CLI


class PluginLoadError(RuntimeError):
    """Raised in strict mode for the first plugin that fails."""


class ArchitectureNotFound(LookupError):
    pass


@dataclass
class PluginRecord:
    name: str
    distribution: str
    version: str
    hooks: list[str] = field(default_factory=list)
    architectures: list[str] = field(default_factory=list)
    suites: list[str] = field(default_factory=list)
    seconds: float = 0.0  # import plus registration hooks


@dataclass
class PluginFailure:
    name: str
    distribution: str
    error: str
    seconds: float = 0.0


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def plugin_timeout() -> float:
    """HMST_BENCH_PLUGIN_TIMEOUT in seconds (0: no limit); DEFAULT_TIMEOUT when unset or unreadable."""
    raw = os.environ.get("HMST_BENCH_PLUGIN_TIMEOUT", "").strip()
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        return DEFAULT_TIMEOUT
    return value if value >= 0 else DEFAULT_TIMEOUT


def describe_error(exc: BaseException) -> str:
    """One line for an exception raised by plugin code: its type and first line."""
    if isinstance(exc, _PluginTimeout):
        return str(exc)
    if isinstance(exc, SystemExit):  # str() of sys.exit(3) is just "3"
        return f"SystemExit: the plugin called sys.exit({exc.code!r})"
    if isinstance(exc, KeyboardInterrupt):  # a real Ctrl-C never gets here (see _Guard)
        return "KeyboardInterrupt raised by the plugin itself (no Ctrl-C was pressed)"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _PluginTimeout(BaseException):
    """Raised by SIGALRM inside plugin code that ran past the limit. A BaseException, so that a
    plugin's own `except Exception` cannot swallow it."""


class _Guard:
    """Runs plugin code with a time limit and tells a real Ctrl-C from a plugin's own
    KeyboardInterrupt (see the module docstring). Use: `with guard: ...` then `guard.settle(exc)`.

    Signal handlers can only be installed in the main thread; elsewhere the guard only catches."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.sigint = False  # a SIGINT was delivered while plugin code ran
        self.timed_out = False
        self._ctrl_c_interrupts = False
        self._saved: dict = {}
        self._t0 = 0.0

    @property
    def seconds(self) -> float:
        return time.monotonic() - self._t0

    def __enter__(self) -> "_Guard":
        self.sigint = self.timed_out = False
        self._saved = {}
        self._t0 = time.monotonic()
        if threading.current_thread() is not threading.main_thread():
            return self
        previous = signal.getsignal(signal.SIGINT)
        # a Ctrl-C interrupts only under Python's own handler; a handler of the caller's (the
        # trainer's "finish the step") is called as before and keeps its meaning
        self._ctrl_c_interrupts = previous is signal.default_int_handler
        if callable(previous):  # SIG_IGN / SIG_DFL: no KeyboardInterrupt can come from a real Ctrl-C

            def on_sigint(signum, frame):
                self.sigint = True
                previous(signum, frame)  # Python's default raises KeyboardInterrupt

            self._saved[signal.SIGINT] = signal.signal(signal.SIGINT, on_sigint)
        # the limit needs SIGALRM's timer; leave it alone when someone else's timer is running
        if self.timeout > 0 and signal.getitimer(signal.ITIMER_REAL)[0] == 0:

            def on_alarm(signum, frame):
                self.timed_out = True
                raise _PluginTimeout(self.timeout_message())

            self._saved[signal.SIGALRM] = signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, self.timeout)
        return self

    def __exit__(self, *exc_info) -> bool:
        if signal.SIGALRM in self._saved:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved = {}
        return False

    def timeout_message(self) -> str:
        return f"did not finish within {self.timeout:g} s (HMST_BENCH_PLUGIN_TIMEOUT) and was interrupted"

    def settle(self, exc: Optional[BaseException]) -> Optional[str]:
        """After the guarded block: re-raise a real Ctrl-C (whatever the plugin made of it, even
        if it swallowed it); otherwise the failure text for `exc`, or None if there was none."""
        if self.sigint and (self._ctrl_c_interrupts or isinstance(exc, KeyboardInterrupt)):
            if isinstance(exc, KeyboardInterrupt):
                raise exc
            raise KeyboardInterrupt from exc
        if exc is None:
            return None
        if self.timed_out and not isinstance(exc, _PluginTimeout):  # the plugin turned our alarm into something else
            return self.timeout_message()
        return describe_error(exc)


class Registry:
    """Plugins, architectures and suites known to this process."""

    def __init__(self, strict: Optional[bool] = None, timeout: Optional[float] = None):
        self.strict = env_flag("HMST_BENCH_STRICT") if strict is None else strict
        self.timeout = plugin_timeout() if timeout is None else timeout
        self.pm = pluggy.PluginManager("hmst_bench")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginRecord] = {}
        self.failures: list[PluginFailure] = []
        self._archs: dict[str, ArchSpec] = {}
        self._suites: dict[str, SuiteSpec] = {}
        self._conflicts: dict[tuple[str, str], str] = {}  # (kind, name) -> error message
        self.commands_registered = False

    # ------------------------------------------------------------------ loading

    def load_entry_points(self) -> "Registry":
        only = {s.strip() for s in os.environ.get("HMST_BENCH_PLUGINS", "").split(",") if s.strip()}
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            if only and ep.name not in only and dist not in only:
                continue
            guard, error = _Guard(self.timeout), None
            try:
                with guard:
                    plugin = ep.load()
            except BaseException as exc:  # a broken plugin is reported, never fatal by default
                error = guard.settle(exc)
            else:
                guard.settle(None)
            if error is not None:
                self._fail(ep.name, dist, error, guard.seconds)
                continue
            self.add_plugin(plugin, name=ep.name, distribution=dist, version=version, seconds=guard.seconds)
        self.pm.check_pending()  # every plugin was checked on registration; this must pass
        return self

    def add_plugin(self, plugin: Any, name: str, distribution: str = "", version: str = "", seconds: float = 0.0) -> bool:
        """Register one plugin object/module; returns False (and records why) if it fails.
        `seconds`: time its import took, added to the time its hooks take here."""
        distribution = distribution or name
        if name in self.plugins:
            self._fail(name, distribution, f"a plugin named {name!r} is already loaded from {self.plugins[name].distribution}")
            return False
        guard, error = _Guard(self.timeout), None
        try:
            with guard:  # registering reads the plugin's attributes; collecting runs its hooks
                self.pm.register(plugin, name=name)
                self.pm.check_pending()
                archs = self._collect(plugin, "register_architectures", ArchSpec)
                suites = self._collect(plugin, "register_suites", SuiteSpec)
        except BaseException as exc:
            error = guard.settle(exc)
        else:
            guard.settle(None)
        seconds += guard.seconds
        if error is not None:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            self._fail(name, distribution, error, seconds)
            return False
        record = PluginRecord(name, distribution, version or "", seconds=seconds)
        record.hooks = sorted(
            hook.name for hook in self.pm.get_hookcallers(plugin) or [] if hook.name.startswith("register_")
        )
        self.plugins[name] = record
        for spec in archs:
            self._add_named(self._archs, "architecture", spec, record)
        for spec in suites:
            self._add_named(self._suites, "suite", spec, record)
        return True

    def _collect(self, plugin: Any, hook_name: str, kind: type) -> list:
        items: list = []

        def register(item):
            if not isinstance(item, kind):
                raise TypeError(f"{hook_name} expects {kind.__name__} objects, got {type(item).__name__}")
            items.append(item)

        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            if impl.plugin is plugin:
                impl.function(**{arg: register for arg in impl.argnames})
        return items

    def _add_named(self, table: dict, kind: str, spec, record: PluginRecord) -> None:
        import dataclasses

        spec = dataclasses.replace(spec, distribution=record.distribution)
        key = spec.name
        if (kind, key) in self._conflicts:
            self._conflicts[(kind, key)] += f", {record.distribution}"
            return
        if key in table:
            first = table.pop(key).distribution
            message = (
                f"{kind} {key!r} is registered by both {first} and {record.distribution}; "
                f"uninstall one or choose with HMST_BENCH_PLUGINS"
            )
            self._conflicts[(kind, key)] = message
            self._fail(record.name, record.distribution, message)
            return
        table[key] = spec
        (record.architectures if kind == "architecture" else record.suites).append(key)

    def _fail(self, name: str, distribution: str, error: str, seconds: float = 0.0) -> None:
        self.failures.append(PluginFailure(name, distribution, error, seconds))
        if self.strict:
            raise PluginLoadError(f"plugin {name} ({distribution}) failed: {error}")

    def slow(self) -> list[PluginRecord | PluginFailure]:
        """Plugins (loaded or failed) that took more than SLOW_SECONDS."""
        return [p for p in [*self.plugins.values(), *self.failures] if p.seconds > SLOW_SECONDS]

    # ------------------------------------------------------------------ queries

    def architectures(self) -> dict[str, ArchSpec]:
        return dict(sorted(self._archs.items()))

    def suites(self) -> dict[str, SuiteSpec]:
        return dict(sorted(self._suites.items()))

    def arch(self, name: str) -> ArchSpec:
        if ("architecture", name) in self._conflicts:
            raise ArchitectureNotFound(self._conflicts[("architecture", name)])
        if name not in self._archs:
            known = ", ".join(sorted(self._archs)) or "none (install a plugin, e.g. `pip install -e baselines`)"
            raise ArchitectureNotFound(f"unknown architecture {name!r}; known: {known}")
        return self._archs[name]

    def register_commands(self, cli) -> None:
        """Let each loaded plugin add commands to the click group `cli` (once per registry). A
        plugin that fails, or that would replace a command already there, is recorded as failed
        and its commands are taken back."""
        if self.commands_registered:
            return
        self.commands_registered = True
        for impl in self.pm.hook.register_commands.get_hookimpls():
            before = dict(cli.commands)
            guard, error = _Guard(self.timeout), None
            try:
                with guard:
                    impl.function(**{arg: cli for arg in impl.argnames})
            except BaseException as exc:
                error = guard.settle(exc)
            else:
                guard.settle(None)
            replaced = sorted(n for n, c in before.items() if cli.commands.get(n) is not c)
            if error is None and replaced:
                error = f"command {replaced[0]!r} exists already; a plugin cannot replace it"
            if error is not None:
                cli.commands.clear()
                cli.commands.update(before)
                record = self.plugins.get(impl.plugin_name)
                self._fail(impl.plugin_name, record.distribution if record else "?", error, guard.seconds)


_registry: Optional[Registry] = None


def get_registry() -> Registry:
    """The process-wide registry, loading installed entry points on first use."""
    global _registry
    if _registry is None:
        _registry = Registry().load_entry_points()
    return _registry


def use_registry(registry: Optional[Registry]) -> Optional[Registry]:
    """Install `registry` as the process-wide one (None: reload from entry points next time);
    returns the previous one so tests can restore it."""
    global _registry
    previous, _registry = _registry, registry
    return previous
