"""Entry point of the gpt2-hsm distribution: config, size presets (the dense baselines' shapes,
so gpt2-hsm and dense-gpt2 of one size differ only in the head) and the ArchSpec."""

from __future__ import annotations

from dataclasses import dataclass

from hmst_bench import ArchSpec, ConfigError, hookimpl
from hmst_bench.arch import DENSE_SHAPES, require_positive
from hmst_bench_baselines.plugin import DenseGPT2Config

DECODE_MODES = ("exact", "descent")


@dataclass
class GPT2HSMConfig(DenseGPT2Config):
    """dense-gpt2's config (same backbone fields and validation) plus the head's options."""

    decode: str = "exact"  # "descent": approximate greedy tree descent when generating
    use_prf: bool = False  # ablation: FAVOR+ estimate of the node sigmoids while training
    prf_features: int = 64  # random features per estimate
    prf_redraw: int = 100  # draw new features every this many training forward passes
    prf_seed: int = 0
    prf_eval: bool = False  # evaluate with the FAVOR+ estimate too (default: evaluation is exact)

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(self, "prf_features", "prf_redraw")
        if self.vocab_size < 2:
            raise ConfigError("vocab_size must be at least 2 for a hierarchical softmax")
        if self.decode not in DECODE_MODES:
            raise ConfigError(f"decode must be one of {', '.join(DECODE_MODES)}, got {self.decode!r}")


def _build(config, tokenizer):
    from hmst_bench_gpt2_hsm.model import GPT2HSM

    return GPT2HSM(config, tokenizer)


GPT2_HSM = ArchSpec(
    name="gpt2-hsm",
    description="GPT-2 with an exact Huffman hierarchical-softmax head (O(d log V) per training token)",
    config_cls=GPT2HSMConfig,
    sizes=DENSE_SHAPES,  # the dense baselines' shapes, size for size
    build=_build,
)


@hookimpl
def register_architectures(register):
    register(GPT2_HSM)
