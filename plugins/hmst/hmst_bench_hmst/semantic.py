"""HMST's semantic memory: a FAISS vector store keyed by our own stable int64 ids.

`SemanticStore` holds vectors of exactly the model's projected query dimension, a metadata dict
keyed by id, and a FAISS index whose type follows the store's size:

* ``index="auto"`` (default): exact ``IndexFlatIP``/``IndexFlatL2`` while the store holds at most
  ``flat_limit`` entries; the add that crosses the limit rebuilds it into ``large`` ("hnsw":
  ``IndexHNSWFlat`` with ``hnsw_m`` links, or "ivfpq": ``IndexIVFPQ`` trained on the stored
  vectors). The store never goes back to flat when it shrinks (no rebuild thrash).
* ``index="flat" | "hnsw" | "ivfpq"`` forces one type. A forced "ivfpq" store is trained on its
  first add, which must hold at least ``max(nlist, 2**nbits)`` vectors.

Ids. FAISS works on *labels*: internal int64 numbers given out in insertion order. A label is
turned into our id by one array lookup (``label_to_id[label]``), and our id into its label by one
dict lookup, so ids and metadata for the k results of a query cost O(k) — nothing is ever found by
scanning entries or comparing vectors/dicts. Internal labels (rather than putting our ids into an
``IndexIDMap2``) are what let HNSW support upsert: HNSW cannot ``remove_ids``, so a removed or
replaced entry's *label* becomes a tombstone (``label_to_id[label] = -1``) that search excludes
with a FAISS ``IDSelector`` inside the search itself (k live results still come back), while the
new vector of an upserted id gets a fresh label. Flat indexes use the same tombstones (their
``remove_ids`` would shift positions). When tombstones exceed ``compact_fraction`` of the index,
or on a type rebuild, the index is rebuilt from the live vectors (exact: flat and HNSW-flat keep
the raw vectors) and labels are renumbered. IVF-PQ entries carry explicit labels and are removed
for real (``remove_ids``), so it has no tombstones; it never needs to reconstruct its (lossy)
vectors.

Semantics: ``add`` is an upsert — an id already present gets its vector *and* metadata replaced
(metadata ``None`` clears it); ids repeated inside one batch are an error. ``remove`` ignores
unknown ids and returns how many it removed. ``search`` returns ``(scores, ids, metadata)``:
scores are FAISS's (inner product, higher is better, for "ip"; *squared* L2 distance, lower is
better, for "l2"); missing results (fewer than k live entries) have id -1, metadata None and the
worst score (-inf for ip, +inf for l2). ``normalize=True`` L2-normalises vectors and queries, so
"ip" becomes cosine similarity. Metadata values must be JSON-serialisable; they are kept as given
(not copied) and come back from ``load`` through JSON (tuples as lists, dict keys as strings).
Costs: removal from a flat/HNSW index is O(1) per id plus the amortised compaction; IVF-PQ
``remove_ids`` scans the inverted lists (O(n) per call, batch your removals). The store is not
thread-safe; callers serialise access.

Persistence: ``save(dir)`` writes ``index.faiss`` (``faiss.write_index``), ``labels.npy``,
``metadata.json`` and ``config.json`` into a fresh temporary folder that replaces ``dir`` through
``hmst_bench.util.atomic_dir``, so a crash leaves the old store or the new one, never a mix;
``SemanticStore.load(dir, dim=...)`` restores it (same search results) and refuses, in one line, a
store whose recorded dimension is not the expected one.

Recall is a knob: measured on uniform random unit vectors in 64 dims (the hard case, no structure;
2 shared CPU cores), HNSW (M=32, efConstruction=40) recall@5 against exact search was 0.53 / 0.72 /
0.90 / 0.98 at efSearch 64 / 128 / 256 / 512 for 200k entries (0.25 / 0.40 / 0.72 / 1.35 ms a
query), and 0.30 at efSearch 64 for 1M. Raise ``ef_search`` (store-wide or per ``search`` call)
for such data; real embeddings usually need less.

``benchmark()`` measures a large build (time, query latency, recall against exact search, resident
memory) and returns one dict; it is meant to be called by a benchmarks/ script, not by tests.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import faiss
import numpy as np

from hmst_bench.util import atomic_dir

FORMAT_VERSION = 1
KINDS = ("auto", "flat", "hnsw", "ivfpq")
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
_ADD_CHUNK = 65_536  # add to FAISS in chunks so a rebuild never makes a second full copy at once


def _check_pos_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class SemanticStore:
    """A FAISS store of `dim`-wide vectors with stable int64 ids and JSON metadata (see module doc)."""

    def __init__(
        self,
        dim: int,
        metric: str = "ip",
        index: str = "auto",
        flat_limit: int = 100_000,
        large: str = "hnsw",
        hnsw_m: int = 32,
        ef_construction: int = 40,
        ef_search: int = 64,
        nlist: int = 1024,
        pq_m: int = 8,
        nbits: int = 8,
        nprobe: int = 16,
        compact_fraction: float = 0.25,
        normalize: bool = False,
        seed: int = 0,
    ) -> None:
        self.dim = _check_pos_int("dim", dim)
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
        if index not in KINDS:
            raise ValueError(f"index must be one of {KINDS}, got {index!r}")
        if large not in ("hnsw", "ivfpq"):
            raise ValueError(f"large must be 'hnsw' or 'ivfpq', got {large!r}")
        for name, value in (("flat_limit", flat_limit), ("hnsw_m", hnsw_m),
                            ("ef_construction", ef_construction), ("ef_search", ef_search),
                            ("nlist", nlist), ("pq_m", pq_m), ("nbits", nbits), ("nprobe", nprobe)):
            _check_pos_int(name, value)
        if not 0.0 < compact_fraction <= 1.0:
            raise ValueError(f"compact_fraction must be in (0, 1], got {compact_fraction!r}")
        uses_pq = index == "ivfpq" or (index == "auto" and large == "ivfpq")
        if uses_pq and dim % pq_m:
            raise ValueError(f"pq_m={pq_m} must divide dim={dim} for an IVF-PQ index")
        if uses_pq and nbits > 16:
            raise ValueError(f"nbits must be at most 16, got {nbits}")
        if index == "auto" and large == "ivfpq" and flat_limit + 1 < max(nlist, 2 ** nbits):
            raise ValueError(f"flat_limit={flat_limit} is too small to train IVF-PQ when crossed: it needs "
                             f"at least max(nlist, 2**nbits) = {max(nlist, 2 ** nbits)} vectors")
        self.params = dict(
            dim=self.dim, metric=metric, index=index, flat_limit=int(flat_limit), large=large,
            hnsw_m=int(hnsw_m), ef_construction=int(ef_construction), ef_search=int(ef_search),
            nlist=int(nlist), pq_m=int(pq_m), nbits=int(nbits), nprobe=int(nprobe),
            compact_fraction=float(compact_fraction), normalize=bool(normalize), seed=int(seed),
        )
        self.metric = metric
        self._faiss_metric = METRICS[metric]
        self._label_to_id = np.empty(0, dtype=np.int64)  # capacity-grown; valid up to _n_labels
        self._n_labels = 0
        self._id_to_label: dict[int, int] = {}
        self._meta: dict[int, Any] = {}
        self._dead = 0  # tombstoned labels still inside a flat/HNSW index
        self._selector: Any = None  # cached (IDSelectorNot, IDSelectorBatch) excluding tombstones
        self.last_distances = 0  # vector distances computed by the last search
        if index == "ivfpq":
            self.kind, self._index = "ivfpq", None  # trained on the first add
        else:
            self.kind = "flat" if index in ("auto", "flat") else index
            self._index = self._new_index(self.kind)

    # ------------------------------------------------------------------ inputs

    def _as_matrix(self, x: Any, what: str) -> np.ndarray:
        if hasattr(x, "detach"):  # a torch tensor
            x = x.detach().cpu().numpy()
        x = np.asarray(x)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2:
            raise ValueError(f"{what}: expected a [n, {self.dim}] array, got shape {tuple(x.shape)}")
        if x.shape[1] != self.dim:
            raise ValueError(f"{what}: vector dimension {x.shape[1]} does not match the store's dim {self.dim}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise ValueError(f"{what}: vectors contain NaN or inf")
        if self.params["normalize"]:
            x = x.copy()
            faiss.normalize_L2(x)
        return x

    # ------------------------------------------------------------------ index construction

    def _new_index(self, kind: str, train: np.ndarray | None = None) -> Any:
        d, metric, p = self.dim, self._faiss_metric, self.params
        if kind == "flat":
            return faiss.IndexFlatIP(d) if self.metric == "ip" else faiss.IndexFlatL2(d)
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, p["hnsw_m"], metric)
            index.hnsw.efConstruction = p["ef_construction"]
            index.hnsw.efSearch = p["ef_search"]
            return index
        # ivfpq: trained on (a sample of) the vectors it is built from
        assert train is not None
        n = len(train)
        need = max(p["nlist"], 2 ** p["nbits"])
        if n < need:
            raise ValueError(f"IVF-PQ needs at least max(nlist, 2**nbits) = {need} vectors to train, got {n}")
        quantizer = faiss.IndexFlatIP(d) if self.metric == "ip" else faiss.IndexFlatL2(d)
        index = faiss.IndexIVFPQ(quantizer, d, p["nlist"], p["pq_m"], p["nbits"], metric)
        max_train = max(p["nlist"], 2 ** p["nbits"]) * 64
        if n > max_train:
            rng = np.random.default_rng(p["seed"])
            train = train[np.sort(rng.choice(n, max_train, replace=False))]
        index.train(np.ascontiguousarray(train))
        index.nprobe = p["nprobe"]
        return index

    def _live(self) -> tuple[np.ndarray, np.ndarray]:
        """Live vectors and their ids, in label order (flat/HNSW only: exact reconstruction)."""
        if self._index is None or self._n_labels == 0:
            return np.empty((0, self.dim), np.float32), np.empty(0, np.int64)
        assert self.kind in ("flat", "hnsw"), "IVF-PQ vectors are lossy; it is never rebuilt"
        ids = self._label_to_id[: self._n_labels]
        live = np.flatnonzero(ids >= 0)
        vecs = self._index.reconstruct_n(0, self._index.ntotal)
        if len(live) != len(vecs):
            vecs = vecs[live]
        return vecs, ids[live].copy()

    def _rebuild(self, kind: str, extra: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Build a fresh index of `kind` from the live entries (+ `extra`), renumbering labels.
        Drops all tombstones. Metadata is untouched (it is keyed by our ids)."""
        vecs, ids = self._live()
        if extra is not None:
            vecs = np.concatenate([vecs, extra[0]]) if len(vecs) else extra[0]
            ids = np.concatenate([ids, extra[1]])
        index = self._new_index(kind, train=vecs if kind == "ivfpq" else None)
        self._index, self.kind = None, kind  # the old index is freed before the new one fills
        self._index = index
        self._label_to_id = np.empty(0, dtype=np.int64)
        self._n_labels, self._dead, self._selector = 0, 0, None
        self._id_to_label = {}
        self._append(vecs, ids)

    def _append(self, vecs: np.ndarray, ids: np.ndarray) -> None:
        n = len(ids)
        start = self._n_labels
        for lo in range(0, n, _ADD_CHUNK):
            chunk = vecs[lo: lo + _ADD_CHUNK]
            if self.kind == "ivfpq":
                self._index.add_with_ids(chunk, np.arange(start + lo, start + lo + len(chunk), dtype=np.int64))
            else:
                self._index.add(chunk)
        if self.kind != "ivfpq":
            assert self._index.ntotal == start + n, "flat/HNSW labels are positions"
        if start + n > len(self._label_to_id):
            grown = np.empty(max(start + n, 2 * len(self._label_to_id), 1024), dtype=np.int64)
            grown[:start] = self._label_to_id[:start]
            self._label_to_id = grown
        self._label_to_id[start: start + n] = ids
        self._n_labels = start + n
        self._id_to_label.update(zip(ids.tolist(), range(start, start + n)))

    def _drop(self, ids: Iterable[int]) -> int:
        """Take `ids` (present ones) out of the index: tombstone (flat/HNSW) or remove_ids (IVF)."""
        labels = [self._id_to_label.pop(i) for i in ids if i in self._id_to_label]
        if not labels:
            return 0
        arr = np.asarray(labels, dtype=np.int64)
        self._label_to_id[arr] = -1
        if self.kind == "ivfpq":
            self._index.remove_ids(faiss.IDSelectorBatch(arr))
        else:
            self._dead += len(arr)
            self._selector = None
        return len(arr)

    def _maybe_compact(self) -> None:
        if self.kind != "ivfpq" and self._dead and self._dead > self.params["compact_fraction"] * self._index.ntotal:
            self._rebuild(self.kind)

    # ------------------------------------------------------------------ public API

    def __len__(self) -> int:
        return len(self._id_to_label)

    def ids(self) -> list[int]:
        """The live ids, ascending."""
        return sorted(self._id_to_label)

    def __contains__(self, id_: Any) -> bool:
        return int(id_) in self._id_to_label

    def get(self, id_: int) -> Any:
        """The metadata stored with `id_` (None when it was added without); KeyError if absent."""
        id_ = int(id_)
        if id_ not in self._id_to_label:
            raise KeyError(f"id {id_} is not in the semantic store")
        return self._meta.get(id_)

    def add(self, vectors: Any, ids: Any, metadata: Sequence[Any] | None = None) -> None:
        """Add (upsert) `vectors` [n, dim] under `ids` [n] int64 with optional JSON metadata."""
        x = self._as_matrix(vectors, "add")
        n = len(x)
        if hasattr(ids, "detach"):
            ids = ids.detach().cpu().numpy()
        ids_arr = np.asarray(ids)
        if ids_arr.ndim == 0:
            ids_arr = ids_arr[None]
        if ids_arr.shape != (n,) or (n and not np.issubdtype(ids_arr.dtype, np.integer)):
            raise ValueError(f"add: ids must be {n} integers, got shape {ids_arr.shape} dtype {ids_arr.dtype}")
        ids_arr = ids_arr.astype(np.int64)
        if n and ids_arr.min() < 0:
            raise ValueError("add: ids must be non-negative (-1 means 'no result')")
        if len(np.unique(ids_arr)) != n:
            raise ValueError("add: an id appears more than once in one batch")
        if metadata is not None:
            metadata = list(metadata)
            if len(metadata) != n:
                raise ValueError(f"add: {len(metadata)} metadata entries for {n} vectors")
            for m in metadata:
                try:
                    json.dumps(m)
                except (TypeError, ValueError) as err:
                    raise ValueError(f"add: metadata is not JSON-serialisable: {err}") from None
        if n == 0:
            return
        id_list = ids_arr.tolist()
        replaced = [i for i in id_list if i in self._id_to_label]
        new_size = len(self) - len(replaced) + n
        target = None  # the index type to rebuild into, if this add needs a rebuild
        if self._index is None:  # forced IVF-PQ, first add: train on this batch
            target = "ivfpq"
        elif self.params["index"] == "auto" and self.kind == "flat" and new_size > self.params["flat_limit"]:
            target = self.params["large"]
        need = max(self.params["nlist"], 2 ** self.params["nbits"])
        if target == "ivfpq" and new_size < need:  # checked before anything is changed
            raise ValueError(f"IVF-PQ needs at least max(nlist, 2**nbits) = {need} vectors to train, got {new_size}")
        self._drop(replaced)  # upsert: the old entries of these ids go
        if target is not None:
            self._rebuild(target, extra=(x, ids_arr))
        else:
            self._append(x, ids_arr)
        if metadata is None:
            for i in id_list:
                self._meta.pop(i, None)
        else:
            for i, m in zip(id_list, metadata):
                if m is None:
                    self._meta.pop(i, None)
                else:
                    self._meta[i] = m
        self._maybe_compact()

    def remove(self, ids: Any) -> int:
        """Remove `ids` (unknown ones are ignored); returns how many were removed."""
        if hasattr(ids, "detach"):
            ids = ids.detach().cpu().numpy()
        id_list = np.atleast_1d(np.asarray(ids, dtype=np.int64)).tolist()
        removed = self._drop(id_list)
        for i in id_list:
            self._meta.pop(i, None)
        self._maybe_compact()
        return removed

    def _search_params(self, k: int, ef_search: int | None, nprobe: int | None) -> Any:
        sel = None
        if self._dead:
            if self._selector is None:
                dead = np.flatnonzero(self._label_to_id[: self._n_labels] < 0).astype(np.int64)
                batch = faiss.IDSelectorBatch(dead)
                self._selector = (faiss.IDSelectorNot(batch), batch)  # keep both alive
            sel = self._selector[0]
        if self.kind == "hnsw":
            ef = self.params["ef_search"] if ef_search is None else _check_pos_int("ef_search", ef_search)
            return faiss.SearchParametersHNSW(efSearch=max(ef, k), sel=sel)
        if self.kind == "ivfpq":
            probe = self.params["nprobe"] if nprobe is None else _check_pos_int("nprobe", nprobe)
            return faiss.SearchParametersIVF(nprobe=probe)
        return faiss.SearchParameters(sel=sel) if sel is not None else None

    def search(self, queries: Any, k: int, *, ef_search: int | None = None, nprobe: int | None = None,
               with_metadata: bool = True) -> tuple[np.ndarray, np.ndarray, list[list[Any]] | None]:
        """Top-k live entries per query: (scores [q, k] float32, ids [q, k] int64, metadata lists,
        or None with `with_metadata=False`). `ef_search` (HNSW) / `nprobe` (IVF-PQ) override the
        store's setting for this call. Afterwards `last_distances` holds the number of vector
        distances FAISS computed (flat: queries x entries; HNSW / IVF: FAISS's own counters)."""
        q = self._as_matrix(queries, "search")
        k = _check_pos_int("k", k)
        worst = -np.inf if self.metric == "ip" else np.inf
        self.last_distances = 0
        if self._index is None or len(self) == 0:
            scores = np.full((len(q), k), worst, dtype=np.float32)
            ids = np.full((len(q), k), -1, dtype=np.int64)
        else:
            stats = {"hnsw": faiss.cvar.hnsw_stats, "ivfpq": faiss.cvar.indexIVF_stats}.get(self.kind)
            if stats is not None:
                stats.reset()
            scores, labels = self._index.search(q, k, params=self._search_params(k, ef_search, nprobe))
            self.last_distances = int(stats.ndis) if stats is not None else len(q) * int(self._index.ntotal)
            found = labels >= 0
            ids = np.full(labels.shape, -1, dtype=np.int64)
            ids[found] = self._label_to_id[labels[found]]
            scores = np.where(ids >= 0, scores, worst).astype(np.float32)
        if not with_metadata:
            return scores, ids, None
        meta = self._meta
        metadata = [[meta.get(i) if i >= 0 else None for i in row] for row in ids.tolist()]
        return scores, ids, metadata

    def vectors(self, ids: Any) -> np.ndarray:
        """The stored vectors [n, dim] of `ids` (exact for flat and HNSW; IVF-PQ keeps only codes)."""
        if self.kind == "ivfpq":
            raise ValueError("an IVF-PQ store keeps compressed codes, not its vectors; use index='hnsw' or 'flat'")
        id_list = np.atleast_1d(np.asarray(ids, dtype=np.int64)).tolist()
        missing = [i for i in id_list if i not in self._id_to_label]
        if missing:
            raise KeyError(f"id {missing[0]} is not in the semantic store")
        if not id_list:
            return np.empty((0, self.dim), np.float32)
        labels = np.asarray([self._id_to_label[i] for i in id_list], dtype=np.int64)
        return self._index.reconstruct_batch(labels)

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path) -> None:
        """Write the store to folder `path` atomically (old or new store survives a crash)."""
        with atomic_dir(path) as tmp:
            if self._index is not None:
                faiss.write_index(self._index, str(tmp / "index.faiss"))
            np.save(tmp / "labels.npy", self._label_to_id[: self._n_labels])
            (tmp / "metadata.json").write_text(json.dumps({str(k): v for k, v in self._meta.items()}))
            config = dict(format=FORMAT_VERSION, params=self.params, kind=self.kind,
                          size=len(self), trained=self._index is not None)
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, dim: int | None = None) -> "SemanticStore":
        """Read a store written by `save`; `dim` (the model's query dimension) is checked if given."""
        path = Path(path)
        old = path.with_name(f".{path.name}.old")
        if not (path / "config.json").exists() and (old / "config.json").exists():
            path = old  # a save was cut between atomic_dir's two renames: the old store is whole
        config_file = path / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"no semantic store at {path} (config.json missing)")
        config = json.loads(config_file.read_text())
        if config.get("format") != FORMAT_VERSION:
            raise ValueError(f"semantic store at {path} has format {config.get('format')}, expected {FORMAT_VERSION}")
        params = config["params"]
        if dim is not None and params["dim"] != dim:
            raise ValueError(f"semantic store at {path} has dim {params['dim']}, but the model's query dim is {dim}")
        store = cls(**params)
        store.kind = config["kind"]
        if config["trained"]:
            store._index = faiss.read_index(str(path / "index.faiss"))
            if store._index.d != store.dim:
                raise ValueError(f"semantic store at {path}: index dim {store._index.d} != recorded dim {store.dim}")
        else:
            store._index = None
        labels = np.load(path / "labels.npy")
        store._label_to_id = labels.astype(np.int64, copy=True)
        store._n_labels = len(labels)
        live = np.flatnonzero(labels >= 0)
        store._id_to_label = dict(zip(labels[live].tolist(), live.tolist()))
        if store.kind != "ivfpq":
            store._dead = len(labels) - len(live)
            if store._index.ntotal != len(labels):
                raise ValueError(f"semantic store at {path}: index holds {store._index.ntotal} vectors, "
                                 f"labels {len(labels)}")
        store._meta = {int(k): v for k, v in json.loads((path / "metadata.json").read_text()).items()}
        if len(store) != config["size"] or not set(store._meta) <= set(store._id_to_label):
            raise ValueError(f"semantic store at {path} is inconsistent (ids vs metadata vs config)")
        return store


