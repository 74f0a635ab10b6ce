"""Entry point of the hrm-codegen distribution: the config dataclass, size presets (the dense
baselines' shapes with their layers split evenly between H and L, so hrm-codegen and dense-llama
of one size have about the same parameters) and the ArchSpec.

Imports neither torch nor the model, so registering costs nothing at CLI start-up."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hmst_bench import ArchSpec, ConfigError, hookimpl
from hmst_bench.arch import DENSE_SHAPES, require_positive, swiglu_width

LOSSES = ("softmax", "stablemax")


@dataclass
class HRMCodeGenConfig:
    """H and L modules of width d_model (post-norm RMSNorm / RoPE / SwiGLU blocks, causal
    attention). A segment: h_cycles times {l_cycles L steps, then one H step}; only the last L and
    H calls get gradients unless full_bptt. Training (deep supervision): a sequence stays in the
    batch for up to `segments` optimiser steps, its detached state carried from one to the next;
    with `act` a pooled Q-head decides when it halts. Inference runs all `segments` segments."""

    vocab_size: int = 8192
    max_seq_len: int = 256
    d_model: int = 256
    n_heads: int = 4
    h_layers: int = 2
    l_layers: int = 2
    h_cycles: int = 2
    l_cycles: int = 2
    full_bptt: bool = False  # backpropagate through every cycle (comparison; memory grows with cycles)
    segments: int = 2  # deep supervision: most segments per sequence (the reference uses up to 16)
    act: bool = True  # adaptive computation time: a Q-head halts sequences before `segments`
    halt_exploration_prob: float = 0.1  # chance a sequence must run a random 2..segments segments
    q_loss_weight: float = 0.5  # total loss = lm + weight * (q_halt + q_continue)
    tie_embeddings: bool = False  # the reference keeps the LM head apart from the embedding
    loss: str = "softmax"  # or "stablemax" (the reference's s(x) = x+1 / 1/(1-x) normaliser)
    window: Optional[int] = None  # context the model reads (scoring, decoding); None: max_seq_len
    ffn_multiple_of: int = 64  # SwiGLU width: 8/3 * d_model rounded up to this multiple
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    # derived, never set by hand
    head_dim: int = field(init=False)
    d_ff: int = field(init=False)
    context: int = field(init=False)

    def __post_init__(self) -> None:
        require_positive(self, "vocab_size", "max_seq_len", "d_model", "n_heads", "h_layers", "l_layers",
                         "h_cycles", "l_cycles", "ffn_multiple_of")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"d_model / n_heads ({self.d_model // self.n_heads}) must be even for RoPE")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not 0.0 <= self.halt_exploration_prob <= 1.0:
            raise ConfigError(f"halt_exploration_prob must be in [0, 1], got {self.halt_exploration_prob}")
        if not self.q_loss_weight >= 0.0:
            raise ConfigError(f"q_loss_weight must be >= 0, got {self.q_loss_weight}")
        for name in ("full_bptt", "tie_embeddings", "act"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} is a boolean: use {name}=true or {name}=false")
        if self.window is not None:
            require_positive(self, "window")
            if self.window > self.max_seq_len:
                raise ConfigError(f"window ({self.window}) must not exceed max_seq_len ({self.max_seq_len})")
        self.context = self.max_seq_len if self.window is None else self.window
        self.head_dim = self.d_model // self.n_heads
        self.d_ff = swiglu_width(self.d_model, self.ffn_multiple_of)


def _split_layers(shape) -> dict:
    """A dense shape with its n_layers split into equal H and L halves."""
    preset = {k: v for k, v in shape.items() if k != "n_layers"}
    preset["h_layers"] = preset["l_layers"] = shape["n_layers"] // 2
    return preset


SIZES = {size: _split_layers(shape) for size, shape in DENSE_SHAPES.items()}


def _build(config, tokenizer):
    from hmst_bench_hrm_codegen.model import HRMCodeGen

    return HRMCodeGen(config, tokenizer)


def _run_stage(ctx):
    from hmst_bench.train.deep_supervision import run

    run(ctx)


HRM_CODEGEN = ArchSpec(
    name="hrm-codegen",
    description="Causal Hierarchical Reasoning Model (H/L recurrent modules, one-step gradient) for code",
    config_cls=HRMCodeGenConfig,
    sizes=SIZES,
    build=_build,
    stage_runner=_run_stage,
)


@hookimpl
def register_architectures(register):
    register(HRM_CODEGEN)
