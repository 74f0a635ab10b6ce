"""The dense baselines as hmst-bench models: a thin wrapper around a transformers causal LM.

The wrapper adds nothing to the network; it only speaks the hmst-bench contract (loss on
pre-shifted labels, exact token log-probs, batched generation on transformers' KV cache with the
prompts left-padded behind an attention mask) and writes a `save_pretrained` copy to `RUN/hf/` so that
`AutoModelForCausalLM.from_pretrained(RUN/hf)` and lm-eval's `HFLM` load the very same weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from hmst_bench.modeling import SoftmaxLM, hf_cache_arg, hf_cache_of
from hmst_bench.util import atomic_dir


class HFCausalLM(SoftmaxLM):
    kv_cache = True

    def __init__(self, hf_model, tokenizer, max_seq_len: int):
        super().__init__()
        self.hf = hf_model
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len

    def logits(self, input_ids: torch.Tensor, keep: Optional[slice] = None) -> torch.Tensor:
        if keep is None:
            return self.hf(input_ids=input_ids, use_cache=False).logits
        # transformers projects only the kept positions onto the vocabulary
        if keep.stop >= input_ids.shape[1]:
            to_keep = input_ids.shape[1] - keep.start  # the last n positions: a view, no gather
        else:
            to_keep = torch.arange(keep.start, keep.stop, device=input_ids.device)
        return self.hf(input_ids=input_ids, use_cache=False, logits_to_keep=to_keep).logits

    def decode_step(self, new_tokens: torch.Tensor, state: Any, pad: Optional[torch.Tensor] = None):
        """KV-cached step on transformers' cache: the prefill's left padding is masked through the
        attention mask, and every row counts its positions from its own first real token."""
        decoding = state is not None
        if not decoding:
            t = new_tokens.shape[1]
            cols = torch.arange(t, device=new_tokens.device)[None, :]
            pad = torch.zeros(new_tokens.shape[0], dtype=torch.long, device=new_tokens.device) if pad is None else pad
            mask, positions = (cols >= pad[:, None]).long(), (cols - pad[:, None]).clamp_min(0)
        else:
            mask = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], dim=1)
            positions = state["next"][:, None]
        out = self.hf(input_ids=new_tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                      logits_to_keep=1, **hf_cache_arg(state["past"] if decoding else None))
        logprobs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        return logprobs, {"mask": mask, "next": positions[:, -1] + 1, "past": hf_cache_of(out)}

    def export(self, run_dir: str | Path) -> None:
        """RUN/hf/: the same weights as a transformers checkpoint, with the tokenizer."""
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # keep the run's stderr to our own progress display
        with atomic_dir(Path(run_dir) / "hf") as tmp:
            self.hf.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)


def _special_ids(tokenizer) -> dict:
    return dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def build_llama(config, tokenizer) -> HFCausalLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_embeddings,
        initializer_range=config.init_std,
        attn_implementation="sdpa",
        **_special_ids(tokenizer),
    )
    return HFCausalLM(LlamaForCausalLM(hf_config), tokenizer, config.max_seq_len)


def build_gpt2(config, tokenizer) -> HFCausalLM:
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_config = GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.max_seq_len,
        n_embd=config.d_model,
        n_layer=config.n_layers,
        n_head=config.n_heads,
        n_inner=config.d_ff,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=config.layer_norm_eps,
        initializer_range=config.init_std,
        attn_implementation="sdpa",
        **_special_ids(tokenizer),
    )
    return HFCausalLM(GPT2LMHeadModel(hf_config), tokenizer, config.max_seq_len)
