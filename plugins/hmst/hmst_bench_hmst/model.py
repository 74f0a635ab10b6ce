"""HMST's language model: a causal MoE transformer (stage 1) with, once stage 2 turns
`config.memory` on, an episodic and a semantic memory of the text beyond its window (`memory.py`).

Pre-norm blocks: RMSNorm -> bias-free multi-head attention with RoPE (causal
`scaled_dot_product_attention`) -> residual; RMSNorm -> MoE feed-forward (`moe.MoE`; every
`moe_every`-th layer, the others a dense SwiGLU of the same width) -> residual. A final RMSNorm
and a vocabulary head, tied to the embedding or not.

One forward pass (`forward_all`) gives the final hidden states, the logits (only at the kept
positions) and the routing statistics; `encode`, `logits` and `loss` all use it, so a query
costs one pass. `loss` = next-token cross-entropy + balance_coef * balance + z_loss_coef * z.

Decoding is KV-cached and exact: each layer keeps the keys and values of the positions seen so
far, prompts left-padded behind a mask (with memory: prompts of equal length only). RoPE tables cover exactly the window;
past it the shared generation loop re-reads the last window (`hmst_bench.generation`). No
position beyond the window is ever indexed.

With memory (`config.memory`), a text longer than the window is read in window-sized segments
aligned from its first token: attention sees the current segment, the memory reader (after block
`memory_layer`) what earlier segments wrote (see `memory.py`). `logits`, `loss`, `score` and
decoding all follow that one reading, up to `max_context_len` = memory_max_segments windows
(longer queries keep their last max_context_len tokens). Decoding with memory keeps the KV cache
of the current segment; when a segment fills, its hidden states are written to the memory and the
cache starts afresh. Its rows are not padded (segments are aligned from a row's first token), so
the shared generation batches only prompts of equal length (`kv_cache_pads = False`). With memory, every text (even one within the window) also
reads the run's long-term store (`memory.LongTermMemory`, filled by stage 2 and saved with the run
through `save_artifacts`). Without memory the model is the plain MoE LM above.

With `config.critic` (the critic stage) the model carries a critic (`critic.py`) and declares
`hallucination_detector`: `hallucination_scores` is the critic's P(wrong) of each answer.

With `config.controller` "on" (stage 3) the meta-controller (`controller.py`, `policy.py`)
decides, before every generated token, what the step computes (`Gates`), and after the answer
whether the critic checks it; generation then runs one row at a time (the gates are per row).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from hmst_bench.arch import IGNORE_INDEX
from hmst_bench.generation import right_padded
from hmst_bench.model import per_group
from hmst_bench.modeling import Attention, RMSNorm, SoftmaxLM, SwiGLU, new_caches, rope_at, rope_tables
from hmst_bench_hmst.controller import Controller
from hmst_bench_hmst.critic import Critic
from hmst_bench_hmst.memory import DocMemory, LongTermMemory, MemoryModules, memory_extra_flops
from hmst_bench_hmst.moe import MoE, RouterStats


class Block(nn.Module):
    def __init__(self, config, use_moe: bool):
        super().__init__()
        out_std = config.init_std / math.sqrt(2 * config.n_layers)
        self.attn_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.attn = Attention(config.d_model, config.n_heads)
        nn.init.normal_(self.attn.qkv.weight, std=config.init_std)
        nn.init.normal_(self.attn.out.weight, std=out_std)
        self.ffn_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.use_moe = use_moe
        if use_moe:
            self.ffn = MoE(config.d_model, config.expert_d_ff, config.n_experts, config.top_k, config.init_std)
        else:  # the dense feed-forward of layers without experts (moe_every > 1)
            self.ffn = SwiGLU(config.d_model, config.expert_d_ff)
            nn.init.normal_(self.ffn.gate_up.weight, std=config.init_std)
            nn.init.normal_(self.ffn.down.weight, std=out_std)

    def forward(self, h, cos, sin, cache=None, top_k: Optional[int] = None) -> tuple[torch.Tensor, Optional[RouterStats]]:
        h = h + self.attn(self.attn_norm(h), cos, sin, cache)
        if not self.use_moe:
            return h + self.ffn(self.ffn_norm(h)), None
        y, stats = self.ffn(self.ffn_norm(h), top_k)
        return h + y, stats


@dataclass(frozen=True)
class Gates:
    """What one decoding step computes (the meta-controller's decisions; the defaults are the full
    model): `exit` ends the step after that many blocks (one of `config.exits`; None: all blocks),
    `top_k` routes each MoE layer to that many experts (None: the layer's own), `episodic` and
    `semantic` read those memory tiers (with memory on)."""

    exit: Optional[int] = None
    top_k: Optional[int] = None
    episodic: bool = True
    semantic: bool = True


FULL = Gates()

# an answer's traced critic features are found by its tokens and its prompt's last TRACE_KEY
# tokens: the evaluator may hand over a prompt longer than the one the model was given (it cut the
# left for room to generate), and the features are those of the pass that produced the answer
TRACE_KEY = 32
COSTS_FILE = "controller_costs.json"  # the gates' measured cost table (policy.Costs), saved with the run


class HMSTModel(SoftmaxLM):
    kv_cache = True

    def __init__(self, config, tokenizer=None):
        super().__init__()
        self.config = config
        # cached decoding; with memory only of unpadded rows (segments are aligned from each
        # row's first token, which left padding would shift)
        self.kv_cache_pads = not config.memory
        self.max_seq_len = config.max_seq_len
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.embed.weight, std=config.init_std)
        self.layers = nn.ModuleList(Block(config, (i + 1) % config.moe_every == 0) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.head = None
        if not config.tie_embeddings:
            self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
            nn.init.normal_(self.head.weight, std=config.init_std)
        cos, sin = rope_tables(config.max_seq_len, config.head_dim, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.memory = MemoryModules(config) if config.memory else None
        self.max_context_len = config.max_seq_len * config.memory_max_segments if config.memory else None
        # the run's long-term store (memory.LongTermMemory): filled by stage 2, saved with the run
        self.longterm = LongTermMemory(config) if config.memory and config.longterm_capacity else None
        # the stage-2 runner turns this on: training reads then keep what they consolidated (and
        # the long-term searches' FLOPs) until it takes them for the long-term store
        self.collect_consolidated = False
        self._pending: list = []
        self._pending_flops = 0
        # the critic (critic.py), added by the critic stage (which trains it alone)
        self.tokenizer = tokenizer
        self.critic = Critic(config) if config.critic else None
        self.hallucination_detector = config.critic
        # greedy generation with a critic keeps each answer's features from the decoding pass
        # (critic.from_trace), keyed by (prompt's last TRACE_KEY ids, answer ids), for hallucination_scores
        self._tracing, self._last_state = False, None
        self._traced: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self.hallucination_stats: dict = {}
        # the meta-controller (stage 3); while a controlled row decodes, `_episode` records it
        self.controller = Controller(config) if config.controller != "none" else None
        self._episode = None
        self._costs = None  # policy.Costs, measured on first use
        self._decoding: dict = {}

    # ------------------------------------------------------------------ one forward pass

    def forward_all(self, input_ids: torch.Tensor, keep: Optional[slice] = None, start: int = 0,
                    caches: Optional[list] = None, mem: Optional[DocMemory] = None,
                    pad: Optional[torch.Tensor] = None, exits: Optional[dict] = None, gates: Gates = FULL,
                    ) -> tuple[torch.Tensor, torch.Tensor, list[RouterStats]]:
        """(final hidden states [B, T, d], logits [B, T or len(keep), V], routing stats per MoE
        layer) from one pass over input_ids, which sit at columns start .. start + T - 1 of the
        window (positions: columns less each row's left padding `pad`, when decoding a padded
        batch); `mem`: the memory of earlier segments, read after block memory_layer; `exits`: a
        dict that receives the hidden state after each block of `config.exits` (by block count);
        `gates`: the expert count and memory tiers of this pass (its `exit` is decode_step's)."""
        cos, sin = rope_at(self.rope_cos, self.rope_sin, start, input_ids.shape[1], pad)
        h = self.embed(input_ids)
        stats = []
        for i, layer in enumerate(self.layers):
            h, s = layer(h, cos, sin, None if caches is None else caches[i], gates.top_k)
            if s is not None:
                stats.append(s)
            if mem is not None and i == self.config.memory_layer and mem.readable:
                h = h + self.memory.reader(h, mem, gates.episodic, gates.semantic)
            if exits is not None and i + 1 in self.config.exits:
                exits[i + 1] = h
        h = self.norm(h)
        return h, self.project(h if keep is None else h[:, keep]), stats

    def new_memory(self, batch: int) -> DocMemory:
        return self.memory.new_memory(batch, self.longterm)

    def segments(self, input_ids: torch.Tensor, keep: Optional[slice] = None, mem: Optional[DocMemory] = None):
        """Read a text of any length (up to max_context_len) with memory: yields (start, hidden
        states, logits at the kept positions of the segment, routing stats) per window-sized
        segment; each finished segment is written to the memory before the next is read."""
        w, total = self.max_seq_len, input_ids.shape[1]
        lo, hi = (0, total) if keep is None else keep.indices(total)[:2]
        mem = mem if mem is not None else self.new_memory(input_ids.shape[0])
        for a in range(0, total, w):
            seg = input_ids[:, a : a + w]
            local = slice(min(max(lo - a, 0), seg.shape[1]), min(max(hi - a, 0), seg.shape[1]))
            h, logits, stats = self.forward_all(seg, local, 0, None, mem)
            yield a, h, logits, stats
            if a + w < total:
                mem.write(h)

    def score_continuations(self, groups) -> list[list[tuple[float, bool]]]:
        """With memory: the whole segments of every context are read once, the contexts with as
        many of them side by side as one batch; each continuation then reads only the rest (its
        context's last partial segment and itself) from a read-only view of its context's memory
        row. Equal to scoring every row from its first token; a group whose rows would have to
        write another segment is scored by the default."""
        if self.memory is None:
            return super().score_continuations(groups)
        w = self.max_seq_len
        out: list = [None] * len(groups)
        shared: dict[int, list[int]] = {}  # column a where the shared segments end -> groups
        plain = []
        for g, (context, continuations) in enumerate(groups):
            a = (len(context) - 1) // w * w  # segments before column a hold context tokens only
            if a == 0 or len(context) + max(map(len, continuations)) - 1 - a > w:
                plain.append(g)
            else:
                shared.setdefault(a, []).append(g)
        if plain:
            for g, answers in zip(plain, super().score_continuations([groups[g] for g in plain])):
                out[g] = answers
        for a, members in shared.items():
            for g, answers in zip(members, self._score_from_shared_segments(a, [groups[g] for g in members])):
                out[g] = answers
        return out

    def _score_from_shared_segments(self, a: int, groups) -> list[list[tuple[float, bool]]]:
        w, device = self.max_seq_len, self.embed.weight.device
        prefix = torch.tensor([list(context[:a]) for context, _ in groups], dtype=torch.long, device=device)
        mem = self.new_memory(len(groups))
        for s in range(0, a, w):
            mem.write(self.forward_all(prefix[:, s : s + w], slice(0, 0), 0, None, mem)[0])
        tails, owner, first, conts = [], [], [], []
        for g, (context, continuations) in enumerate(groups):
            for c in continuations:
                tails.append((list(context) + list(c))[a:-1])
                owner.append(g)
                first.append(len(context) - 1 - a)  # the tail column predicting c's first token
                conts.append(list(c))
        ids = right_padded(tails, device)[0]
        lo = min(first)
        logits = self.forward_all(ids, slice(lo, ids.shape[1]), 0, None, mem.rows_for_reading(owner))[1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        flat = []
        for r, c in enumerate(conts):
            got = logp[r, first[r] - lo : first[r] - lo + len(c)]
            target = torch.tensor(c, device=got.device)
            flat.append((float(got.gather(-1, target[:, None]).sum()), bool((got.argmax(-1) == target).all())))
        return per_group(flat, groups)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h) if self.head is not None else F.linear(h, self.embed.weight)

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, T, d] (what a memory module will read)."""
        return self.forward_all(input_ids, keep=slice(0, 0))[0]

    def logits(self, input_ids: torch.Tensor, keep: Optional[slice] = None) -> torch.Tensor:
        if self.memory is not None:
            return torch.cat([logits for _, _, logits, _ in self.segments(input_ids, keep)], dim=1)
        return self.forward_all(input_ids, keep)[1]

    # ------------------------------------------------------------------ training

    def loss(self, batch) -> tuple[torch.Tensor, dict]:
        """Next-token loss plus the routers' aux losses; a batch longer than the window (stage
        2's documents) is read in segments with memory, its loss the mean over all its tokens."""
        ids, labels = batch["input_ids"], batch["labels"]
        exits = {} if self.config.early_exit_loss else None  # the exits' hidden states (no memory)
        if self.memory is not None:
            nats, stats = 0.0, []
            mem = self.new_memory(ids.shape[0])
            for a, _, logits, st in self.segments(ids, mem=mem):
                target = labels[:, a : a + logits.shape[1]]
                nats = nats + F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(),
                                              ignore_index=IGNORE_INDEX, reduction="sum")
                stats += st
            lm = nats / (labels != IGNORE_INDEX).sum().clamp_min(1)
            if self.collect_consolidated and self.training and torch.is_grad_enabled():  # stage2.py
                self._pending.append(mem.consolidated_entries())
                self._pending_flops += mem.longterm_flops
        else:
            _, logits, stats = self.forward_all(ids, exits=exits)
            lm = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        aux = {"lm_loss": lm.detach()}
        total = lm
        if exits:
            exit_loss, exit_aux = self._exit_loss(exits, labels)
            total = total + self.config.early_exit_loss * exit_loss
            aux.update(exit_aux)
        if stats:
            balance = torch.stack([s.balance_loss for s in stats]).mean()
            z = torch.stack([s.z_loss for s in stats]).mean()
            total = total + self.config.balance_coef * balance + self.config.z_loss_coef * z
            load = torch.stack([s.load for s in stats]).mean(dim=0)
            aux.update(balance_loss=balance.detach(), z_loss=z.detach(), expert_load_max=load.max())
            aux.update({f"load_e{i}": f for i, f in enumerate(load)})
        return total, aux

    def exit_logits(self, h: torch.Tensor) -> torch.Tensor:
        """An exit's logits: the final norm and LM head over an earlier block's hidden states."""
        return self.project(self.norm(h))

    def _exit_loss(self, exits: dict, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """LayerSkip's early-exit loss: the exits' cross-entropies, exit after block e weighted
        e / n_layers (rising with depth), normalised by the weights' sum."""
        weights = {e: e / self.config.n_layers for e in exits}
        total, aux = 0.0, {}
        for e, h in exits.items():
            ce = F.cross_entropy(self.exit_logits(h).flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
            total = total + weights[e] * ce
            aux[f"exit{e}_loss"] = ce.detach()
        return total / sum(weights.values()), aux

    def take_pending(self) -> tuple[list, int]:
        """What training reads consolidated since the last call (one item per loss call) and the
        long-term searches' FLOPs they spent; both are then cleared."""
        pending, flops = self._pending, self._pending_flops
        self._pending, self._pending_flops = [], 0
        return pending, flops

    def save_artifacts(self, folder) -> None:
        """The long-term store, and the controller's measured gate costs (stage 3)."""
        if self.longterm is not None:
            self.longterm.save(folder)
        if self._costs is not None:
            from hmst_bench.util import atomic_write_json

            atomic_write_json(Path(folder) / COSTS_FILE, self._costs.as_dict())

    def load_artifacts(self, folder) -> None:
        if self.longterm is not None:
            self.longterm.load(folder)
        if self.controller is not None and (Path(folder) / COSTS_FILE).exists():
            import json

            from hmst_bench_hmst.policy import Costs

            self._costs = Costs.from_dict(json.loads((Path(folder) / COSTS_FILE).read_text()))

    def extra_flops(self, batch) -> int:
        """A training step's FLOPs the counter cannot see: the memory's (see memory.py)."""
        if self.memory is None:
            return 0
        b, t = batch["input_ids"].shape
        return memory_extra_flops(self.config, b, t, backward=True)

    def num_active_params(self) -> int:
        """Parameters one token uses: everything except the (n_experts - top_k) experts of each
        MoE layer it is not routed to (a tied head is counted once)."""
        total = sum(p.numel() for p in self.parameters())
        idle = sum((m.n_experts - m.top_k) * m.params_per_expert() for m in self.modules() if isinstance(m, MoE))
        return total - idle

    # ------------------------------------------------------------------ the critic

    @property
    def hallucination_threshold(self) -> Optional[float]:
        """The critic's verification threshold, chosen on its validation split (None before)."""
        if self.critic is None or not math.isfinite(float(self.critic.threshold)):
            return None
        return float(self.critic.threshold)

    def hallucination_scores(self, prompts, answers) -> list[float]:
        """The critic's P(wrong) for each (prompt text, answer text), from `critic_features`."""
        if self.critic is None:
            raise NotImplementedError("this HMST run has no critic; train it with --stage critic")
        x = self.critic_features(prompts, answers)
        if not len(x):
            return []
        with torch.no_grad():
            return torch.sigmoid(self.critic(x.to(self.embed.weight)).float()).tolist()

    def critic_features(self, prompts, answers) -> torch.Tensor:
        """[B, F] critic inputs for each (prompt text, answer text), the answer read as the
        continuation the model generated after the prompt (a space, then the answer): from the
        pass that generated it when this process did (`critic.from_trace`), else from one pass
        over prompt + answer; `hallucination_stats` says how many of each."""
        from hmst_bench_hmst.critic import N_SCALARS, features

        tok = self.tokenizer
        ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
        conts = [tok.encode(" " + a.strip(), add_special_tokens=False) if a.strip() else [] for a in answers]
        rows = [self._traced.get((tuple(p[-TRACE_KEY:]), tuple(c))) for p, c in zip(ids, conts)]
        missing = [i for i, r in enumerate(rows) if r is None]
        for start in range(0, len(missing), 16):
            chunk = missing[start : start + 16]
            for i, x in zip(chunk, features(self, [ids[i] for i in chunk], [conts[i] for i in chunk])):
                rows[i] = x
        self.hallucination_stats = {"features_from_generation": len(rows) - len(missing), "features_recomputed": len(missing)}
        if not rows:
            return torch.zeros((0, self.config.d_model + N_SCALARS))
        return torch.stack([r.cpu() for r in rows]).float()

    def generate(self, input_ids, max_new_tokens, *, lengths=None, temperature=0.0, top_p=1.0, top_k=0, stop=None,
                 generators=None):
        """The shared batched generation; with a critic, greedy and without memory, the decoding
        calls are traced and each answer's critic features kept (see hallucination_scores)."""
        from hmst_bench.generation import Sampling, generate_rows, prompts_of

        if self.controller is not None and self.config.controller == "on":
            return self._controlled(input_ids, max_new_tokens, lengths, Sampling(temperature, top_p, top_k), stop,
                                    generators)
        if self.critic is None or temperature > 0 or self.memory is not None:
            return super().generate(input_ids, max_new_tokens, lengths=lengths, temperature=temperature, top_p=top_p,
                                    top_k=top_k, stop=stop, generators=generators)
        prompts = prompts_of(input_ids, lengths)
        self._tracing, self._last_state = True, None
        try:
            out = generate_rows(self, prompts, max_new_tokens, Sampling(temperature, top_p, top_k), stop, generators)
        finally:
            self._tracing = False
        trace = (self._last_state or {}).get("trace") or []
        self._last_state = None
        for b, (prompt, answer) in enumerate(zip(prompts, out)):
            self._keep_features(trace, b, prompt, answer)
        return out

    def _keep_features(self, trace: list, b: int, prompt: list, answer: list) -> None:
        """Keep row b's critic features for every prefix of its answer (the evaluator cuts
        answers at stop strings), found later by hallucination_scores."""
        from hmst_bench_hmst.critic import from_trace

        if len(prompt) + len(answer) > self.context_len or self.memory is not None or self.critic is None:
            return
        for n in range(len(answer) + 1):
            x = from_trace(trace, b, answer[:n], self.config.d_model)
            if x is not None:
                self._traced[(tuple(prompt[-TRACE_KEY:]), tuple(answer[:n]))] = x.cpu()
        while len(self._traced) > 100_000:
            self._traced.popitem(last=False)

    # ------------------------------------------------------------------ the meta-controller

    def costs(self):
        """The measured per-step cost table of the gates (`policy.measure_costs`), once per model."""
        from hmst_bench_hmst.policy import measure_costs

        if self._costs is None:
            self._costs = measure_costs(self)
        return self._costs

    def run_episode(self, prompt: list, max_new_tokens: int, sampling, stop, generator=None, mode: str = "greedy",
                    token_generator=None, verify: bool = True):
        """Answer one prompt (token ids) under the controller: (answer tokens, `policy.Episode`).
        `generator` draws the controller's choices (mode "sample"), `token_generator` the tokens."""
        from hmst_bench.generation import generate_rows
        from hmst_bench_hmst.policy import Episode

        episode = Episode(self, mode, generator, self.costs())
        self._episode = episode
        try:
            answer = generate_rows(self, [list(prompt)], max_new_tokens, sampling, stop,
                                   None if token_generator is None else [token_generator])[0]
        finally:
            self._episode = None
        self._keep_features(episode.trace, 0, list(prompt), answer)
        return episode.finish(list(prompt), answer, verify), episode

    def _controlled(self, input_ids, max_new_tokens, lengths, sampling, stop, generators) -> list[list[int]]:
        """Generation with the controller on: each row is an episode of its own (greedy decisions).
        Only greedy answers get the verification decision: sampled ones (self-consistency's) are
        the model's distribution, which a detector compares, not answers to withhold."""
        from hmst_bench.generation import prompts_of

        out = []
        for b, prompt in enumerate(prompts_of(input_ids, lengths)):
            answer, episode = self.run_episode(prompt, max_new_tokens, sampling, stop,
                                               token_generator=None if generators is None else generators[b],
                                               verify=sampling.temperature <= 0)
            self._count(episode)
            out.append(answer)
        return out

    def _count(self, episode) -> None:
        """Add an episode's decisions to the decoding statistics (take_decoding_stats)."""
        d = self._decoding
        d["answers"] = d.get("answers", 0) + 1
        d["token_decisions"] = d.get("token_decisions", 0) + len(episode.latency)
        d["latency_sum"] = d.get("latency_sum", 0.0) + sum(episode.latency)
        d["compute_sum"] = d.get("compute_sum", 0.0) + sum(episode.compute)
        d["verifiable"] = d.get("verifiable", 0) + int(("verify",) in episode.masks)  # had the decision
        d["verified"] = d.get("verified", 0) + int(episode.verified)
        d["abstained"] = d.get("abstained", 0) + int(episode.abstained)
        for choice in episode.choices:
            for gate, value in choice.items():
                key = f"{gate}={value}"
                d.setdefault("choices", {})[key] = d.get("choices", {}).get(key, 0) + 1

    def take_decoding_stats(self) -> dict:
        """What the controller decided since the last call: answers, token decisions, the rate of
        each gate's choices, how many answers had the verification decision (greedy ones) and
        the share of those the critic checked, the share of answers withheld, and the FLOPs per
        generated token from the cost table, relative to the full model's and absolute."""
        d, self._decoding = self._decoding, {}
        if not d:
            return {}
        n, full = max(1, d["token_decisions"]), self.costs().full_step
        per_gate: dict = {}
        for key, count in sorted(d.get("choices", {}).items()):
            gate, value = key.split("=")
            per_gate.setdefault(gate, {})[value] = count
        rates = {g: {v: c / sum(vals.values()) for v, c in vals.items()} for g, vals in per_gate.items()}
        return {"controller": "on", "answers": d["answers"], "token_decisions": d["token_decisions"],
                "gate_rates": rates, "verify_decisions": d["verifiable"],
                "verify_rate": d["verified"] / d["verifiable"] if d["verifiable"] else None,
                "abstained_by_controller": d["abstained"] / d["answers"],
                "latency": d["latency_sum"] / n if d["token_decisions"] else None,
                "compute": d["compute_sum"] / n if d["token_decisions"] else None,
                "flops_per_generated_token": full * d["latency_sum"] / n if d["token_decisions"] else None,
                "full_flops_per_generated_token": full}

    # ------------------------------------------------------------------ decoding

    def decode_step(self, new_tokens: torch.Tensor, state: Any, pad: Optional[torch.Tensor] = None,
                    ) -> tuple[torch.Tensor, dict]:
        """`_decode_step`; while a controlled row decodes (`run_episode`), its episode first picks
        the gates of each one-token step and then keeps what the call produced."""
        episode = self._episode
        if episode is not None and state is not None and new_tokens.shape[1] == 1:
            state = {**state, "gates": episode.decide(state, int(new_tokens[0, 0]))}
        logprobs, state = self._decode_step(new_tokens, state, pad)
        if episode is not None:
            episode.record(state, logprobs)
        return logprobs, state

    def _decode_step(self, new_tokens: torch.Tensor, state: Any, pad: Optional[torch.Tensor] = None,
                     ) -> tuple[torch.Tensor, dict]:
        """Exact KV-cached step: each layer keeps the keys and values of the columns seen so far;
        without memory, the prefill's left padding is masked and not counted as positions.
        A one-token step computes what `state["gates"]` (a `Gates`, set by the caller between
        steps; default the full model) asks for; `state["last_hidden"]` [B, d] is the final
        hidden state the returned log-probs came from (what the meta-controller reads)."""
        if self.memory is not None:
            if pad is not None and bool(pad.any()):
                raise ValueError("HMST with memory decodes unpadded rows only (kv_cache_pads is False)")
            return self._memory_step(new_tokens, state)
        if state is None:
            state = {"caches": new_caches(len(self.layers), pad), "col": 0, "pad": pad, "exited_at": []}
        t = new_tokens.shape[1]
        gates = state.get("gates", FULL)
        if t == 1 and (self.config.exit_margin > 0 or gates != FULL):
            logits, depth, last = self._step_with_exits(new_tokens, state, gates)
        else:
            h, logits, _ = self.forward_all(new_tokens, slice(t - 1, t), state["col"], state["caches"], pad=state["pad"])
            depth, last = None, h[:, -1]
        state = {**state, "col": state["col"] + t, "last_hidden": last,
                 "exited_at": state["exited_at"] + ([depth or len(self.layers)] if t == 1 else [])}
        logprobs = torch.log_softmax(logits[:, -1].float(), dim=-1)
        if self._tracing:  # generate() with a critic: keep what the critic reads
            state["trace"] = state.get("trace", []) + [(last.detach(), logprobs)]
            self._last_state = state
        return logprobs, state

    def _step_with_exits(self, token: torch.Tensor, state: dict, gates: Gates = FULL) -> tuple[torch.Tensor, Optional[int], torch.Tensor]:
        """One cached decoding step under the exit rule (CALM) or the gates: the step ends after
        block `gates.exit` when it is set; otherwise, with `exit_margin` > 0, after each exit
        block the shared head scores the token and once every row's top-1 minus top-2
        probability reaches the margin the step ends there. Each skipped layer's cache gets keys
        and values computed from the exited hidden state (`Attention.append_kv`), so later
        tokens attend to a state at every layer. Returns (logits [B, 1, V], the exit's block
        count or None, the normed hidden state the logits came from [B, d])."""
        if gates.exit is not None and gates.exit not in self.config.exits:
            raise ValueError(f"exit gate {gates.exit} is not one of the model's exits {self.config.exits}")
        cos, sin = rope_at(self.rope_cos, self.rope_sin, state["col"], 1, state["pad"])
        h = self.embed(token)
        for i, layer in enumerate(self.layers):
            h, _ = layer(h, cos, sin, state["caches"][i], gates.top_k)
            if i + 1 == gates.exit or (gates.exit is None and self.config.exit_margin > 0 and i + 1 in self.config.exits):
                logits = self.exit_logits(h)
                top = torch.softmax(logits[:, -1].float(), dim=-1).topk(2, dim=-1).values
                if i + 1 == gates.exit or bool(((top[:, 0] - top[:, 1]) >= self.config.exit_margin).all()):
                    for j in range(i + 1, len(self.layers)):
                        self.layers[j].attn.append_kv(self.layers[j].attn_norm(h), cos, sin, state["caches"][j])
                    return logits, i + 1, self.norm(h)[:, -1]
        h = self.norm(h)
        return self.project(h), None, h[:, -1]

    def _memory_step(self, tokens: torch.Tensor, state: Optional[dict]) -> tuple[torch.Tensor, dict]:
        """Decoding with memory: the current segment's KV cache; a full segment is written to
        the memory (from the hidden states kept for it) before the next token starts a new one."""
        if state is None:
            state = {"mem": self.new_memory(tokens.shape[0]), "caches": [{} for _ in self.layers],
                     "hidden": [], "segment_start": 0, "pos": 0}
        else:
            state = dict(state)
        if state.get("gates", FULL).exit is not None:
            raise ValueError("an exit gate needs a model without memory (early exit is not built with memory)")
        w, pos, logits = self.max_seq_len, state["pos"], None
        while tokens.shape[1]:
            if pos - state["segment_start"] == w:
                state["mem"].write(torch.cat(state["hidden"], dim=1))
                state.update(caches=[{} for _ in self.layers], hidden=[], segment_start=pos)
            take = min(tokens.shape[1], w - (pos - state["segment_start"]))
            h, logits, _ = self.forward_all(tokens[:, :take], slice(take - 1, take), pos - state["segment_start"],
                                            state["caches"], state["mem"], gates=state.get("gates", FULL))
            state["hidden"] = state["hidden"] + [h]
            state["last_hidden"] = h[:, -1]
            pos += take
            tokens = tokens[:, take:]
        state["pos"] = pos
        return torch.log_softmax(logits[:, -1].float(), dim=-1), state
