"""HMST's semantic memory (`hmst_bench_hmst.semantic.SemanticStore`) against the real faiss:
dimension checks at construction/add/query, flat search equal to numpy exact search (ip and l2),
the auto policy switching flat -> HNSW / IVF-PQ past `flat_limit` while keeping ids and metadata,
HNSW and IVF-PQ recall@5 against exact search, metadata found by returned id (never by vector:
identical vectors keep their own metadata), remove, upsert and tombstone compaction, save/load
round trip, a crash during save leaving the previous store loadable, and a wrong-dim load refused.
Small n throughout; the 1M measurement is `semantic.benchmark`, not a test."""

from __future__ import annotations

import numpy as np
import pytest

from hmst_bench_hmst import semantic
from hmst_bench_hmst.semantic import SemanticStore

DIM = 32


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """OpenMP threads spin when the (shared, 2-core) machine is busy: one thread is faster here."""
    before = semantic.faiss.omp_get_max_threads()
    semantic.faiss.omp_set_num_threads(1)
    yield
    semantic.faiss.omp_set_num_threads(before)


def rand(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def exact(data: np.ndarray, q: np.ndarray, k: int, metric: str = "ip") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (row indices, scores) by plain numpy, float64."""
    d, qq = data.astype(np.float64), q.astype(np.float64)
    if metric == "ip":
        s = qq @ d.T
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    else:
        s = ((qq[:, None, :] - d[None, :, :]) ** 2).sum(-1)
        order = np.argsort(s, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(s, order, 1)


def recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(g.tolist()) & set(w.tolist())) / want.shape[1] for g, w in zip(got, want)]))


# ====================================================================== dimensions


@pytest.mark.parametrize("bad", [0, -3, 2.5, "32", True, None])
def test_dim_must_be_positive_int(bad):
    with pytest.raises(ValueError, match="dim must be a positive int"):
        SemanticStore(bad)


def test_dim_checked_on_add_and_search_in_one_line():
    store = SemanticStore(DIM)
    with pytest.raises(ValueError) as err:
        store.add(rand(3, DIM + 1), np.arange(3))
    msg = str(err.value)
    assert "\n" not in msg and str(DIM + 1) in msg and str(DIM) in msg
    store.add(rand(3), np.arange(3))
    with pytest.raises(ValueError) as err:
        store.search(rand(2, 16), 1)
    assert "\n" not in str(err.value) and "16" in str(err.value) and str(DIM) in str(err.value)
    with pytest.raises(ValueError, match="shape"):
        store.search(np.zeros((2, 3, DIM), np.float32), 1)
    assert len(store) == 3


def test_conversion_float64_noncontiguous_1d_and_torch():
    torch = pytest.importorskip("torch")
    data = rand(10)
    store = SemanticStore(DIM, index="flat")
    wide = np.asfortranarray(data.astype(np.float64))  # float64, not C-contiguous
    store.add(wide, np.arange(10))
    _, ids, _ = store.search(data[3], 1)  # a 1-D query is one row
    assert ids.tolist() == [[3]]
    _, ids, _ = store.search(torch.from_numpy(data[:2]).requires_grad_(), 1)
    assert ids[:, 0].tolist() == [0, 1]
    with pytest.raises(ValueError, match="NaN"):
        store.add(np.full((1, DIM), np.nan), [99])


def test_pq_m_must_divide_dim():
    with pytest.raises(ValueError, match="pq_m=7 must divide dim=32"):
        SemanticStore(DIM, index="ivfpq", pq_m=7)
    with pytest.raises(ValueError, match="pq_m=5"):
        SemanticStore(DIM, large="ivfpq", pq_m=5)
    SemanticStore(DIM, index="hnsw", pq_m=7)  # not used there, not checked
    with pytest.raises(ValueError, match="flat_limit=10 is too small"):
        SemanticStore(DIM, large="ivfpq", flat_limit=10, nlist=8, pq_m=16, nbits=6)


def test_failed_ivfpq_training_changes_nothing():
    store = SemanticStore(DIM, index="ivfpq", nlist=8, pq_m=16, nbits=6)
    with pytest.raises(ValueError, match="at least"):
        store.add(rand(20), np.arange(20), [{"i": i} for i in range(20)])
    assert len(store) == 0 and store._index is None
    store.add(rand(100), np.arange(100))
    assert len(store) == 100 and store.kind == "ivfpq"


def test_ids_validated():
    store = SemanticStore(DIM)
    with pytest.raises(ValueError, match="more than once"):
        store.add(rand(2), [5, 5])
    with pytest.raises(ValueError, match="2 integers"):
        store.add(rand(2), [1.0, 2.0])
    with pytest.raises(ValueError, match="non-negative"):
        store.add(rand(1), [-1])
    with pytest.raises(ValueError, match="JSON"):
        store.add(rand(1), [1], [{"x": object()}])
    assert len(store) == 0


# ====================================================================== exact search


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_flat_equals_numpy_exact(metric):
    data, q = rand(500), rand(20, seed=1)
    ids = np.arange(1000, 1500, dtype=np.int64)  # our ids, not positions
    store = SemanticStore(DIM, metric=metric, index="flat")
    store.add(data, ids)
    scores, got, meta = store.search(q, 7)
    want_rows, want_scores = exact(data, q, 7, metric)
    assert store.kind == "flat"
    np.testing.assert_array_equal(got, ids[want_rows])
    np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-3)
    assert meta == [[None] * 7] * 20


def test_missing_results_and_empty_store():
    store = SemanticStore(DIM)
    scores, ids, meta = store.search(rand(2), 3)
    assert (ids == -1).all() and np.isneginf(scores).all() and meta == [[None] * 3] * 2
    store.add(rand(2), [7, 8], [{"a": 1}, {"a": 2}])
    scores, ids, meta = store.search(rand(1, seed=3), 4)
    assert sorted(ids[0, :2].tolist()) == [7, 8] and ids[0, 2:].tolist() == [-1, -1]
    assert meta[0][2:] == [None, None] and np.isneginf(scores[0, 2:]).all()
    l2 = SemanticStore(DIM, metric="l2")
    l2.add(rand(1), [1])
    scores, ids, _ = l2.search(rand(1), 2)
    assert ids[0, 1] == -1 and np.isposinf(scores[0, 1])


# ====================================================================== auto policy


@pytest.mark.parametrize("large", ["hnsw", "ivfpq"])
def test_auto_switches_past_flat_limit_and_keeps_ids_and_metadata(large):
    data = rand(1200)
    ids = np.arange(1200, dtype=np.int64) * 10 + 3
    meta = [{"row": i} for i in range(1200)]
    store = SemanticStore(DIM, flat_limit=500, large=large, nlist=8, pq_m=16, nbits=6, nprobe=8)
    store.add(data[:300], ids[:300], meta[:300])
    store.add(data[300:500], ids[300:500], meta[300:500])
    assert store.kind == "flat" and len(store) == 500  # at the limit, not past it
    store.add(data[500:900], ids[500:900], meta[500:900])  # this add crosses the limit
    assert store.kind == large and len(store) == 900
    store.add(data[900:], ids[900:], meta[900:])
    assert store.kind == large and len(store) == 1200
    for row in (0, 299, 650, 1199):
        assert store.get(ids[row]) == {"row": row}
    # a stored vector searched for finds itself (PQ is lossy: within the top 5), with its metadata
    _, got, m = store.search(data[[0, 450, 1100]], 5)
    for qi, row in enumerate((0, 450, 1100)):
        assert ids[row] in got[qi]
        j = got[qi].tolist().index(ids[row])
        assert m[qi][j] == {"row": row}
    # every returned id's metadata is that id's own
    for i, mm in zip(got.ravel().tolist(), sum(m, [])):
        assert mm == {"row": (i - 3) // 10}


# ====================================================================== ANN recall

N_RECALL = 3000
HNSW_RECALL = 0.95  # measured 0.988 (ip) / 0.986 (l2) on this data
IVFPQ_RECALL = 0.65  # measured 0.776: PQ (2 dims/code byte) on random Gaussian data, the hard case


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_hnsw_recall_at_5(metric):
    data, q = rand(N_RECALL), rand(100, seed=1)
    store = SemanticStore(DIM, metric=metric, index="hnsw", hnsw_m=16, ef_search=64)
    store.add(data, np.arange(N_RECALL))
    _, got, _ = store.search(q, 5)
    want, _ = exact(data, q, 5, metric)
    assert store.kind == "hnsw"
    assert recall(got, want) >= HNSW_RECALL


def test_ivfpq_recall_at_5():
    data, q = rand(N_RECALL), rand(100, seed=1)
    store = SemanticStore(DIM, index="ivfpq", nlist=16, pq_m=16, nbits=8, nprobe=8)
    with pytest.raises(ValueError, match="at least"):
        store.add(data[:100], np.arange(100))  # too few to train 2**8 centroids
    store.add(data, np.arange(N_RECALL))
    _, got, _ = store.search(q, 5)
    want, _ = exact(data, q, 5)
    assert store.kind == "ivfpq"
    assert recall(got, want) >= IVFPQ_RECALL


def test_vectors_by_id_and_distance_counts():
    """`vectors(ids)` gives back exactly what was stored (flat and HNSW), `last_distances`
    counts the distances FAISS computed (flat: queries x entries; HNSW: its own counter)."""
    data = rand(100)
    store = SemanticStore(DIM, flat_limit=50)
    store.add(data[:40], np.arange(100, 140))
    assert np.array_equal(store.vectors([105, 100]), data[[5, 0]])
    _, _, meta = store.search(data[:3], 2, with_metadata=False)
    assert meta is None and store.last_distances == 3 * 40
    store.add(data[40:], np.arange(140, 200))
    assert store.kind == "hnsw" and np.array_equal(store.vectors([199, 120]), data[[99, 20]])
    store.search(data[:3], 2)
    assert store.last_distances > 0
    with pytest.raises(KeyError, match="not in the semantic store"):
        store.vectors([5])
    pq = SemanticStore(DIM, index="ivfpq", nlist=4, pq_m=8, nbits=4)
    pq.add(rand(64, seed=2), np.arange(64))
    pq.search(rand(2, seed=3), 3)
    assert pq.last_distances > 0
    with pytest.raises(ValueError, match="compressed codes"):
        pq.vectors([0])


# ====================================================================== metadata


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_identical_vectors_keep_their_own_metadata(kind):
    data = rand(50)
    store = SemanticStore(DIM, index=kind)
    twin = data[7]
    store.add(data, np.arange(50), [{"i": i} for i in range(50)])
    store.add(np.stack([twin, twin]), [100, 200], [{"who": "a"}, {"who": "b"}])
    _, ids, meta = store.search(twin, 3)
    found = dict(zip(ids[0].tolist(), meta[0]))
    assert set(found) == {7, 100, 200}
    assert found == {7: {"i": 7}, 100: {"who": "a"}, 200: {"who": "b"}}


def test_metadata_comes_from_the_id_dict(monkeypatch):
    """Lookup goes through the id -> metadata dict: swap a dict value and search reflects it
    although the vectors did not change (so nothing is matched by vector or by dict equality)."""
    store = SemanticStore(DIM)
    data = rand(4)
    store.add(data, [1, 2, 3, 4], [{"k": 1}, {"k": 1}, {"k": 1}, {"k": 1}])  # equal dicts
    store._meta[3] = {"k": "swapped"}
    _, ids, meta = store.search(data[2], 1)
    assert ids[0, 0] == 3 and meta[0][0] == {"k": "swapped"}
    assert store.get(3) == {"k": "swapped"} and store.get(1) == {"k": 1}
    with pytest.raises(KeyError):
        store.get(99)


# ====================================================================== remove / upsert


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_remove_and_upsert(kind):
    data = rand(600)
    store = SemanticStore(DIM, index=kind, nlist=8, pq_m=16, nbits=6, nprobe=8, compact_fraction=0.9)
    store.add(data, np.arange(600), [{"v": 0, "i": i} for i in range(600)])
    assert store.remove([5, 6, 12345]) == 2 and len(store) == 598
    assert 5 not in store and 6 not in store and 7 in store
    with pytest.raises(KeyError):
        store.get(5)
    _, ids, _ = store.search(data[[5, 6]], 10)
    assert not {5, 6} & set(ids.ravel().tolist())
    # upsert id 8: a new vector (the old one of id 9's twin) and new metadata
    store.add(data[9] * 1.0, [8], [{"v": 1}])
    assert len(store) == 598 and store.get(8) == {"v": 1}
    _, ids, meta = store.search(data[9], 5)
    row = ids[0].tolist()
    assert 8 in row and 9 in row and row.count(8) == 1
    assert meta[0][row.index(8)] == {"v": 1}
    if kind != "ivfpq":  # exact vectors: the old vector of id 8 no longer finds id 8 first
        _, ids, _ = store.search(data[8], 1)
        assert ids[0, 0] != 8
    store.add(data[8], [8])  # upsert with no metadata clears it
    assert store.get(8) is None


def test_tombstones_compact_and_search_returns_k_live():
    data = rand(400)
    store = SemanticStore(DIM, index="hnsw", compact_fraction=0.25)
    store.add(data, np.arange(400))
    store.remove(np.arange(0, 90))  # 90 tombstones < 25% of 400: kept, filtered in search
    assert store._dead == 90 and store._index.ntotal == 400
    _, ids, _ = store.search(data[:90], 5)
    assert (ids >= 90).all()  # k live results although the nearest ones are tombstones
    store.remove(np.arange(90, 110))  # 110 > 100: compacted (rebuilt from live vectors)
    assert store._dead == 0 and store._index.ntotal == 290 and len(store) == 290
    _, ids, _ = store.search(data[300:320], 1)
    assert ids[:, 0].tolist() == list(range(300, 320))


# ====================================================================== persistence


def _store_with_history(kind="auto"):
    data = rand(800)
    store = SemanticStore(DIM, index=kind, flat_limit=300, nlist=8, pq_m=16, nbits=6, nprobe=4)
    store.add(data, np.arange(800) * 3, [{"i": i, "tags": ["x", i % 3]} for i in range(800)])
    store.remove([0, 3, 6])
    store.add(data[100], [9], [{"upserted": True}])
    return store, data


@pytest.mark.parametrize("kind", ["auto", "flat", "ivfpq"])
def test_save_load_round_trip(tmp_path, kind):
    store, data = _store_with_history(kind)
    q = rand(30, seed=5)
    before = store.search(q, 6)
    store.save(tmp_path / "sem")
    loaded = SemanticStore.load(tmp_path / "sem", dim=DIM)
    after = loaded.search(q, 6)
    assert loaded.kind == store.kind and len(loaded) == len(store) and loaded.params == store.params
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    assert after[2] == before[2]
    assert loaded.get(9) == {"upserted": True}
    loaded.add(rand(1, seed=9), [5000], [{"new": 1}])  # still a working store
    assert loaded.get(5000) == {"new": 1}


def test_untrained_ivfpq_round_trip(tmp_path):
    SemanticStore(DIM, index="ivfpq", pq_m=16).save(tmp_path / "s")
    loaded = SemanticStore.load(tmp_path / "s")
    assert len(loaded) == 0 and (loaded.search(rand(1), 2)[1] == -1).all()


def test_crash_during_save_keeps_previous_store(tmp_path, monkeypatch):
    store, _ = _store_with_history()
    q = rand(10, seed=2)
    store.save(tmp_path / "sem")
    saved = store.search(q, 5)
    store.add(rand(50, seed=7), np.arange(10_000, 10_050))
    store.remove(np.arange(30, 300, 3))

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(semantic.faiss, "write_index", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        store.save(tmp_path / "sem")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["sem"]  # no temp folder left behind
    loaded = SemanticStore.load(tmp_path / "sem", dim=DIM)
    got = loaded.search(q, 5)
    np.testing.assert_array_equal(got[1], saved[1])
    assert got[2] == saved[2] and 10_000 not in loaded


def test_crash_between_swap_renames_loads_old(tmp_path):
    """atomic_dir moves the old folder aside before renaming the new one in; a crash between the
    two renames leaves only `.sem.old`, which `load` falls back to."""
    store, _ = _store_with_history()
    store.save(tmp_path / "sem")
    (tmp_path / "sem").rename(tmp_path / ".sem.old")
    loaded = SemanticStore.load(tmp_path / "sem", dim=DIM)
    assert len(loaded) == len(store)


def test_wrong_dim_load_refused(tmp_path):
    store = SemanticStore(DIM)
    store.add(rand(5), np.arange(5))
    store.save(tmp_path / "sem")
    with pytest.raises(ValueError) as err:
        SemanticStore.load(tmp_path / "sem", dim=64)
    msg = str(err.value)
    assert "\n" not in msg and "dim 32" in msg and "64" in msg
    with pytest.raises(FileNotFoundError):
        SemanticStore.load(tmp_path / "nothing")


def test_per_call_search_knobs():
    data, q = rand(N_RECALL), rand(50, seed=1)
    want, _ = exact(data, q, 5)
    hnsw = SemanticStore(DIM, index="hnsw", hnsw_m=8, ef_search=64)
    hnsw.add(data, np.arange(N_RECALL))
    low = recall(hnsw.search(q, 5, ef_search=5)[1], want)
    high = recall(hnsw.search(q, 5, ef_search=400)[1], want)
    assert high >= 0.97 and high >= low
    assert hnsw.params["ef_search"] == 64  # the override is per call
    with pytest.raises(ValueError, match="ef_search"):
        hnsw.search(q, 5, ef_search=0)
    ivf = SemanticStore(DIM, index="ivfpq", nlist=16, pq_m=16, nbits=6, nprobe=1)
    ivf.add(data, np.arange(N_RECALL))
    assert recall(ivf.search(q, 5, nprobe=16)[1], want) >= recall(ivf.search(q, 5)[1], want)
