"""The architecture contract: what a plugin registers (`ArchSpec`) and what its model must offer.

Every architecture, built-in or third-party, is described by one `ArchSpec`: a name, a one-line
description, a config dataclass, named size presets and a `build(config, tokenizer)` function.
The trainer and evaluator only ever talk to the model through the methods listed in
`LanguageModel` below, so an architecture whose internals look nothing like a transformer
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
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

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


@runtime_checkable
class LanguageModel(Protocol):
    """What every model built by an `ArchSpec` offers (it is also a `torch.nn.Module`).

    Conventions shared by all methods: `input_ids` is a LongTensor [B, T] of real tokens (no
    padding before or between them; only `token_logprobs`/`score` may see rows right-padded); position t of `labels`/`targets` is the token that follows
    `input_ids[:, t]`, i.e. they are already shifted, and -100 marks a position to ignore.

    Optional methods the framework uses when present:
    - `num_active_params() -> int`: parameters touched per token (MoE); default all parameters.
    - `extra_flops(batch) -> float`: forward+backward FLOPs of ops FlopCounterMode cannot see
      (e.g. a hand-written selective scan), added to every measurement.
    - `extra_flops_covers: tuple[str, ...]`: the executed ops without a FLOP formula whose cost
      `extra_flops` accounts for, as names or glob patterns ("aten.mkldnn_rnn_layer*",
      "mylib.scan"). The meter lists such ops that carry arithmetic (`budget.uncounted_work`);
      `train` warns about (and under --strict refuses) any not covered here.
    - `save_artifacts(dir)` / `load_artifacts(dir)`: model state that is not in the weights (a
      FAISS store, a Huffman tree); saved inside every checkpoint (atomically, with the weights
      of the same step) and at the top of the run directory for `load_run`.
    - `export(run_dir)`: extra copies in other formats for other tools (the dense baselines
      write RUN/hf/ with `save_pretrained`); never read back by hmst-bench.
    - `score(input_ids, targets) -> (logprobs, is_argmax)`: `token_logprobs` plus, per position,
      whether the target is the most likely token (lm-eval's `is_greedy`) from the same forward
      pass; without it the evaluator asks `next_token_logprobs` once per continuation token.
    - `flop_shares(batch) -> {part: fraction}`: how a training step's FLOPs split between the
      model's parts (e.g. {"backbone": 0.8, "head": 0.2}), measured by the model on one batch;
      recorded in run.json as "flop_shares".
    - `prepare(train_tokens)`: called once before a fresh run trains, with the packed training
      split (a 1-D int array), for state derived from the data (a Huffman tree from token
      counts); that state must then be saved and restored through the artifacts methods.
    - `hallucination_scores(prompts, answers) -> list[float]`: the model's own detector of wrong
      answers (HMST's critic): one finite score per (prompt, answer) pair, higher = more likely
      wrong. `hmst-bench eval --suite factqa` calls it once, without gradients, with every greedy
      answer that does not abstain and the full prompt it answered, and reports its AUROC for
      predicting a wrong answer beside the self-consistency one (docs/metrics.md).
    """

    max_seq_len: int

    def loss(self, batch: Mapping[str, "torch.Tensor"]) -> tuple["torch.Tensor", dict]:
        """Training objective for `{"input_ids", "labels"}`; aux losses reported apart in the dict."""

    def token_logprobs(self, input_ids: "torch.Tensor", targets: "torch.Tensor") -> "torch.Tensor":
        """[B, T] exact log p(targets[:, t] | input_ids[:, :t+1]); 0 where the target is -100.
        The evaluator right-pads rows to a common length with -100 targets at the padding, so a
        position's log-prob must not depend on later tokens (any causal model satisfies this)."""

    def next_token_logprobs(self, input_ids: "torch.Tensor") -> "torch.Tensor":
        """[B, V] log-distribution of the token after the last position (cropped to the window).
        A model may also accept `lengths` ([B] ints): rows right-padded, the distribution after
        row b's first lengths[b] tokens; the evaluator then batches contexts of any length."""

    def generate(
        self,
        input_ids: "torch.Tensor",
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Optional[Iterable] = None,
        *,
        top_k: int = 0,
    ) -> list[list[int]]:
        """New tokens per row; generation stops after a stop sequence. temperature <= 0 is
        greedy; otherwise tokens are sampled from softmax(logprobs / temperature) restricted to
        the top_k most likely (0: no limit), then, renormalised, to the top_p nucleus, always
        from the model's exact full distribution (`hmst_bench.modeling.decode_loop` does this).
        Callers pass top_k by keyword and only when it is non-zero, so a `generate` written
        before top_k existed still works for greedy and top-p decoding."""


@dataclass(frozen=True)
class ArchSpec:
    """One registered architecture.

    name          registry key used by `--arch` (lower-case, dashes)
    description   one line shown by `hmst-bench list archs`
    config_cls    a dataclass with `vocab_size` and `max_seq_len`; derived fields are declared
                  `field(init=False)` and set in `__post_init__`, which also validates
    sizes         {"micro"|"tiny"|"small"|"base": {field: value}} presets of init fields
    build         build(config, tokenizer) -> model implementing `LanguageModel`
    stage_runner  optional run(ctx) replacing the shared loop; it receives a
                  `hmst_bench.train.TrainContext` giving the shared budget meter, optimiser,
                  checkpointing, logging and data, and is responsible for calling them
    stages        names of the stages the runner understands (e.g. ("1", "2")); `--stage` picks one
    stage_config  optional stage_config(stage) -> {field: value}: config changes a later stage
                  makes when it starts from the earlier one (HMST's stage 2 turns its memory
                  on); applied before `--set`, so the user's values win
    """

    name: str
    description: str
    config_cls: type
    sizes: Mapping[str, Mapping[str, Any]]
    build: Callable[[Any, Any], Any]
    stage_runner: Optional[Callable[[Any], None]] = None
    stages: Sequence[str] = ()
    stage_config: Optional[Callable[[str], Mapping[str, Any]]] = None
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
