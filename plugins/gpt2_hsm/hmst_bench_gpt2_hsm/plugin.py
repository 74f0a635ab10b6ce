"""Entry point of the gpt2-hsm distribution: config, size presets (the dense baselines' shapes,
so gpt2-hsm and dense-gpt2 of one size differ only in the head) and the ArchSpec."""

from __future__ import annotations

from dataclasses import dataclass, field

from hmst_bench import ArchSpec, ConfigError, hookimpl

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
    head_dim: int = field(init=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.vocab_size < 2:
            raise ConfigError("vocab_size must be at least 2 for a hierarchical softmax")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.decode not in DECODE_MODES:
            raise ConfigError(f"decode must be one of {', '.join(DECODE_MODES)}, got {self.decode!r}")
        for name in ("prf_features", "prf_redraw"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        self.head_dim = self.d_model // self.n_heads


SIZES = {
    "micro": dict(vocab_size=2048, max_seq_len=128, d_model=64, n_layers=2, n_heads=4),
    "tiny": dict(vocab_size=8192, max_seq_len=256, d_model=256, n_layers=4, n_heads=4),
    "small": dict(vocab_size=16384, max_seq_len=512, d_model=512, n_layers=8, n_heads=8),
    "base": dict(vocab_size=32768, max_seq_len=1024, d_model=768, n_layers=12, n_heads=12),
}


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
