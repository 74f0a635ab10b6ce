"""Entry point of the hrm-lora distribution: two architectures on a frozen pretrained causal LM.

- `hrm-lora`: HRM recurrence through the base's blocks with two PEFT LoRA adapters (`low` on the
  lower blocks' attention, `high` on the upper blocks' feed-forward), one-step gradient, and with
  `segments` > 1 deep supervision and ACT (the runner hrm-codegen uses);
- `lora`: the same adapters on the same modules, one pass (plain LoRA fine-tuning): the baseline
  hrm-lora is compared with at equal compute.

The base is a dense run (`--init-from RUN`: RUN/hf is the base, RUN's tokenizer, corpus and size
carry over) or any transformers model folder (`--set base=PATH --tokenizer PATH`, the folder
holding its tokenizer.json). Nothing is downloaded. Every hyper-parameter has a
default; the size presets change nothing (the base decides the shapes) and exist because the
trainer names a size.

Imports neither torch nor peft, so registering costs nothing at CLI start-up."""

from __future__ import annotations

from dataclasses import dataclass

from hmst_bench import ArchSpec, ConfigError, hookimpl
from hmst_bench.arch import require_positive


@dataclass
class LoRAConfig:
    """Plain LoRA on a frozen base: rank `low_rank` on the lower blocks' attention, `high_rank` on
    the upper blocks' feed-forward (blocks split at `split`, 0: half)."""

    vocab_size: int = 8192  # the trainer sets it from the tokenizer
    max_seq_len: int = 256  # the trainer sets it from --seq-len
    base: str = ""  # a transformers model folder (save_pretrained); required
    split: int = 0  # first block of the upper span (0: n_blocks // 2)
    low_rank: int = 32
    high_rank: int = 64
    alpha_ratio: float = 2.0  # lora_alpha = rank * alpha_ratio
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        require_positive(self, "vocab_size", "max_seq_len", "low_rank", "high_rank")
        if not isinstance(self.base, str):
            raise ConfigError(f"base must be a path, got {self.base!r}")
        if isinstance(self.split, bool) or not isinstance(self.split, int) or self.split < 0:
            raise ConfigError(f"split must be an integer >= 0 (0: half the blocks), got {self.split!r}")
        for name, lo, hi in (("alpha_ratio", 0, None), ("lora_dropout", 0, 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < lo or (hi is not None and value >= hi) \
                    or (name == "alpha_ratio" and value == 0):
                raise ConfigError(f"{name} must be a number {'> 0' if hi is None else 'in [0, 1)'}, got {value!r}")


@dataclass
class HRMLoRAConfig(LoRAConfig):
    """LoRAConfig plus the recurrence: h_cycles x (l_cycles low calls, one high call)."""

    h_cycles: int = 2
    l_cycles: int = 2
    full_bptt: bool = False  # backpropagate through every call (memory grows with the cycles)
    # deep supervision (hmst_bench.train.deep_supervision, as hrm-codegen): segments > 1 trains one
    # segment per optimiser step with the state carried, and inference runs all of them
    segments: int = 1
    act: bool = True  # with segments > 1: a Q-head halts sequences early (adaptive computation time)
    halt_exploration_prob: float = 0.1  # chance a sequence must run a random 2..segments segments
    q_loss_weight: float = 0.5  # total loss = lm + weight * (q_halt + q_continue)

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(self, "h_cycles", "l_cycles", "segments")
        for name in ("full_bptt", "act"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not 0.0 <= self.halt_exploration_prob <= 1.0:
            raise ConfigError(f"halt_exploration_prob must be in [0, 1], got {self.halt_exploration_prob}")
        if self.q_loss_weight < 0:
            raise ConfigError(f"q_loss_weight must be >= 0, got {self.q_loss_weight}")


SIZES = {"micro": {}, "tiny": {}, "small": {}, "base": {}}  # the base model decides the shapes


def build(config, tokenizer):
    from hmst_bench.arch import ConfigError as Refusal
    from hmst_bench_hrm_lora.families import FamilyError
    from hmst_bench_hrm_lora.model import BaseError, HRMLoRA

    try:
        return HRMLoRA(config, tokenizer)
    except (BaseError, FamilyError) as exc:
        raise Refusal(str(exc)) from None


def run_stage(ctx) -> None:
    """Deep supervision when the run asks for segments > 1, else the shared loop (plain LoRA and
    one-segment hrm-lora train exactly as any architecture)."""
    from hmst_bench.train.deep_supervision import run
    from hmst_bench.train.loop import shared_loop

    (run if getattr(ctx.config, "segments", 1) > 1 else shared_loop)(ctx)


def check_sets(tokenizer) -> dict:
    """`hmst-bench check`'s base: a tiny random Llama for this tokenizer, saved once under
    HMST_BENCH_HOME (a real transformers model folder; nothing is downloaded)."""
    import hashlib

    from hmst_bench.util import atomic_dir, home

    key = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:12]
    folder = home() / "cache" / "hrm-lora-check" / key
    if not (folder / "config.json").exists():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
        folder.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp)
    return {"base": str(folder), "low_rank": 4, "high_rank": 4}


def base_from_run(run) -> dict:
    """`--init-from RUN` of a dense run: its transformers copy RUN/hf is the base."""
    from hmst_bench import ConfigError as Refusal

    folder = run / "hf"
    if not (folder / "config.json").exists():
        raise Refusal(f"--init-from {run}: no transformers copy in {folder} (a dense-llama or dense-gpt2 run writes one)")
    import json

    window = json.loads((run / "run.json").read_text()).get("config", {}).get("max_seq_len")
    return {"base": str(folder), **({"max_seq_len": window} if window else {})}  # the base's training window


HRM_LORA = ArchSpec(name="hrm-lora", description="HRM recurrence (low/high LoRA adapters, one-step gradient) on a frozen pretrained LM",
                    config_cls=HRMLoRAConfig, sizes=SIZES, build=build, check_sets=check_sets, base_from_run=base_from_run,
                    stage_runner=run_stage)
LORA = ArchSpec(name="lora", description="plain LoRA fine-tuning of a frozen pretrained LM (hrm-lora's baseline)",
                config_cls=LoRAConfig, sizes=SIZES, build=build, check_sets=check_sets, base_from_run=base_from_run)


@hookimpl
def register_architectures(register):
    register(HRM_LORA)
    register(LORA)
