"""How hrm-lora reaches inside a transformers causal LM: its decoder blocks, what goes into the
first block, what one block call takes, the final norm and head, and the module names PEFT's
`target_modules` uses for attention and for the feed-forward layers.

The recurrence calls spans of the base's blocks itself (transformers runs them all in one
`forward`), so each family it supports is spelled out here and checked by a test: with the LoRA
B matrices at zero and one cycle the recurrence must give exactly the base's logits.

    llama   Llama, Mistral, Qwen2 and Gemma (model.model.layers, rotary embeddings; Gemma's
            embedding module scales by sqrt(d) itself)
    gpt2    GPT-2 (model.transformer.h, learned position embeddings, Conv1D projections)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

LLAMA_TYPES = ("llama", "mistral", "qwen2", "gemma")
GPT2_TYPES = ("gpt2",)
KNOWN = LLAMA_TYPES + GPT2_TYPES


class FamilyError(ValueError):
    pass


@dataclass(frozen=True)
class Family:
    name: str
    layers: Callable  # model -> ModuleList of blocks
    prefix: str  # the blocks' module path inside the model, e.g. "model.layers"
    attention: tuple  # module names inside a block for LoRA on attention
    ffn: tuple  # ... and on the feed-forward layers
    embed: Callable  # (model, ids, positions [1, T]) -> x [B, T, d]
    call_args: Callable  # (model, x, positions, cache or None) -> kwargs for every block call
    run_block: Callable  # (block, h, kwargs) -> h
    head: Callable  # (model, h) -> logits
    fan_in_fan_out: bool = False  # GPT-2's Conv1D stores weights transposed

    def targets(self, which: str, blocks: range) -> list[str]:
        """Full module names of `which` ("attention" or "ffn") in `blocks` (PEFT matches names by
        suffix, so full paths keep an adapter to its span)."""
        names = self.attention if which == "attention" else self.ffn
        return [f"{self.prefix}.{i}.{n}" for i in blocks for n in names]


def _causal_mask(model, x, positions, cache):
    """transformers' own mask for these positions after what `cache` holds (None: causal inside x)."""
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(config=model.config, inputs_embeds=x, attention_mask=None, cache=cache,
                              position_ids=positions)


def _llama_args(model, x, positions, cache) -> dict:
    return {"attention_mask": _causal_mask(model, x, positions, cache), "position_ids": positions,
            "position_embeddings": model.model.rotary_emb(x, position_ids=positions)}


def _gpt2_embed(model, ids, positions):
    t = model.transformer
    return t.drop(t.wte(ids) + t.wpe(positions))


def _gpt2_block(block, h, kw):
    return block(h, kw.get("cache"), kw["attention_mask"], position_ids=kw["position_ids"], use_cache=kw.get("cache") is not None)


LLAMA = Family("llama", lambda m: m.model.layers, "model.layers",
               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
               ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
               lambda m, ids, pos: m.model.embed_tokens(ids), _llama_args,
               lambda block, h, kw: block(h, use_cache=kw.get("cache") is not None, **kw),
               lambda m, h: m.lm_head(m.model.norm(h)))
GPT2 = Family("gpt2", lambda m: m.transformer.h, "transformer.h", ("attn.c_attn", "attn.c_proj"),
              ("mlp.c_fc", "mlp.c_proj"), _gpt2_embed,
              lambda m, x, pos, cache: {"attention_mask": _causal_mask(m, x, pos, cache), "position_ids": pos}, _gpt2_block,
              lambda m, h: m.lm_head(m.transformer.ln_f(h)), fan_in_fan_out=True)


def family_of(config) -> Family:
    """The family of a transformers config (read before any weight is loaded); an unknown one is
    refused in one line."""
    kind = getattr(config, "model_type", None)
    if kind in LLAMA_TYPES:
        return LLAMA
    if kind in GPT2_TYPES:
        return GPT2
    raise FamilyError(f"hrm-lora does not know the {kind!r} model family; known: {', '.join(KNOWN)}")


def run_blocks(family: Family, model, h: torch.Tensor, blocks: range, kwargs: dict) -> torch.Tensor:
    layers = family.layers(model)
    for i in blocks:
        h = family.run_block(layers[i], h, kwargs)
    return h