# ====================================================================== benchmark


def _rss_mib() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def _exact_topk(data: np.ndarray, queries: np.ndarray, k: int, metric: str, chunk: int = 131_072) -> np.ndarray:
    """Exact top-k row indices by numpy in chunks (independent of FAISS)."""
    best_s = np.full((len(queries), 0), 0, np.float32)
    best_i = np.full((len(queries), 0), 0, np.int64)
    qn = (queries ** 2).sum(1, keepdims=True)
    for lo in range(0, len(data), chunk):
        block = data[lo: lo + chunk]
        s = queries @ block.T
        if metric == "l2":
            s = -(qn - 2 * s + (block ** 2).sum(1)[None, :])
        s = np.concatenate([best_s, s], 1)
        i = np.concatenate([best_i, np.broadcast_to(np.arange(lo, lo + len(block)), (len(queries), len(block)))], 1)
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    return best_i


def benchmark(n: int = 1_000_000, dim: int = 64, queries: int = 200, k: int = 5, batch: int = 100_000,
              seed: int = 0, sweep: Sequence[int] = (), **store_kwargs: Any) -> dict[str, Any]:
    """Build a store of `n` random unit vectors in batches (auto policy unless `store_kwargs` say
    otherwise), then time `queries` single-query searches and score recall@k against exact search.
    `sweep` lists ef_search (HNSW) or nprobe (IVF-PQ) values to measure as well. Returns one
    JSON-serialisable dict. Uniform random unit vectors are the hard case for ANN indexes (no
    low-dimensional structure), so recall here is a lower bound for real embeddings."""
    rng = np.random.default_rng(seed)
    store_kwargs.setdefault("normalize", True)
    before = _rss_mib()
    store = SemanticStore(dim, **store_kwargs)
    data = np.empty((n, dim), np.float32)  # kept only for the exact ground truth
    t0 = time.perf_counter()
    rebuild_s = None
    for lo in range(0, n, batch):
        x = rng.standard_normal((min(batch, n - lo), dim), dtype=np.float32)
        faiss.normalize_L2(x)
        data[lo: lo + len(x)] = x
        kind = store.kind
        tb = time.perf_counter()
        store.add(x, np.arange(lo, lo + len(x), dtype=np.int64))
        if store.kind != kind:
            rebuild_s = time.perf_counter() - tb
    build_s = time.perf_counter() - t0
    after = _rss_mib()
    q = rng.standard_normal((queries, dim), dtype=np.float32)
    faiss.normalize_L2(q)
    exact = _exact_topk(data, q, k, store.metric)  # ids are row numbers

    def measure(**override: Any) -> tuple[float, np.ndarray]:
        lat, got = [], np.empty((queries, k), np.int64)
        for j in range(queries):
            t = time.perf_counter()
            _, ids, _ = store.search(q[j: j + 1], k, **override)
            lat.append(time.perf_counter() - t)
            got[j] = ids[0]
        recall = float(np.mean([len(set(g.tolist()) & set(e.tolist())) / k for g, e in zip(got, exact)]))
        return recall, np.array(lat) * 1e3

    recall, lat_ms = measure()
    t = time.perf_counter()
    store.search(q, k)
    batch_s = time.perf_counter() - t
    knob = "nprobe" if store.kind == "ivfpq" else "ef_search"
    swept = []
    for value in sweep if store.kind != "flat" else ():
        r, l = measure(**{knob: value})
        swept.append({knob: value, "recall_at_k": round(r, 4), "query_p50_ms": round(float(np.percentile(l, 50)), 3),
                      "query_p99_ms": round(float(np.percentile(l, 99)), 3)})
    return dict(
        n=n, dim=dim, k=k, queries=queries, metric=store.metric, policy=store.params["index"],
        final_index=store.kind, params=store.params, threads=faiss.omp_get_max_threads(),
        build_s=round(build_s, 2), rebuild_at_flat_limit_s=None if rebuild_s is None else round(rebuild_s, 2),
        query_p50_ms=round(float(np.percentile(lat_ms, 50)), 3),
        query_p99_ms=round(float(np.percentile(lat_ms, 99)), 3),
        batch_query_ms_per_query=round(batch_s * 1e3 / queries, 3),
        recall_at_k=round(recall, 4),
        rss_before_mib=round(before["VmRSS"], 1), rss_after_build_mib=round(after["VmRSS"], 1),
        peak_rss_during_build_mib=round(after["VmHWM"], 1), sweep=swept,
        ground_truth_data_mib=round(data.nbytes / 2**20, 1),
    )
