"""Entry point of the hmst distribution: the `hmst` architecture's config, size presets and
ArchSpec. So far only stage 1 exists: the MoE base language model (`model.HMSTModel`), trained by
the shared loop. Stage 2 (the episodic SSM and semantic memories) comes with a later issue.

Imports neither torch nor faiss, so loading it costs nothing at CLI start-up."""

from __future__ import annotations

from dataclasses import dataclass, field

from hmst_bench import ArchSpec, ConfigError, hookimpl
from hmst_bench.arch import require_positive


@dataclass
class HMSTConfig:
    """A causal MoE transformer: pre-norm RMSNorm, RoPE, bias-free attention, and a feed-forward
    of n_experts SwiGLU experts (top_k per token) in every moe_every-th layer. Each expert has
    dense-llama's SwiGLU width, so a token's active feed-forward is top_k dense FFNs."""

    vocab_size: int = 8192  # the trainer sets it from the tokenizer
    max_seq_len: int = 256  # the trainer sets it from --seq-len
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_experts: int = 8
    top_k: int = 2
    moe_every: int = 1  # layers i with (i + 1) % moe_every == 0 are MoE, the others dense SwiGLU
    ffn_multiple_of: int = 64  # expert width: 8/3 * d_model rounded up to this multiple
    balance_coef: float = 0.01  # Switch load-balance loss weight
    z_loss_coef: float = 1e-3  # router z-loss weight
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    init_std: float = 0.02
    # derived, never set by hand
    head_dim: int = field(init=False)
    expert_d_ff: int = field(init=False)
    n_moe_layers: int = field(init=False)

    def __post_init__(self) -> None:
        require_positive(self, "vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "n_experts", "top_k",
                         "moe_every", "ffn_multiple_of")
        if self.top_k > self.n_experts:
            raise ConfigError(f"top_k ({self.top_k}) must be at most n_experts ({self.n_experts})")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"d_model / n_heads ({self.d_model // self.n_heads}) must be even for RoPE")
        if self.moe_every > self.n_layers:
            raise ConfigError(f"moe_every ({self.moe_every}) must be at most n_layers ({self.n_layers}), or no layer has experts")
        for name in ("balance_coef", "z_loss_coef"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        for name in ("rope_theta", "rms_norm_eps", "init_std"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a number > 0, got {getattr(self, name)!r}")
        self.head_dim = self.d_model // self.n_heads
        m = self.ffn_multiple_of
        self.expert_d_ff = m * -(-(8 * self.d_model // 3) // m)
        self.n_moe_layers = self.n_layers // self.moe_every


# dense-llama's shapes (baselines SIZES), so hmst and dense-llama of a size share tokenizer and window
SIZES = {
    "micro": dict(vocab_size=2048, max_seq_len=128, d_model=64, n_layers=2, n_heads=4),
    "tiny": dict(vocab_size=8192, max_seq_len=256, d_model=256, n_layers=4, n_heads=4),
    "small": dict(vocab_size=16384, max_seq_len=512, d_model=512, n_layers=8, n_heads=8),
    "base": dict(vocab_size=32768, max_seq_len=1024, d_model=768, n_layers=12, n_heads=12),
}


def build(config: HMSTConfig, tokenizer):
    from hmst_bench_hmst.model import HMSTModel  # torch is imported here, not at start-up

    return HMSTModel(config, tokenizer)


HMST = ArchSpec(
    name="hmst",
    description="HMST base LM: causal MoE transformer (top-k SwiGLU experts); stage 1 only, memory stages to come",
    config_cls=HMSTConfig,
    sizes=SIZES,
    build=build,
    stages=("1",),
)


@hookimpl
def register_architectures(register):
    register(HMST)
