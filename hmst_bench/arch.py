"""The architecture contract: what a plugin registers (`ArchSpec`) and what its model must offer.

Every architecture, built-in or third-party, is described by one `ArchSpec`: a name, a one-line
description, a config dataclass, named size presets and a `build(config, tokenizer)` function.
The model it builds subclasses `hmst_bench.model.LanguageModel` (contract v2, in a module of its
own because it needs torch); the trainer and evaluator only ever talk to the model through that
class's methods, so an architecture whose internals look nothing like a transformer
(a Huffman-tree head, recurrent cycles, external FAISS memory) still plugs in unchanged.

It also holds what configs share: the dense baselines' size table (`DENSE_SHAPES`), the SwiGLU
width rule (`swiglu_width`) and the validation and (de)serialisation helpers.

This module must stay light: it is imported when plugins register, which happens on every CLI
start-up, so it imports neither torch nor transformers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Sequence

SIZE_NAMES = ("micro", "tiny", "small", "base")

# The dense baselines' shapes, size for size. Every built-in architecture derives its presets
# from this one table, so runs of one size share a tokenizer (vocab_size) and a window
# (max_seq_len). Read-only: four architectures share the same object.
DENSE_SHAPES: Mapping[str, Mapping[str, int]] = MappingProxyType({
    "micro": MappingProxyType(dict(vocab_size=2048, max_seq_len=128, d_model=64, n_layers=2, n_heads=4)),
    "tiny": MappingProxyType(dict(vocab_size=8192, max_seq_len=256, d_model=256, n_layers=4, n_heads=4)),
    "small": MappingProxyType(dict(vocab_size=16384, max_seq_len=512, d_model=512, n_layers=8, n_heads=8)),
    "base": MappingProxyType(dict(vocab_size=32768, max_seq_len=1024, d_model=768, n_layers=12, n_heads=12)),
})

# Every config dataclass must carry these two fields: the trainer sets `vocab_size` from the
# tokenizer and `max_seq_len` from `--seq-len`, always through `dataclasses.replace` so that
# derived fields are recomputed and validation runs again.
REQUIRED_CONFIG_FIELDS = ("vocab_size", "max_seq_len")

IGNORE_INDEX = -100  # a label the loss skips (PAD targets, masked prompts)


class ConfigError(ValueError):
    """A config value is invalid; the message is one line naming the field and the fix."""


@dataclass(frozen=True)
class ArchSpec:
    """One registered architecture.

    name          registry key used by `--arch` (lower-case, dashes)
    description   one line shown by `hmst-bench list archs`
    config_cls    a dataclass with `vocab_size` and `max_seq_len`; derived fields are declared
                  `field(init=False)` and set in `__post_init__`, which also validates
    sizes         {"micro"|"tiny"|"small"|"base": {field: value}} presets of init fields
    build         build(config, tokenizer) -> an instance of a `hmst_bench.LanguageModel` subclass
    stage_runner  optional run(ctx) replacing the shared loop; it receives a
                  `hmst_bench.train.TrainContext` giving the shared budget meter, optimiser,
                  checkpointing, logging and data, and is responsible for calling them
    stages        names of the stages the runner understands (e.g. ("1", "2")); `--stage` picks one
    stage_config  optional stage_config(stage) -> {field: value}: config changes a later stage
                  makes when it starts from the earlier one (HMST's stage 2 turns its memory
                  on); applied before `--set`, so the user's values win
    check_sets    optional check_sets(tokenizer) -> {field: value}: what the default config
                  lacks to build on its own, for `hmst-bench check` and the contract tests
                  (hrm-lora's pretrained base: a tiny random one it saves for that tokenizer)
    base_from_run optional base_from_run(RUN path) -> {field: value}: lets `--init-from RUN` of
                  another architecture's run start this one on RUN as a pretrained base
                  (hrm-lora: base = RUN/hf); RUN's tokenizer, corpus and size carry over, its
                  weights are not loaded into this model
    """

    name: str
    description: str
    config_cls: type
    sizes: Mapping[str, Mapping[str, Any]]
    build: Callable[[Any, Any], Any]
    stage_runner: Optional[Callable[[Any], None]] = None
    stages: Sequence[str] = ()
    stage_config: Optional[Callable[[str], Mapping[str, Any]]] = None
    check_sets: Optional[Callable[[Any], Mapping[str, Any]]] = None
    base_from_run: Optional[Callable[[Any], Mapping[str, Any]]] = None
    distribution: str = field(default="", compare=False)  # filled in by the registry

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.strip() or " " in self.name:
            raise ValueError(f"architecture name {self.name!r} must be a non-empty word")
        if not dataclasses.is_dataclass(self.config_cls):
            raise TypeError(f"{self.name}: config_cls must be a dataclass")
        names = {f.name for f in dataclasses.fields(self.config_cls)}
        missing = [f for f in REQUIRED_CONFIG_FIELDS if f not in names]
        if missing:
            raise TypeError(f"{self.name}: config_cls lacks required field(s) {', '.join(missing)}")
        unknown = [s for s in self.sizes if s not in SIZE_NAMES]
        if unknown:
            raise ValueError(f"{self.name}: unknown size name(s) {unknown}; use {', '.join(SIZE_NAMES)}")
        if not self.sizes:
            raise ValueError(f"{self.name}: at least one size preset is required")

    def make_config(self, size: str, overrides: Optional[Mapping[str, Any]] = None):
        """Config for a named size with field overrides, validated (raises ConfigError)."""
        if size not in self.sizes:
            raise ConfigError(
                f"architecture {self.name!r} has no size {size!r}; choose one of {', '.join(self.sizes)}"
            )
        values = dict(self.sizes[size])
        values.update(overrides or {})
        return config_from_dict(self.config_cls, values)


# ----------------------------------------------------------------------------- config helpers


def require_positive(config: Any, *names: str) -> None:
    """ConfigError unless each named field of `config` is a positive int (for `__post_init__`)."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def swiglu_width(d_model: int, multiple_of: int) -> int:
    """Llama's SwiGLU hidden width: floor(8 * d_model / 3) rounded up to a multiple of `multiple_of`
    (8/3 keeps the three matrices' parameters equal to a 4x GELU MLP's two)."""
    return multiple_of * -(-(8 * d_model // 3) // multiple_of)


def init_fields(config_cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_cls) if f.init}


def config_from_dict(config_cls: type, values: Mapping[str, Any]):
    """Build a config from init fields only; derived (init=False) fields present in `values`
    (as written to run.json) are ignored and recomputed, then checked against the recorded value."""
    fields = init_fields(config_cls)
    derived = {f.name for f in dataclasses.fields(config_cls) if not f.init}
    unknown = [k for k in values if k not in fields and k not in derived]
    if unknown:
        raise ConfigError(
            f"{config_cls.__name__} has no field {unknown[0]!r}; fields are {', '.join(sorted(fields))}"
        )
    try:
        config = config_cls(**{k: v for k, v in values.items() if k in fields})
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{config_cls.__name__}: {exc}") from None
    for name in derived & set(values):
        if getattr(config, name) != values[name]:
            raise ConfigError(
                f"{config_cls.__name__}.{name} is derived ({getattr(config, name)!r}) but was given as {values[name]!r}"
            )
    return config


def config_to_dict(config) -> dict[str, Any]:
    """Every field, derived ones included, as JSON-ready values (what run.json records)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_hash(config) -> str:
    """Stable 12-hex digest of the init fields: two runs with equal hashes built the same model."""
    fields = init_fields(type(config))
    payload = {name: getattr(config, name) for name in sorted(fields)}
    text = json.dumps({"class": type(config).__name__, "fields": payload}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def parse_override(text: str, config_cls: type) -> tuple[str, Any]:
    """Parse one `--set field=value` into a typed (field, value) pair using the field's default."""
    if "=" not in text:
        raise ConfigError(f"--set expects FIELD=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    fields = init_fields(config_cls)
    if key not in fields:
        raise ConfigError(f"{config_cls.__name__} has no field {key!r}; fields are {', '.join(sorted(fields))}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare string such as silu
    default = fields[key].default
    if isinstance(default, bool) and not isinstance(value, bool):
        raise ConfigError(f"{key} is a boolean: use {key}=true or {key}=false")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return key, value
