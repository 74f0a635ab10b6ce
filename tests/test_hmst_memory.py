"""HMST's memory (plugins/hmst/hmst_bench_hmst/memory.py) inside the model: a new memory changes
nothing (gate 0), causality across segments, exact KV-cached decoding across segment writes and
past max_context_len, consolidation of the most-read entries by stable ids, the store's dimension
equal to the query's, gradients through retrieved entries into the write path, the memory FLOPs
the counter cannot see predicted exactly, right-padded scoring, and the config's derived and
checked fields."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hmst_bench import ConfigError
from hmst_bench.model import LanguageModel
from hmst_bench_hmst import memory as M
from hmst_bench_hmst.model import HMSTModel
from hmst_bench_hmst.plugin import HMST, SIZES, HMSTConfig, stage_config

V, W = 53, 16


def build(seed=0, gate=1.0, **overrides) -> HMSTModel:
    values = dict(vocab_size=V, max_seq_len=W, d_model=32, n_layers=2, n_heads=4, n_experts=4, top_k=2,
                  memory=True, memory_chunk=4, episodic_slots=4, semantic_top_k=3, memory_max_segments=8)
    values.update(overrides)
    torch.manual_seed(seed)
    model = HMSTModel(HMSTConfig(**values)).eval()
    if model.memory is not None:
        with torch.no_grad():
            model.memory.reader.gate.fill_(gate)  # an open gate, as after stage-2 training
    return model


def rand_ids(b, t, seed=0):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


class Recorder:
    """Collects every DocMemory a model creates (to inspect what a forward pass did)."""

    def __init__(self, monkeypatch):
        self.made = []
        original = M.DocMemory.__init__

        def init(mem, *args, **kwargs):
            original(mem, *args, **kwargs)
            self.made.append(mem)

        monkeypatch.setattr(M.DocMemory, "__init__", init)


# ============================================================================== config


def test_memory_is_off_in_stage_1_and_on_in_stage_2():
    assert HMSTConfig().memory is False and stage_config("2") == {"memory": True} and stage_config("1") == {}
    plain = build(memory=False)
    assert plain.memory is None and plain.max_context_len is None and plain.context_len == W
    with pytest.raises(ValueError, match="exceed the model's context of 16"):
        plain.token_logprobs(rand_ids(1, W + 1), rand_ids(1, W + 1))
    assert build().context_len == 8 * W


@pytest.mark.parametrize("size", list(SIZES))
def test_memory_fields_are_derived_in_every_preset(size):
    c = HMST.make_config(size, {"memory": True})
    assert c.memory_dim == c.d_model // 2 and c.memory_layer == c.n_layers // 2 < c.n_layers
    assert c.episodic_capacity == c.max_seq_len // c.memory_chunk  # one window's entries
    assert c.max_seq_len % c.memory_chunk == 0
    model_dim_checked = HMSTModel(HMST.make_config("micro", {"memory": True})).memory
    assert model_dim_checked.reader.query.out_features == model_dim_checked.write.out_features


@pytest.mark.parametrize("bad, match", [
    (dict(memory=True, memory_chunk=5), "memory_chunk .5. must divide the window"),
    (dict(consolidate_fraction=1.5), "consolidate_fraction must be a number in"),
    (dict(recall_fraction=-0.1), "recall_fraction must be a number in"),
    (dict(memory_segments=1), "must be at least 2"),
    (dict(memory="yes"), "memory must be true or false"),
    (dict(semantic_top_k=0), "semantic_top_k"),
    (dict(episodic_slots=-1), "episodic_slots must be an integer >= 0"),
    (dict(longterm_capacity=-5), "longterm_capacity must be an integer >= 0"),
])
def test_memory_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        HMSTConfig(**{"max_seq_len": 16, **bad})


# ============================================================================== reading with memory


def test_a_new_memory_changes_nothing():
    """Gate 0 (a fresh memory): every segment's logits are the plain model's on that segment, so
    stage 2 starts exactly where stage 1 ended."""
    model = build(gate=0.0)
    ids = rand_ids(2, 5 * W)
    with torch.no_grad():
        with_memory = model.logits(ids)
        plain = torch.cat([model.forward_all(ids[:, a : a + W])[1] for a in range(0, 5 * W, W)], dim=1)
    assert torch.equal(with_memory, plain)


def test_memory_is_read_and_is_causal_across_segments():
    model = build()
    ids = rand_ids(1, 5 * W, seed=1)
    with torch.no_grad():
        base = model.logits(ids)
        plain_last = model.forward_all(ids[:, 4 * W :])[1]
        assert not torch.allclose(base[:, 4 * W :], plain_last, atol=1e-4)  # earlier segments matter
        for j in (3, W + 5, 3 * W, 4 * W + 2):
            changed = ids.clone()
            changed[0, j] = (changed[0, j] + 1) % V
            out = model.logits(changed)
            # nothing before j moves (up to float noise: the experts' matmuls see other row sets)
            assert torch.allclose(out[:, :j], base[:, :j], atol=1e-6), j
            assert not torch.allclose(out[:, j:], base[:, j:])


def test_right_padded_long_rows_score_as_each_row_alone():
    model = build()
    a, b = rand_ids(1, 4 * W + 3, seed=4), rand_ids(1, 2 * W + 7, seed=5)
    ids = torch.zeros(2, 4 * W + 3, dtype=torch.long)
    ids[0], ids[1, : b.shape[1]] = a[0], b[0]
    with torch.no_grad():
        together = model.next_token_logprobs(ids, lengths=torch.tensor([a.shape[1], b.shape[1]]))
        alone = torch.cat([model.next_token_logprobs(a), model.next_token_logprobs(b)])
    assert torch.allclose(together, alone, atol=1e-5)


# ============================================================================== writing and consolidation


def test_consolidation_moves_the_most_read_entries_by_stable_id():
    model = build()
    c = model.config
    mem = model.memory.new_memory(2)
    per = W // c.memory_chunk  # 4 entries per segment, 4 slots: the second write evicts the first four
    h = torch.randn(2, W, c.d_model)
    with torch.no_grad():
        mem.write(h)
        assert mem.buffer_ids == [0, 1, 2, 3] and len(mem.stores[0]) == 0
        mem.usage = torch.tensor([[0.1, 3.0, 0.2, 2.0], [5.0, 0.0, 0.0, 1.0]])  # what reads would have left
        mem.write(torch.randn(2, W, c.d_model))
    assert mem.buffer_ids == [4, 5, 6, 7]
    kept = M.consolidated_count(per, c.consolidate_fraction)
    assert kept == 2
    assert sorted(mem.stores[0]._id_to_label) == [1, 3] and sorted(mem.stores[1]._id_to_label) == [0, 3]
    assert mem.stores[0].get(1) == {"segment": 0, "usage": 3.0}
    bank = torch.cat(mem.bank, dim=1)
    # FAISS returns our ids, and an id indexes the bank: the stored vector is the entry itself
    _, found, meta = mem.stores[0].search(bank[0, 3].unsqueeze(0), 1)
    assert found[0, 0] == 3 and meta[0][0]["segment"] == 0
    assert M.store_sizes(3, W, c) == [0, kept]


def test_the_semantic_store_has_the_query_dimension_and_checks_it():
    model = build()
    mem = model.memory.new_memory(1)
    assert mem.stores[0].dim == model.config.memory_dim == model.memory.reader.query.out_features
    with torch.no_grad():
        for _ in range(3):
            mem.write(torch.randn(1, W, model.config.d_model))
    assert len(mem.stores[0]) > 0
    with pytest.raises(ValueError, match="dimension"):
        mem.retrieve(torch.randn(1, 2, model.config.memory_dim + 1))


def test_gradients_reach_the_write_path_through_retrieved_entries_only():
    """Empty the episodic buffer after the writes: what the reader returns then comes from the
    semantic store alone, and its gradient must still reach the write projection and the SSM."""
    model = build()
    mem = model.memory.new_memory(1)
    for _ in range(3):
        mem.write(torch.randn(1, W, model.config.d_model))
    mem.buffer, mem.buffer_ids, mem.usage = None, [], None
    out = model.memory.reader(torch.randn(1, 5, model.config.d_model), mem)
    out.square().sum().backward()
    assert model.memory.write.weight.grad.abs().sum() > 0
    assert model.memory.ssm.x_proj.weight.grad.abs().sum() > 0


def test_episodic_entries_come_from_the_one_projection_path():
    """What a segment writes is the SSM over write(h) at every chunk end, the same numbers the
    recurrent step gives token by token (one projection for every input shape)."""
    model = build()
    c = model.config
    mem = model.memory.new_memory(1)
    h = torch.randn(1, W, c.d_model)
    with torch.no_grad():
        mem.write(h)
        state, outs = None, []
        for t in range(W):
            y, state = model.memory.ssm.step(model.memory.write(h[:, t]), state)
            outs.append(y)
    stepped = torch.stack(outs, dim=1)[:, c.memory_chunk - 1 :: c.memory_chunk]
    assert torch.allclose(mem.bank[0], stepped, atol=1e-5)
    assert torch.allclose(mem.state, state, atol=1e-5)


# ============================================================================== FLOPs


def test_memory_extra_flops_predict_the_work_done(monkeypatch):
    model = build().train()
    rec = Recorder(monkeypatch)
    ids = rand_ids(2, 5 * W, seed=6)
    loss, _ = model.loss({"input_ids": ids, "labels": ids})
    loss.backward()
    mem = rec.made[-1]
    c = model.config
    ssm = sum(M.extra_flops_of(2, W, c.memory_dim, c.memory_state, backward=True, with_state0=s > 0) for s in range(4))
    sizes = M.store_sizes(5, W, c)
    assert len(mem.stores[0]) == sizes[-1] and mem.segments == 4  # the last segment is never written
    searched = sum(2 * 2 * W * n * c.memory_dim for n in sizes)
    assert mem.search_flops == searched > 0
    assert model.extra_flops({"input_ids": ids}) == ssm + searched
    assert model.extra_flops({"input_ids": ids[:, :W]}) == 0  # one window: the plain model
    assert build(memory=False).extra_flops({"input_ids": ids}) == 0


def test_store_sizes_by_hand():
    c = build().config  # 4 entries per segment, 4 slots, half of the evicted kept
    assert M.store_sizes(6, W, c) == [0, 2, 4, 6, 8]
    c2 = build(episodic_slots=6, consolidate_fraction=1.0).config
    assert M.store_sizes(4, W, c2) == [0, 2, 6]


def test_the_model_returns_its_documented_outputs_with_and_without_memory():
    """forward_all -> (hidden [B, T, d], logits [B, T, V], one RouterStats per MoE layer), and
    loss -> (scalar, aux with the same keys) whether a text is read in one window or in segments."""
    model = build()
    ids = rand_ids(2, W, seed=7)
    h, logits, stats = model.forward_all(ids)
    assert h.shape == (2, W, 32) and logits.shape == (2, W, V) and len(stats) == model.config.n_moe_layers
    assert all(s.balance_loss.dim() == 0 and s.z_loss.dim() == 0 and s.load.shape == (4,) for s in stats)
    expected = {"lm_loss", "balance_loss", "z_loss", "expert_load_max", *(f"load_e{i}" for i in range(4))}
    short = model.loss({"input_ids": ids, "labels": ids})
    long_ids = rand_ids(2, 3 * W, seed=8)
    long = model.loss({"input_ids": long_ids, "labels": long_ids})
    for loss, aux in (short, long):
        assert loss.dim() == 0 and set(aux) == expected
    with torch.no_grad():  # the long loss is the mean over every token of every segment
        lp = torch.log_softmax(model.logits(long_ids).float(), dim=-1)
        nll = -lp.gather(-1, long_ids[:, :, None]).sum()  # labels = ids here: each position scores its own token
    assert float(long[1]["lm_loss"]) == pytest.approx(float(nll) / long_ids.numel(), rel=1e-5)


# ============================================================================== the long-term store


def _fill_longterm(model, steps=2, seed=9):
    """Train-mode reads of long documents, handed to the long-term store as stage 2 does."""
    model.train()
    model.collect_consolidated = True
    for step in range(steps):
        ids = rand_ids(2, 4 * W, seed=seed + step)
        model.loss({"input_ids": ids, "labels": ids})
        pending, _ = model.take_pending()
        ids_, vecs, usage = (np.concatenate(p, axis=0) for p in zip(*pending))
        model.longterm.add_step(step, 2, ids_, vecs, usage)
    return model.eval()


def test_longterm_store_ids_metadata_and_capacity():
    model = build()
    lt = model.longterm
    assert lt is not None and lt.store.dim == model.config.memory_dim and build(longterm_capacity=0).longterm is None
    entries = np.array([[1, 4], [0, 2]])
    vecs = np.random.default_rng(0).standard_normal((2, 2, model.config.memory_dim)).astype(np.float32)
    assert lt.add_step(3, 2, entries, vecs, np.ones((2, 2))) == 4
    per_doc = lt.per_document  # 4 segments x 16 tokens / chunk 4
    assert per_doc == 16
    expected = sorted([(3 * 2 + 0) * 16 + 1, (3 * 2 + 0) * 16 + 4, (3 * 2 + 1) * 16 + 0, (3 * 2 + 1) * 16 + 2])
    assert sorted(lt.store._id_to_label) == expected
    assert lt.store.get((3 * 2 + 1) * 16 + 2) == {"step": 3, "row": 1, "entry": 2, "usage": 1.0}
    assert np.allclose(lt.store.vectors([(3 * 2 + 1) * 16 + 2]), vecs[1, 1])
    small = build(longterm_capacity=5).longterm
    small.add_step(0, 2, entries, vecs, np.ones((2, 2)))
    small.add_step(1, 2, entries, vecs, np.ones((2, 2)))
    # step 0 added ids 1, 4, 16, 18 and step 1 33, 36, 48, 50: the three oldest went first
    assert sorted(small.store._id_to_label) == [18, 33, 36, 48, 50]


def test_reads_of_the_longterm_store_are_exact_causal_and_reach_short_texts(monkeypatch):
    model = _fill_longterm(build())
    assert len(model.longterm) > 0
    ids = rand_ids(2, 3 * W + 5, seed=11)
    with torch.no_grad():
        full = torch.log_softmax(model.logits(ids).float(), dim=-1)
        short = model.logits(ids[:, :W])
        saved, model.longterm = model.longterm, None
        without = model.logits(ids[:, :W])
        model.longterm = saved
        assert not torch.allclose(short, without, atol=1e-4)  # a text within the window reads it too
        changed = ids.clone()
        changed[:, W + 3] = (changed[:, W + 3] + 1) % V
        out = model.logits(changed)
        base = model.logits(ids)
        assert torch.allclose(out[:, : W + 3], base[:, : W + 3], atol=1e-6)
        # continuations of one context read it once (score_continuations), long-term reads included
        context, conts = ids[0, : 2 * W + 3].tolist(), [ids[1, :3].tolist(), ids[1, 3:4].tolist()]
        shared = model.score_continuations([(context, conts)])[0]
        plain = LanguageModel.score_continuations(model, [(context, conts)])[0]
    assert [round(a, 5) for a, _ in shared] == [round(b, 5) for b, _ in plain]
    first = torch.tensor(context[1:] + conts[1][:1])
    assert shared[1][0] == pytest.approx(float(full[0, 2 * W + 2, conts[1][0]]), abs=1e-5)
    assert first.numel() == 2 * W + 3


def test_the_longterm_store_is_saved_and_loaded_with_the_model(tmp_path):
    model = _fill_longterm(build())
    model.save_artifacts(tmp_path)
    assert (tmp_path / "semantic" / "index.faiss").exists()
    fresh = build()
    assert len(fresh.longterm) == 0
    fresh.load_state_dict(model.state_dict())
    fresh.load_artifacts(tmp_path)
    ids = rand_ids(1, 2 * W, seed=12)
    with torch.no_grad():
        assert torch.equal(fresh.logits(ids), model.logits(ids))
    assert sorted(fresh.longterm.store._id_to_label) == sorted(model.longterm.store._id_to_label)
    fresh_empty = build()
    fresh_empty.load_artifacts(tmp_path / "nothing-here")  # a stage-1 run has no store: stays empty
    assert len(fresh_empty.longterm) == 0
    with pytest.raises(ValueError, match="dim"):
        build(d_model=48, n_heads=4).load_artifacts(tmp_path)  # memory_dim 24, the store's 16


def test_only_training_reads_are_handed_to_the_longterm_store():
    model = build().train()
    ids = rand_ids(2, 4 * W, seed=13)
    model.loss({"input_ids": ids, "labels": ids})
    assert model.take_pending() == ([], 0)  # nothing is kept unless a runner collects (no leak in a plain loop)
    model.collect_consolidated = True
    model.loss({"input_ids": ids, "labels": ids})
    pending, _ = model.take_pending()
    assert len(pending) == 1 and pending[0][0].shape == (2, M.store_sizes(4, W, model.config)[-1])
    assert model.take_pending() == ([], 0)
    with torch.no_grad():
        model.loss({"input_ids": ids, "labels": ids})
    model.eval()
    model.loss({"input_ids": ids, "labels": ids})
    assert model.take_pending() == ([], 0)
