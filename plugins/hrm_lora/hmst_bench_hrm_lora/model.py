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

Deep supervision and ACT (`segments` > 1): hmst_bench.train.deep_supervision, the runner
hrm-codegen trains with. Each optimiser step runs one segment from the state its sequence carried
from the previous step; a Q-head (`act`, pooled over the row) learns when a sequence may halt.
Inference runs all `segments` segments, the state between them detached, from z = 0.

Only adapter parameters (and the Q-head) train; the base is frozen and its files are only read.
Decoding is KV-cached and exact: each call of the recurrence keeps its own transformers cache.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hmst_bench.arch import IGNORE_INDEX
from hmst_bench.modeling import SoftmaxLM
from hmst_bench.train.deep_supervision import pooled_q, segment_loss
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
        self.q_head = None
        if getattr(config, "act", False) and getattr(config, "segments", 1) > 1:  # as hrm-codegen: "continue" at first
            self.q_head = nn.Linear(base.config.hidden_size, 2)
            nn.init.zeros_(self.q_head.weight)
            nn.init.constant_(self.q_head.bias, -5.0)

    @property
    def base(self):
        return self.peft.base_model.model

    def cycles(self) -> tuple[int, int]:
        return getattr(self.config, "h_cycles", 1), getattr(self.config, "l_cycles", 1)

    def _prepare(self, input_ids: torch.Tensor, start: int = 0, caches: Optional[list] = None):
        """(x, run): the base's input embedding of tokens at positions start.., and run(h, blocks)
        applying a span of the base's blocks; with `caches` (decoding) each call takes the next."""
        base, fam = self.base, self.family
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)[None]
        x = fam.embed(base, input_ids, positions)
        # every call's cache holds the same positions, so one mask serves them all
        kwargs = fam.call_args(base, x, positions, None if caches is None else caches[0])
        calls = iter(caches) if caches is not None else None

        def run(h, blocks):
            return run_blocks(fam, base, h, blocks, kwargs if calls is None else {**kwargs, "cache": next(calls)})

        return x, run

    def _segment(self, x: torch.Tensor, z_h: torch.Tensor, z_l: torch.Tensor, run) -> tuple[torch.Tensor, torch.Tensor]:
        """h_cycles x (l_cycles low calls, one high call) from (z_h, z_l); only the last low and the
        last high call build a graph, unless full_bptt."""
        h_cycles, l_cycles = self.cycles()
        full = getattr(self.config, "full_bptt", False)
        for i in range(h_cycles):
            for j in range(l_cycles):
                last = i == h_cycles - 1 and j == l_cycles - 1
                with nullcontext() if full or last else torch.no_grad():
                    z_l = run(z_l + z_h + x, self.low_blocks)
            with nullcontext() if full or i == h_cycles - 1 else torch.no_grad():
                z_h = run(z_h + z_l, self.high_blocks)
        return z_h, z_l

    def segments(self) -> int:
        return getattr(self.config, "segments", 1)

    def hidden(self, input_ids: torch.Tensor, start: int = 0, caches: Optional[list] = None) -> torch.Tensor:
        """z_H [B, T, d] after every segment of the recurrence (see the module docstring), from
        z_L = z_H = 0, the state passed between segments detached as in training. `caches`: one
        transformers cache per call of the recurrence (decoding); None: a whole text."""
        x, run = self._prepare(input_ids, start, caches)
        z_h, z_l = torch.zeros_like(x), torch.zeros_like(x)
        with torch.no_grad():
            for _ in range(self.segments() - 1):
                z_h, z_l = self._segment(x, z_h, z_l, run)
        return self._segment(x, z_h, z_l, run)[0]

    # ------------------------------------------------------------------ deep supervision protocol

    def carry_init(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z_H = z_L = 0, the state every sequence starts from (so one segment of one cycle is the base)."""
        weight = self.base.get_input_embeddings().weight
        zeros = torch.zeros(*input_ids.shape, weight.shape[1], dtype=weight.dtype, device=input_ids.device)
        return zeros, zeros.clone()

    def run_segment(self, input_ids: torch.Tensor, z_h: torch.Tensor, z_l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, run = self._prepare(input_ids)
        return self._segment(x, z_h, z_l, run)

    def head(self, z_h: torch.Tensor) -> torch.Tensor:
        return self.family.head(self.base, z_h)[..., : self.config.vocab_size]

    def lm_loss(self, raw: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(raw.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)

    def q_logits(self, z_h: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return pooled_q(self.q_head, z_h, input_ids, getattr(self.tokenizer, "pad_token_id", None))

    def loss(self, batch) -> tuple[torch.Tensor, dict]:
        """The model as inference runs it, or with "z_h" in the batch one segment from that carried
        state (the deep-supervision runner: hmst_bench.train.deep_supervision.segment_loss)."""
        return segment_loss(self, batch) if "z_h" in batch else super().loss(batch)

    def decode_step(self, new_tokens: torch.Tensor, state, pad: Optional[torch.Tensor] = None):
        """Exact KV-cached step: every call of the recurrence keeps its own cache (each is
        causal, so a new token changes no earlier position's state in any call). Rows are not
        padded (`kv_cache_pads` is False: the shared generation batches prompts of one length)."""
        from transformers import DynamicCache

        if pad is not None and bool(pad.any()):
            raise ValueError("hrm-lora decodes unpadded rows only (kv_cache_pads is False)")
        if state is None:
            h_cycles, l_cycles = self.cycles()
            calls = self.segments() * h_cycles * (l_cycles + 1)
            state = {"caches": [DynamicCache(config=self.base.config) for _ in range(calls)], "pos": 0}
        logits = self.head(self.hidden(new_tokens, state["pos"], state["caches"])[:, -1:])
        return torch.log_softmax(logits[:, -1].float(), dim=-1), {**state, "pos": state["pos"] + new_tokens.shape[1]}

    def logits(self, input_ids: torch.Tensor, keep: Optional[slice] = None) -> torch.Tensor:
        h = self.hidden(input_ids)
        return self.head(h if keep is None else h[:, keep])

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
        """The adapters (and the Q-head, with ACT) only: the frozen base is read from `config.base`, never written."""
        full = super().state_dict(*args, **kwargs)
        return type(full)((k, v) for k, v in full.items() if _trained(k))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        missing = [k for k in super().state_dict() if _trained(k) and k not in state_dict]
        unexpected = [k for k in state_dict if not _trained(k)]
        if strict and (missing or unexpected):
            raise RuntimeError(f"adapter weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        return type(result)([k for k in result.missing_keys if _trained(k)], result.unexpected_keys)


def _trained(key: str) -> bool:
    return "lora_" in key or key.startswith("q_head.")
