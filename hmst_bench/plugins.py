"""The plugin registry: loads every `hmst_bench` entry point in isolation and collects what they register.

One broken plugin must never break the tool: each entry point is imported, registered and asked
for its architectures/suites inside its own try block, and a failure is recorded (name,
distribution, error) for `hmst-bench plugins` to show. Strict mode (`--strict` or
`HMST_BENCH_STRICT=1`) turns the first failure into an error instead. `HMST_BENCH_PLUGINS=a,b`
restricts loading to the named entry points (or distributions).

Tests build their own `Registry()` and `add_plugin()` objects into it, then install it with
`use_registry()`, the way llm's tests register plugins in fixtures.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Optional

import pluggy

from hmst_bench import hookspecs
from hmst_bench.arch import ArchSpec
from hmst_bench.eval.suite import SuiteSpec

ENTRY_POINT_GROUP = "hmst_bench"


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


@dataclass
class PluginFailure:
    name: str
    distribution: str
    error: str


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Registry:
    """Plugins, architectures and suites known to this process."""

    def __init__(self, strict: Optional[bool] = None):
        self.strict = _env_flag("HMST_BENCH_STRICT") if strict is None else strict
        self.pm = pluggy.PluginManager("hmst_bench")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginRecord] = {}
        self.failures: list[PluginFailure] = []
        self._archs: dict[str, ArchSpec] = {}
        self._suites: dict[str, SuiteSpec] = {}
        self._conflicts: dict[tuple[str, str], str] = {}  # (kind, name) -> error message

    # ------------------------------------------------------------------ loading

    def load_entry_points(self) -> "Registry":
        only = {s.strip() for s in os.environ.get("HMST_BENCH_PLUGINS", "").split(",") if s.strip()}
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            if only and ep.name not in only and dist not in only:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin is reported, never fatal by default
                self._fail(ep.name, dist, _describe(exc))
                continue
            self.add_plugin(plugin, name=ep.name, distribution=dist, version=version)
        self.pm.check_pending()  # every plugin was checked on registration; this must pass
        return self

    def add_plugin(self, plugin: Any, name: str, distribution: str = "", version: str = "") -> bool:
        """Register one plugin object/module; returns False (and records why) if it fails."""
        distribution = distribution or name
        if name in self.plugins:
            self._fail(name, distribution, f"a plugin named {name!r} is already loaded from {self.plugins[name].distribution}")
            return False
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except Exception as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            self._fail(name, distribution, _describe(exc))
            return False
        record = PluginRecord(name, distribution, version or "")
        record.hooks = sorted(
            hook.name for hook in self.pm.get_hookcallers(plugin) or [] if hook.name.startswith("register_")
        )
        try:
            archs = self._collect(plugin, "register_architectures", ArchSpec)
            suites = self._collect(plugin, "register_suites", SuiteSpec)
        except Exception as exc:
            self.pm.unregister(plugin)
            self._fail(name, distribution, _describe(exc))
            return False
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

    def _fail(self, name: str, distribution: str, error: str) -> None:
        self.failures.append(PluginFailure(name, distribution, error))
        if self.strict:
            raise PluginLoadError(f"plugin {name} ({distribution}) failed: {error}")

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
        for impl in self.pm.hook.register_commands.get_hookimpls():
            try:
                impl.function(**{arg: cli for arg in impl.argnames})
            except Exception as exc:
                record = self.plugins.get(impl.plugin_name)
                self._fail(impl.plugin_name, record.distribution if record else "?", _describe(exc))


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
