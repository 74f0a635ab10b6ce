"""GPT-2 (transformers' GPT2Model backbone) with the exact hierarchical-softmax head.

Meets the model contract (`hmst_bench.arch.LanguageModel`) itself, since the head is not a
softmax: `loss` and `token_logprobs` touch only each target's path; `score`,
`next_token_logprobs` and generation use the full exact distribution. The Huffman tree is built
in `prepare` from the training split's token counts and saved as an artifact (`hsm_tree.npz`)
with every checkpoint; batched generation keeps GPT-2's KV cache (prompts left-padded behind an
attention mask), and greedy, top-k and top-p decoding
choose from the exact full distribution. `decode="descent"` switches generation to the
approximate tree descent (greedy only; sampling is refused).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from hmst_bench.arch import IGNORE_INDEX
from hmst_bench.model import LanguageModel
from hmst_bench.modeling import hf_cache_arg, hf_cache_of
from hmst_bench.util import atomic_save
from hmst_bench_gpt2_hsm.head import HSMHead
from hmst_bench_gpt2_hsm.tree import HuffmanTree, build_tree

TREE_FILE = "hsm_tree.npz"


class GPT2HSM(LanguageModel):
    kv_cache = True

    def __init__(self, config, tokenizer):
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        self.config = config
        self.max_seq_len = config.max_seq_len
        hf_config = GPT2Config(
            vocab_size=config.vocab_size, n_positions=config.max_seq_len, n_embd=config.d_model,
            n_layer=config.n_layers, n_head=config.n_heads, n_inner=config.d_ff,
            resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
            layer_norm_epsilon=config.layer_norm_eps, initializer_range=config.init_std,
            attn_implementation="sdpa", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        self.backbone = GPT2Model(hf_config)
        self.head = HSMHead(config.d_model, config.vocab_size, config.init_std)
        if config.use_prf:
            self.head.enable_prf(config.prf_features, seed=config.prf_seed)

    # ------------------------------------------------------------------ tree

    def prepare(self, train_tokens) -> None:
        counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=self.config.vocab_size)
        self.head.set_tree(build_tree(counts[: self.config.vocab_size]))

    def save_artifacts(self, run_dir) -> None:
        atomic_save(Path(run_dir) / TREE_FILE, lambda p: np.savez(open(p, "wb"), **self.head.tree.to_arrays()))

    def load_artifacts(self, run_dir) -> None:
        path = Path(run_dir) / TREE_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the Huffman tree of this gpt2-hsm run was not saved")
        with np.load(path) as arrays:
            self.head.set_tree(HuffmanTree.from_arrays(arrays))

    # ------------------------------------------------------------------ contract

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.max_seq_len:
            raise ValueError(f"{input_ids.shape[1]} tokens exceed the model's window of {self.max_seq_len}")
        return self.backbone(input_ids=input_ids, use_cache=False).last_hidden_state

    def loss(self, batch) -> tuple[torch.Tensor, dict]:
        h = self.hidden(batch["input_ids"])
        labels = batch["labels"]
        live = labels != IGNORE_INDEX
        approximate = self._approximate()
        if approximate and self.training:
            self.head.prf_calls += 1
            if int(self.head.prf_calls) % self.config.prf_redraw == 0:
                self.head.redraw()  # fresh features every prf_redraw training forward passes
        return -self.head.path_logprobs(h[live], labels[live], approximate=approximate).mean(), {}

    def flop_shares(self, batch) -> dict[str, float]:
        """Backbone and head shares of a step's FLOPs, from forward counts (backward costs about
        twice the forward in both, so the shares hold for the whole step)."""
        from hmst_bench.budget import count_flops

        ids, labels = batch["input_ids"], batch["labels"]
        h, backbone = count_flops(lambda: self.hidden(ids))
        live = labels != IGNORE_INDEX
        _, head = count_flops(lambda: self.head.path_logprobs(h[live], labels[live], approximate=self._approximate()))
        total = max(backbone + head, 1)
        return {"backbone": backbone / total, "head": head / total}

    def _approximate(self) -> bool:
        """FAVOR+ node logits: while training with use_prf, and in evaluation only with prf_eval."""
        return bool(self.config.use_prf and (self.training or self.config.prf_eval))

    def token_logprobs(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h = self.hidden(input_ids)
        live = targets != IGNORE_INDEX
        out = torch.zeros(targets.shape, dtype=torch.float32, device=h.device)
        out[live] = self.head.path_logprobs(h[live], targets[live].to(h.device), approximate=self._approximate()).float()
        return out

    def score(self, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.hidden(input_ids)
        live = targets != IGNORE_INDEX
        logprobs = torch.zeros(targets.shape, dtype=torch.float32, device=h.device)
        greedy = torch.ones(targets.shape, dtype=torch.bool, device=h.device)
        wanted = targets[live].to(h.device)
        logprobs[live] = self.head.path_logprobs(h[live], wanted, approximate=self._approximate()).float()
        greedy[live] = self.head.all_logprobs(h[live], approximate=self._approximate()).argmax(-1) == wanted
        return logprobs, greedy

    def next_token_logprobs(self, input_ids: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        if lengths is None:
            h = self.hidden(input_ids[:, -self.max_seq_len :])[:, -1]
        else:
            last = lengths.to(input_ids.device).long() - 1
            h = self.hidden(input_ids)[torch.arange(len(last), device=input_ids.device), last]
        return self.head.all_logprobs(h, approximate=self._approximate()).float()

    def decode_step(self, new_tokens: torch.Tensor, state: Any, pad: Optional[torch.Tensor] = None):
        """KV-cached step through the backbone, the prefill's left padding masked through the
        attention mask and every row's positions counted from its first real token."""
        decoding = state is not None
        if not decoding:
            cols = torch.arange(new_tokens.shape[1], device=new_tokens.device)[None, :]
            pad = torch.zeros(new_tokens.shape[0], dtype=torch.long, device=new_tokens.device) if pad is None else pad
            mask, positions = (cols >= pad[:, None]).long(), (cols - pad[:, None]).clamp_min(0)
        else:
            mask = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], dim=1)
            positions = state["next"][:, None]
        out = self.backbone(input_ids=new_tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                            **hf_cache_arg(state["past"] if decoding else None))
        h = out.last_hidden_state[:, -1]
        if self.config.decode == "descent":
            tokens = self.head.descend(h)
            logprobs = torch.full((h.shape[0], self.config.vocab_size), float("-inf"), device=h.device)
            logprobs[torch.arange(h.shape[0]), tokens] = 0.0  # the descended token, chosen outright
        else:
            logprobs = self.head.all_logprobs(h, approximate=self._approximate())
        return logprobs, {"mask": mask, "next": positions[:, -1] + 1, "past": hf_cache_of(out)}

    def generate(self, input_ids, max_new_tokens, *, temperature=0.0, top_p=1.0, top_k=0, **kwargs):
        """Exact mode: every step hands the shared loop the full exact distribution
        (`all_logprobs`, all V leaves), so greedy, temperature, top-k and top-p choose from it
        exactly at any temperature (with prf_eval, the FAVOR+ distribution, still normalised,
        is the one used). Descent mode is greedy tree descent only: it has no
        distribution to filter or sample from, so any sampling (temperature > 0, whatever top_k
        and top_p) is refused rather than silently answered greedily."""
        if self.config.decode == "descent" and temperature > 0:
            raise ValueError(
                f"decode='descent' is approximate greedy tree descent; sampling (temperature={temperature}, "
                f"top_k={top_k}, top_p={top_p}) needs decode='exact'"
            )
        return super().generate(input_ids, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, **kwargs)
