"""Entry point of the baselines distribution: configs, size presets and the two ArchSpecs.

Imports neither torch nor transformers, so loading it costs nothing at CLI start-up; the build
functions import `models` when a model is actually needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hmst_bench import ArchSpec, ConfigError, hookimpl
from hmst_bench.arch import DENSE_SHAPES, swiglu_width
from hmst_bench.arch import require_positive as _positive


@dataclass
class DenseLlamaConfig:
    """A Llama-style decoder (RMSNorm, RoPE, SwiGLU) as transformers' LlamaForCausalLM builds it."""

    vocab_size: int = 8192
    max_seq_len: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: as many as n_heads (no grouped-query attention)
    ffn_multiple_of: int = 64  # SwiGLU width: 8/3 * d_model rounded up to this multiple
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    # derived, never set by hand
    head_dim: int = field(init=False)
    d_ff: int = field(init=False)
    kv_heads: int = field(init=False)

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "ffn_multiple_of")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        self.kv_heads = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})")
        self.head_dim = self.d_model // self.n_heads
        self.d_ff = swiglu_width(self.d_model, self.ffn_multiple_of)


@dataclass
class DenseGPT2Config:
    """GPT-2 as transformers' GPT2LMHeadModel builds it (learned positions, GELU MLP, tied head)."""

    vocab_size: int = 8192
    max_seq_len: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    head_dim: int = field(init=False)
    d_ff: int = field(init=False)

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        self.head_dim = self.d_model // self.n_heads
        self.d_ff = 4 * self.d_model


# Both baselines use the core table as is, so that, size for size, they are comparable.
SIZES = DENSE_SHAPES


def _build_llama(config, tokenizer):
    from hmst_bench_baselines.models import build_llama

    return build_llama(config, tokenizer)


def _build_gpt2(config, tokenizer):
    from hmst_bench_baselines.models import build_gpt2

    return build_gpt2(config, tokenizer)


DENSE_LLAMA = ArchSpec(
    name="dense-llama",
    description="Dense Llama decoder (transformers LlamaForCausalLM): the reference baseline",
    config_cls=DenseLlamaConfig,
    sizes=SIZES,
    build=_build_llama,
)

DENSE_GPT2 = ArchSpec(
    name="dense-gpt2",
    description="Dense GPT-2 decoder (transformers GPT2LMHeadModel)",
    config_cls=DenseGPT2Config,
    sizes=SIZES,
    build=_build_gpt2,
)


@hookimpl
def register_architectures(register):
    register(DENSE_LLAMA)
    register(DENSE_GPT2)
