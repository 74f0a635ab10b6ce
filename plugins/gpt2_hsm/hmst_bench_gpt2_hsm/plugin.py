"""Entry point of the gpt2-hsm distribution: config, size presets (the dense baselines' shapes,
so gpt2-hsm and dense-gpt2 of one size differ only in the head) and the ArchSpec."""

from __future__ import annotations

from dataclasses import dataclass, field

from hmst_bench import ArchSpec, ConfigError, hookimpl
from hmst_bench.arch import require_positive
from hmst_bench_baselines.plugin import SIZES  # the dense baselines' shapes, size for size

DECODE_MODES = ("exact", "descent")


@dataclass
class GPT2HSMConfig:
    """GPT-2 backbone (learned positions, GELU MLP) with an exact Huffman hierarchical softmax."""

    vocab_size: int = 8192
    max_seq_len: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    decode: str = "exact"  # "descent": approximate greedy tree descent when generating
    use_prf: bool = False  # ablation: FAVOR+ estimate of the node sigmoids while training
    prf_features: int = 64  # random features per estimate
    prf_redraw: int = 100  # draw new features every this many training forward passes
    prf_seed: int = 0
    prf_eval: bool = False  # evaluate with the FAVOR+ estimate too (default: evaluation is exact)
    head_dim: int = field(init=False)

    def __post_init__(self) -> None:
        require_positive(self, "vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "prf_features", "prf_redraw")
        if self.vocab_size < 2:
            raise ConfigError("vocab_size must be at least 2 for a hierarchical softmax")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.decode not in DECODE_MODES:
            raise ConfigError(f"decode must be one of {', '.join(DECODE_MODES)}, got {self.decode!r}")
        self.head_dim = self.d_model // self.n_heads


def _build(config, tokenizer):
    from hmst_bench_gpt2_hsm.model import GPT2HSM

    return GPT2HSM(config, tokenizer)


GPT2_HSM = ArchSpec(
    name="gpt2-hsm",
    description="GPT-2 with an exact Huffman hierarchical-softmax head (O(d log V) per training token)",
    config_cls=GPT2HSMConfig,
    sizes=SIZES,
    build=_build,
)


@hookimpl
def register_architectures(register):
    register(GPT2_HSM)
