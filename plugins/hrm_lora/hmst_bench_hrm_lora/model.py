"""The hrm-lora model: HRM recurrence through a frozen pretrained causal LM whose blocks carry
two PEFT LoRA adapters.

The base's blocks are split in two spans: L = blocks [0, split) carries the adapter `low` (rank
`low_rank`, on attention), H = blocks [split, n) the adapter `high` (rank `high_rank`, on the
feed-forward layers). The adapters sit on disjoint modules, so each call of a span runs exactly
its own adapter. With x the base's input embedding and z_L = z_H = 0 at the start:

    h_cycles times:  l_cycles times  z_L <- L(z_L + z_H + x)
                     then            z_H <- H(z_H + z_L)

and the base's final norm and head read z_H. Every block is the base's causal block, so position t
never reads a later token in any call. With the LoRA B matrices at zero (PEFT's initialisation)
and one cycle of each, z_H = H(L(x)) is the base's own forward pass: the model starts as the base.

One-step gradient (the HRM paper's approximation): every call but the last L call and the last H
call runs under `torch.no_grad()`, so training memory does not grow with the cycles;
`full_bptt=True` backpropagates through every call (the comparison the benchmark measures).

`lora` (the plain baseline) is the same model with one cycle of each: the same adapters on the
same modules of the same base, trained on the same data, without the recurrence.

Only adapter parameters train; the base is frozen and its files are only read. Decoding is
KV-cached and exact: each call of the recurrence keeps its own transformers cache.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch

from hmst_bench.modeling import SoftmaxLM
from hmst_bench_hrm_lora.families import FamilyError, family_of, run_blocks

ADAPTERS_DIR = "adapters"  # RUN/adapters/<low|high>/: PEFT's adapter_config.json + adapter_model.safetensors


class BaseError(ValueError):
    """A base model path that cannot be used (the message names the fix)."""


def load_base(path: str):
    """The frozen transformers causal LM at `path` (a folder written by `save_pretrained`); never
    downloads."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the run's stderr is for our own progress display
    if not path:
        raise BaseError("hrm-lora needs a pretrained base: --set base=PATH (a transformers model folder, e.g. a dense run's RUN/hf)")
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise BaseError(f"base {path} is not a transformers model folder (no config.json); give a folder written by save_pretrained")
    try:
        family_of(AutoConfig.from_pretrained(str(folder), local_files_only=True))  # refuse an unknown family first
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, attn_implementation="sdpa")
    except (OSError, ValueError, KeyError) as exc:
        if isinstance(exc, FamilyError):
            raise
        raise BaseError(f"cannot load the base model at {path}: {str(exc).splitlines()[0]}") from None
    model.requires_grad_(False)
    return model


