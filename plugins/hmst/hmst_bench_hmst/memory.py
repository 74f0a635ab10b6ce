"""HMST's memory beyond the attention window: the episodic tier (a selective SSM), the semantic
tier (a FAISS store) and the gated reader that brings both into the model.

A text longer than the window W is read in segments of W tokens, aligned from its first token;
attention (with its KV cache) sees only the current segment. After a segment, its final hidden
states are written to the document's memory (`DocMemory.write`):

1. one projection (`MemoryModules.write`, d_model -> memory_dim) for every input shape, so what
   is written and what is later read are keyed identically;
2. the episodic SSM (`ssm.SelectiveSSM`, state carried across segments, parallel scan) runs over
   the projected segment; its outputs at every `memory_chunk`-th position are the segment's
   episodic entries: summaries of the text that is leaving the window. Entry j of a document
   has the stable id j (its ordinal), the same in every row;
3. the episodic buffer keeps the newest `episodic_slots` entries. Entries pushed out of it are
   consolidated: in each row, the `consolidate_fraction` of them that the reader attended to
   most while they were in the buffer (their usage) are added to that row's semantic store
   (`semantic.SemanticStore`, dimension memory_dim) by id; the rest are forgotten.

Reading (`MemoryReader`, after block `memory_layer`): each token's query q = W_q(RMSNorm(h))
(memory_dim wide, the store's dimension, checked at every search) attends over the episodic
buffer and over its own top-`semantic_top_k` entries of the semantic store, found by FAISS with
the same inner product the attention scores use (retrieval = approximate top-k attention, as in
Memorizing Transformers). The retrieved ids index the document's entry bank, so gradients flow
through retrieved values into the write path; the selection itself is not differentiable. The
result enters the residual stream as tanh(gate) * W_o(attention output), with gate = 0 at
initialisation: a model whose memory is new behaves exactly like the plain MoE LM, and stage 2
learns to open the gate. Everything in the memory comes from earlier segments, so the model stays
causal.

FLOPs: the budget meter counts the projections and attention einsums itself; `memory_extra_flops`
adds what it cannot see (the SSM's elementwise work and FAISS's distance computations, 2 * dim
per query per stored entry for a flat index), from the shapes alone: every row of a batch writes
and consolidates the same number of entries, so the count is the same for every step.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from hmst_bench.modeling import RMSNorm
from hmst_bench_hmst.semantic import SemanticStore
from hmst_bench_hmst.ssm import SelectiveSSM, extra_flops_of


class MemoryReader(nn.Module):
    """Gated retrieval attention over the episodic buffer and the semantic top-k of each token."""

    def __init__(self, d_model: int, memory_dim: int, eps: float, init_std: float):
        super().__init__()
        self.norm = RMSNorm(d_model, eps)
        self.query = nn.Linear(d_model, memory_dim, bias=False)
        self.out = nn.Linear(memory_dim, d_model, bias=False)
        self.gate = nn.Parameter(torch.zeros(1))  # tanh(0) = 0: new memory changes nothing
        nn.init.normal_(self.query.weight, std=init_std)
        nn.init.normal_(self.out.weight, std=init_std)

    def forward(self, h: torch.Tensor, mem: "DocMemory") -> torch.Tensor:
        """The residual update for h [B, t, d] from `mem` (which records the buffer's usage)."""
        q = self.query(self.norm(h))  # [B, t, m]
        scale = 1.0 / math.sqrt(q.shape[-1])
        parts, values = [], []
        if mem.buffer is not None:
            buf = mem.buffer.to(q.dtype)  # [B, E, m]
            parts.append(torch.einsum("btm,bem->bte", q, buf) * scale)
            values.append(("episodic", buf))
        sem = mem.retrieve(q)  # [B, t, k, m] or None
        if sem is not None:
            sem = sem.to(q.dtype)
            parts.append(torch.einsum("btm,btkm->btk", q, sem) * scale)
            values.append(("semantic", sem))
        weights = torch.softmax(torch.cat(parts, dim=-1).float(), dim=-1).to(q.dtype)
        read, at = 0, 0
        for kind, v in values:
            n = v.shape[-2]
            w = weights[..., at : at + n]
            if kind == "episodic":
                read = read + torch.einsum("bte,bem->btm", w, v)
                mem.usage = mem.usage + w.detach().float().sum(dim=1)
            else:
                read = read + torch.einsum("btk,btkm->btm", w, v)
            at += n
        return torch.tanh(self.gate).to(h.dtype) * self.out(read)


class MemoryModules(nn.Module):
    """The memory's parameters: write projection, episodic SSM, reader."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.write = nn.Linear(config.d_model, config.memory_dim, bias=False)
        nn.init.normal_(self.write.weight, std=config.init_std)
        self.ssm = SelectiveSSM(config.memory_dim, d_state=config.memory_state)
        self.reader = MemoryReader(config.d_model, config.memory_dim, config.rms_norm_eps, config.init_std)

    def new_memory(self, batch: int) -> "DocMemory":
        return DocMemory(self, batch)


class DocMemory:
    """The memory of one batch of documents while they are read (rows are independent)."""

    def __init__(self, modules: MemoryModules, batch: int):
        c = modules.config
        self.modules = modules
        self.batch = batch
        self.dim = c.memory_dim
        self.chunk = c.memory_chunk
        self.slots = c.episodic_slots
        self.top_k = c.semantic_top_k
        self.fraction = c.consolidate_fraction
        self.state: Optional[torch.Tensor] = None  # SSM state [B, m, N]
        self.buffer: Optional[torch.Tensor] = None  # episodic entries [B, n <= slots, m] (with graph)
        self.buffer_ids: list[int] = []  # their stable ids (oldest first)
        self.usage: Optional[torch.Tensor] = None  # [B, n] attention mass each buffer entry received
        self.bank: list[torch.Tensor] = []  # every entry written, [B, P, m] per segment (ids in order)
        self.stores = [SemanticStore(self.dim, metric="ip") for _ in range(batch)]
        self.n_entries = 0
        self.segments = 0
        self.search_flops = 0  # FAISS distance FLOPs actually spent (what memory_extra_flops predicts)

    # ------------------------------------------------------------------ writing

    def write(self, h: torch.Tensor) -> None:
        """Write a finished segment's final hidden states h [B, L, d] (L a multiple of the chunk)."""
        if h.shape[1] % self.chunk:
            raise ValueError(f"a written segment has {h.shape[1]} tokens, not a multiple of memory_chunk={self.chunk}")
        x = self.modules.write(h)
        y, self.state = self.modules.ssm(x, state0=self.state, return_state=True)
        entries = y[:, self.chunk - 1 :: self.chunk]  # [B, P, m]
        ids = list(range(self.n_entries, self.n_entries + entries.shape[1]))
        self.n_entries += entries.shape[1]
        self.segments += 1
        self.bank.append(entries)
        zeros = torch.zeros(self.batch, entries.shape[1], device=entries.device)
        if self.buffer is None:
            self.buffer, self.usage, self.buffer_ids = entries, zeros, ids
        else:
            self.buffer = torch.cat([self.buffer, entries], dim=1)
            self.usage = torch.cat([self.usage, zeros], dim=1)
            self.buffer_ids = self.buffer_ids + ids
        over = len(self.buffer_ids) - self.slots
        if over > 0:
            self._consolidate(over)

    def _consolidate(self, n: int) -> None:
        """Move the n oldest buffer entries out; the most used `fraction` of them (per row) go to
        the row's semantic store under their stable ids."""
        old, old_ids, old_usage = self.buffer[:, :n], self.buffer_ids[:n], self.usage[:, :n]
        self.buffer, self.buffer_ids, self.usage = self.buffer[:, n:], self.buffer_ids[n:], self.usage[:, n:]
        keep = consolidated_count(n, self.fraction)
        if keep == 0:
            return
        order = torch.argsort(-old_usage, dim=1, stable=True)[:, :keep].cpu()  # ties: the older entry
        vectors = old.detach().float().cpu()
        usage = old_usage.cpu()
        per_segment = self.modules.config.max_seq_len // self.chunk
        for b, store in enumerate(self.stores):
            rows = order[b].tolist()
            store.add(vectors[b, rows], [old_ids[r] for r in rows],
                      [{"segment": old_ids[r] // per_segment, "usage": round(float(usage[b, r]), 6)} for r in rows])

    # ------------------------------------------------------------------ reading

    def retrieve(self, q: torch.Tensor) -> Optional[torch.Tensor]:
        """Each query's top-k semantic entries [B, t, k, m] (None while the stores are empty),
        gathered from the entry bank by the ids FAISS returns."""
        size = len(self.stores[0])
        if size == 0:
            return None
        if q.shape[-1] != self.dim:
            raise ValueError(f"the query has dimension {q.shape[-1]}, the semantic store {self.dim}")
        k = min(self.top_k, size)
        bank = torch.cat(self.bank, dim=1)  # [B, n_entries, m]
        queries = q.detach().float().cpu()
        picked = []
        for b, store in enumerate(self.stores):
            _, ids, _ = store.search(queries[b], k)
            self.search_flops += 2 * queries.shape[1] * len(store) * self.dim
            picked.append(bank[b, torch.from_numpy(ids).to(bank.device)])  # [t, k, m]
        return torch.stack(picked)

    @property
    def empty(self) -> bool:
        return self.buffer is None


def consolidated_count(evicted: int, fraction: float) -> int:
    return int(math.ceil(evicted * fraction - 1e-9))


def store_sizes(segments: int, segment_len: int, config) -> list[int]:
    """Semantic store size (per row) seen by the reads of segments 1 .. segments-1 of a text of
    `segments` segments of `segment_len` tokens (the last one may be shorter; it is never written)."""
    per = segment_len // config.memory_chunk
    buffered, stored, sizes = 0, 0, []
    for _ in range(segments - 1):
        buffered += per
        if buffered > config.episodic_slots:
            stored += consolidated_count(buffered - config.episodic_slots, config.consolidate_fraction)
            buffered = config.episodic_slots
        sizes.append(stored)
    return sizes


def memory_extra_flops(config, batch: int, length: int, backward: bool) -> int:
    """FLOPs of reading a [batch, length] text with memory that the counter cannot see: the
    episodic SSM's elementwise work for each written segment and the FAISS searches of each
    later segment (flat index: 2 * memory_dim per query per stored entry; forward only)."""
    w = config.max_seq_len
    if length <= w:
        return 0
    segments = -(-length // w)
    total = 0
    for s in range(segments - 1):  # every segment but the last is written
        total += extra_flops_of(batch, w, config.memory_dim, config.memory_state, backward=backward, with_state0=s > 0)
    for s, size in enumerate(store_sizes(segments, w, config), start=1):
        queries = min(w, length - s * w)
        total += 2 * batch * queries * size * config.memory_dim
    return total
