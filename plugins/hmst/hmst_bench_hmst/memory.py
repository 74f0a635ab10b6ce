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
3. the episodic buffer keeps the newest `episodic_capacity` entries (one window's by default). Entries pushed out of it are
   consolidated: in each row, the `consolidate_fraction` of them that the reader attended to
   most while they were in the buffer (their usage) are added to that row's semantic store
   (`semantic.SemanticStore`, dimension memory_dim) by id; the rest are forgotten.

4. across documents: what stage 2's training documents consolidated also goes, after each
   optimiser step, into the run's long-term store (`LongTermMemory`), saved with the run.

Reading (`MemoryReader`, after block `memory_layer`): each token's query q = W_q(RMSNorm(h))
(memory_dim wide, the stores' dimension, checked at every search) attends over the episodic
buffer, over its own top-`semantic_top_k` entries of the document's semantic store and over its
top-`semantic_top_k` of the long-term store, found by FAISS with the same inner product the
attention scores use (retrieval = approximate top-k attention, as in Memorizing Transformers). The retrieved ids index the document's entry bank, so gradients flow
through retrieved values into the write path; the selection itself is not differentiable. The
result enters the residual stream as tanh(gate) * W_o(attention output), with gate = 0 at
initialisation: a model whose memory is new behaves exactly like the plain MoE LM, and stage 2
learns to open the gate. Everything in the memory comes from earlier segments, so the model stays
causal.

FLOPs: the budget meter counts the projections and attention einsums itself; `memory_extra_flops`
adds what it cannot see of a document's own memory (the SSM's elementwise work and FAISS's
distance computations, 2 * dim per query per stored entry for a flat index), from the shapes
alone: every row of a batch writes and consolidates the same number of entries, so the count is
the same for every step. The long-term store's searches grow with it; `DocMemory.longterm_flops`
measures them (FAISS's distance counts) and the stage-2 runner charges them step by step.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from pathlib import Path
from typing import Optional

import numpy as np
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

    def forward(self, h: torch.Tensor, mem: "DocMemory", episodic: bool = True, semantic: bool = True) -> torch.Tensor:
        """The residual update for h [B, t, d] from `mem` (which records the buffer's usage);
        `episodic` / `semantic` False skip that tier's read (the meta-controller's gates); with
        both skipped, or nothing to read, the update is 0 and nothing is computed."""
        if not episodic and not semantic:
            return torch.zeros_like(h)
        q = self.query(self.norm(h))  # [B, t, m]
        scale = 1.0 / math.sqrt(q.shape[-1])
        parts, values = [], []  # per group: attention logits [B, t, n] and entries
        if mem.buffer is not None and episodic:
            buf = mem.buffer.to(q.dtype)  # [B, E, m]
            parts.append(torch.einsum("btm,bem->bte", q, buf) * scale)
            values.append(("episodic", buf))
        best = None  # each query's best semantic hit, for the critic (DocMemory.hit_log)
        for sem in (mem.retrieve(q), mem.retrieve_longterm(q)) if semantic else ():  # [B, t, k, m] or None
            if sem is not None:
                sem = sem.to(q.dtype)
                parts.append(torch.einsum("btm,btkm->btk", q, sem) * scale)
                values.append(("semantic", sem))
                top = parts[-1].detach().float().amax(dim=-1)
                best = top if best is None else torch.maximum(best, top)
        if mem.hit_log is not None:
            mem.hit_log.append(best)
        if not parts:
            return torch.zeros_like(h)
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

    def new_memory(self, batch: int, longterm: Optional["LongTermMemory"] = None) -> "DocMemory":
        return DocMemory(self, batch, longterm)


class DocMemory:
    """The memory of one batch of documents while they are read (rows are independent)."""

    def __init__(self, modules: MemoryModules, batch: int, longterm: Optional["LongTermMemory"] = None):
        c = modules.config
        self.modules = modules
        self.longterm = longterm if longterm is not None and len(longterm) else None  # read-only here
        self.batch = batch
        self.dim = c.memory_dim
        self.chunk = c.memory_chunk
        self.slots = c.episodic_capacity
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
        self.longterm_flops = 0  # FAISS distance FLOPs of the long-term store's searches
        self.hit_log: Optional[list] = None  # a list: each read appends its best semantic hits [B, t] (or None)
        self.consolidated: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # per write: ids [B, n], vectors [B, n, m], usage [B, n]
        self.shared_stores = False  # set by `rows_for_reading`: the stores may not be written

    def rows_for_reading(self, rows: list[int]) -> "DocMemory":
        """A memory whose row r is this one's row rows[r] (the continuations of each context),
        to be read but not written: tensors indexed, semantic stores shared between the rows
        that copy one row, which is safe because only a write changes a store."""
        clone = copy.copy(self)
        clone.batch, clone.shared_stores, clone.consolidated = len(rows), True, []
        clone.stores = [self.stores[i] for i in rows]
        index = torch.tensor(rows, dtype=torch.long)
        pick = lambda t: None if t is None else t.index_select(0, index.to(t.device))  # noqa: E731
        clone.state, clone.buffer, clone.usage = pick(self.state), pick(self.buffer), pick(self.usage)
        clone.bank = [pick(b) for b in self.bank]
        return clone

    # ------------------------------------------------------------------ writing

    def write(self, h: torch.Tensor) -> None:
        """Write a finished segment's final hidden states h [B, L, d] (L a multiple of the chunk)."""
        if self.shared_stores:
            raise RuntimeError("this memory shares its semantic store between rows (rows_for_reading): it cannot be written")
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
        picked_ids, picked_vecs, picked_usage = [], [], []
        for b, store in enumerate(self.stores):
            rows = order[b].tolist()
            store.add(vectors[b, rows], [old_ids[r] for r in rows],
                      [{"segment": old_ids[r] // per_segment, "usage": round(float(usage[b, r]), 6)} for r in rows])
            picked_ids.append([old_ids[r] for r in rows])
            picked_vecs.append(vectors[b, rows].numpy())
            picked_usage.append(usage[b, rows].numpy())
        self.consolidated.append((np.asarray(picked_ids, dtype=np.int64), np.stack(picked_vecs), np.stack(picked_usage)))

    def consolidated_entries(self) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Everything this batch consolidated: (entry ids [B, n], vectors [B, n, m], usage [B, n]),
        the same n for every row; None if nothing was."""
        if not self.consolidated:
            return None
        return tuple(np.concatenate(parts, axis=1) for parts in zip(*self.consolidated))

    # ------------------------------------------------------------------ reading

    def retrieve(self, q: torch.Tensor) -> Optional[torch.Tensor]:
        """Each query's top-k entries of its document's semantic store [B, t, k, m] (None while
        the stores are empty), gathered from the entry bank by the ids FAISS returns."""
        if q.shape[-1] != self.dim:
            raise ValueError(f"the query has dimension {q.shape[-1]}, the semantic store {self.dim}")
        size = len(self.stores[0])
        if size == 0:
            return None
        k = min(self.top_k, size)
        bank = torch.cat(self.bank, dim=1)  # [B, n_entries, m]
        queries = q.detach().float().cpu()
        picked = []
        for b, store in enumerate(self.stores):
            _, ids, _ = store.search(queries[b], k, with_metadata=False)
            self.search_flops += 2 * store.last_distances * self.dim
            # index_select, not bank[b, ids]: its backward (index_add) sums repeated ids in a
            # fixed order, where advanced indexing's accumulate is not deterministic on CPU
            rows = torch.from_numpy(ids).to(bank.device).reshape(-1)
            picked.append(bank[b].index_select(0, rows).reshape(*ids.shape, -1))  # [t, k, m]
        return torch.stack(picked)

    def retrieve_longterm(self, q: torch.Tensor) -> Optional[torch.Tensor]:
        """Each query's top-k entries of the run's long-term store [B, t, k, m] (constants: they
        were written by earlier documents), or None when there is no long-term store."""
        if self.longterm is None:
            return None
        if q.shape[-1] != self.longterm.store.dim:
            raise ValueError(f"the query has dimension {q.shape[-1]}, the long-term store {self.longterm.store.dim}")
        b, t, m = q.shape
        vecs, distances = self.longterm.lookup(q.detach().float().cpu().reshape(b * t, m), self.top_k)
        self.longterm_flops += 2 * distances * m
        return torch.from_numpy(vecs).to(device=q.device, dtype=q.dtype).reshape(b, t, -1, m)

    @property
    def readable(self) -> bool:
        """Whether a read would find anything: episodic entries, or a long-term store."""
        return self.buffer is not None or self.longterm is not None


def consolidated_count(evicted: int, fraction: float) -> int:
    return int(math.ceil(evicted * fraction - 1e-9))


def store_sizes(segments: int, segment_len: int, config) -> list[int]:
    """Semantic store size (per row) seen by the reads of segments 1 .. segments-1 of a text of
    `segments` segments of `segment_len` tokens (the last one may be shorter; it is never written)."""
    per = segment_len // config.memory_chunk
    buffered, stored, sizes = 0, 0, []
    for _ in range(segments - 1):
        buffered += per
        if buffered > config.episodic_capacity:
            stored += consolidated_count(buffered - config.episodic_capacity, config.consolidate_fraction)
            buffered = config.episodic_capacity
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


class LongTermMemory:
    """The run's long-term semantic store: what stage 2's training documents consolidated.

    After each training step the stage-2 runner hands it the entries every document of the step
    consolidated into its own store (`add_step`), under stable ids that name their origin:
    id = (step * rows_per_step + global row) * entries_per_document + entry. Past `capacity`
    entries the oldest (smallest ids) are removed. Every text read afterwards (later training
    steps, validation, evaluation) retrieves from it as well, through the same reader; its
    vectors are constants (no gradient reaches the documents that wrote them). It is saved with
    every checkpoint and with the run's files (`save`/`load`, atomic), so `--resume` and
    `load_run` get it back; the index is flat up to 100k entries, then HNSW.
    """

    DIR = "semantic"

    def __init__(self, config):
        self.capacity = config.longterm_capacity
        self.per_document = config.memory_segments * config.max_seq_len // config.memory_chunk
        self.store = SemanticStore(config.memory_dim, metric="ip")
        self._order: deque[int] = deque()  # ids, oldest first

    def __len__(self) -> int:
        return len(self.store)

    def add_step(self, step: int, rows_per_step: int, entry_ids: np.ndarray, vectors: np.ndarray,
                 usage: np.ndarray) -> int:
        """Add what the step's documents consolidated: global row r (all ranks, in rank order) gave
        `entry_ids[r]`, `vectors[r]`, `usage[r]`. Returns how many entries were added."""
        rows, n = entry_ids.shape
        if rows * n == 0:
            return 0
        row = np.arange(rows, dtype=np.int64)[:, None]
        ids = (step * rows_per_step + row) * self.per_document + entry_ids
        meta = [{"step": step, "row": int(r), "entry": int(e), "usage": round(float(u), 6)}
                for r, e_row, u_row in zip(range(rows), entry_ids.tolist(), usage.tolist()) for e, u in zip(e_row, u_row)]
        self.store.add(vectors.reshape(rows * n, -1).astype(np.float32), ids.reshape(-1), meta)
        self._order.extend(ids.reshape(-1).tolist())
        over = len(self.store) - self.capacity
        if over > 0:  # ids grow with the step: the oldest go first
            self.store.remove([self._order.popleft() for _ in range(over)])
        return rows * n

    def lookup(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, int]:
        """(top-k vectors per query [q, k, m], distances computed); k is at most the store's
        size. A result an approximate (HNSW) search could not fill repeats the query's best one."""
        k = min(k, len(self.store))
        _, ids, _ = self.store.search(queries, k, with_metadata=False)
        missing = ids < 0
        if missing.any():
            ids = np.where(missing, ids[:, :1], ids)
        return self.store.vectors(ids.reshape(-1)).reshape(len(queries), k, -1), self.store.last_distances

    def save(self, folder) -> None:
        self.store.save(Path(folder) / self.DIR)

    def load(self, folder) -> bool:
        """Read the store saved in `folder`, if there is one (a stage-1 run has none)."""
        path = Path(folder) / self.DIR
        if not (path / "config.json").exists() and not (path.with_name(f".{self.DIR}.old") / "config.json").exists():
            return False
        self.store = SemanticStore.load(path, dim=self.store.dim)
        self._order = deque(self.store.ids())
        return True