class HRMLoRA(SoftmaxLM):
    kv_cache = True
    kv_cache_pads = False

    def __init__(self, config, tokenizer=None):
        from peft import LoraConfig, get_peft_model

        super().__init__()
        self.config = config
        base = load_base(config.base)
        self.family = family_of(base.config)
        n = len(self.family.layers(base))
        if base.config.vocab_size < config.vocab_size:
            raise BaseError(f"the tokenizer has {config.vocab_size} tokens, the base's embedding {base.config.vocab_size}: "
                            "train with the base's tokenizer (--tokenizer BASE_FOLDER)")
        self.split = config.split or max(1, n // 2)
        if not 1 <= self.split < n:
            raise BaseError(f"split must leave blocks on both sides: 1..{n - 1} for this {n}-block base, got {config.split}")
        self.max_seq_len = min(config.max_seq_len, getattr(base.config, "max_position_embeddings", config.max_seq_len))
        self.low_blocks, self.high_blocks = range(0, self.split), range(self.split, n)
        common = dict(lora_dropout=config.lora_dropout, bias="none", fan_in_fan_out=self.family.fan_in_fan_out)
        low = LoraConfig(r=config.low_rank, lora_alpha=config.low_rank * config.alpha_ratio,
                         target_modules=self.family.targets("attention", self.low_blocks), **common)
        high = LoraConfig(r=config.high_rank, lora_alpha=config.high_rank * config.alpha_ratio,
                          target_modules=self.family.targets("ffn", self.high_blocks), **common)
        with warnings.catch_warnings():  # PEFT calls a transformers method deprecated in v5; nothing to act on
            warnings.simplefilter("ignore", FutureWarning)
            self.peft = get_peft_model(base, low, adapter_name="low")
            self.peft.add_adapter("high", high)
        self.peft.base_model.set_adapter(["low", "high"])  # disjoint modules: each call runs its own
        for name, p in self.peft.named_parameters():
            p.requires_grad_("lora_" in name)
        self.tokenizer = tokenizer

    @property
    def base(self):
        return self.peft.base_model.model

    def cycles(self) -> tuple[int, int]:
        return getattr(self.config, "h_cycles", 1), getattr(self.config, "l_cycles", 1)

    def hidden(self, input_ids: torch.Tensor, start: int = 0, caches: Optional[list] = None) -> torch.Tensor:
        """z_H [B, T, d] after the recurrence (see the module docstring) for tokens at positions
        start.. . `caches`: one transformers cache per call of the recurrence (decoding), each
        holding that call's keys and values of the earlier positions; None: a whole text."""
        base, fam = self.base, self.family
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)[None]
        x = fam.embed(base, input_ids, positions)
        # every call's cache holds the same positions, so one mask serves them all
        kwargs = fam.call_args(base, x, positions, None if caches is None else caches[0])
        calls = iter(caches) if caches is not None else None

        def run(h, blocks):
            return run_blocks(fam, base, h, blocks, kwargs if calls is None else {**kwargs, "cache": next(calls)})

        z_l = torch.zeros_like(x)
        z_h = torch.zeros_like(x)
        h_cycles, l_cycles = self.cycles()
        full = getattr(self.config, "full_bptt", False)
        for i in range(h_cycles):
            for j in range(l_cycles):
                last = i == h_cycles - 1 and j == l_cycles - 1
                with nullcontext() if full or last else torch.no_grad():
                    z_l = run(z_l + z_h + x, self.low_blocks)
            with nullcontext() if full or i == h_cycles - 1 else torch.no_grad():
                z_h = run(z_h + z_l, self.high_blocks)
        return z_h

    def decode_step(self, new_tokens: torch.Tensor, state, pad: Optional[torch.Tensor] = None):
        """Exact KV-cached step: every call of the recurrence keeps its own cache (each is
        causal, so a new token changes no earlier position's state in any call). Rows are not
        padded (`kv_cache_pads` is False: the shared generation batches prompts of one length)."""
        from transformers import DynamicCache

        if pad is not None and bool(pad.any()):
            raise ValueError("hrm-lora decodes unpadded rows only (kv_cache_pads is False)")
        if state is None:
            h_cycles, l_cycles = self.cycles()
            state = {"caches": [DynamicCache(config=self.base.config) for _ in range(h_cycles * (l_cycles + 1))], "pos": 0}
        h = self.hidden(new_tokens, state["pos"], state["caches"])
        logits = self.family.head(self.base, h[:, -1:])[..., : self.config.vocab_size]
        return torch.log_softmax(logits[:, -1].float(), dim=-1), {**state, "pos": state["pos"] + new_tokens.shape[1]}

    def logits(self, input_ids: torch.Tensor, keep: Optional[slice] = None) -> torch.Tensor:
        h = self.hidden(input_ids)
        return self.family.head(self.base, h if keep is None else h[:, keep])[..., : self.config.vocab_size]

    # ------------------------------------------------------------------ saving

    def save_artifacts(self, folder) -> None:
        """The adapters in PEFT's format (RUN/adapters/low, RUN/adapters/high), loadable with
        `PeftModel.from_pretrained(base, RUN/adapters/low, adapter_name="low")`."""
        from hmst_bench.util import atomic_dir

        with atomic_dir(Path(folder) / ADAPTERS_DIR) as tmp:
            for name in ("low", "high"):
                self.peft.save_pretrained(tmp, selected_adapters=[name])
            default = Path(tmp) / "adapter_config.json"  # PEFT writes a non-default adapter under its name
            if default.exists():
                default.unlink()

    def state_dict(self, *args, **kwargs):
        """The adapters only: the frozen base is read from `config.base`, never written."""
        full = super().state_dict(*args, **kwargs)
        return type(full)((k, v) for k, v in full.items() if "lora_" in k)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        missing = [k for k in super().state_dict() if "lora_" in k and k not in state_dict]
        unexpected = [k for k in state_dict if "lora_" not in k]
        if strict and (missing or unexpected):
            raise RuntimeError(f"adapter weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        return type(result)([k for k in result.missing_keys if "lora_" in k], result.unexpected_keys)
