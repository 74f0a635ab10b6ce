"""The gpt2-hsm architecture (issue 5, item 6): the Huffman tree (a hand-checked example, add-one
smoothing, code length within one bit of the entropy), the exact hierarchical-softmax head (the
full distribution sums to one at any norm, path and full log-probs agree, the loss gradient
equals autograd through an explicit product of sigmoids, depth-bucketed paths give the padded
losses and gradients, with optimal bucket caps), what of the contract is its own (scores and loss
from the tree, top-k and top-p sampling from the exact full distribution, tree descent), save/load
with the tree artifact, and a CLI run scored by the lm-eval adapter (the contract itself is
tests/test_contract.py's)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch

from conftest import no_deprecations, row_generators, run_cli, store_home
from hmst_bench_gpt2_hsm.head import HSMHead
from hmst_bench_gpt2_hsm.tree import HuffmanTree, build_tree

# ============================================================================== tree


def depths_by_walking(tree: HuffmanTree) -> list[int]:
    """Leaf depths found independently of `paths()`: a plain walk down from the root."""
    v = tree.vocab_size
    depth = [0] * v
    stack = [(tree.root, 0)]
    while stack:
        node, d = stack.pop()
        for child in (int(tree.left[node]), int(tree.right[node])):
            if child >= v - 1:
                depth[child - (v - 1)] = d + 1
            else:
                stack.append((child, d + 1))
    return depth


def zipf_counts(v: int, s: float = 1.1, top: float = 1e6) -> np.ndarray:
    return (top / np.arange(1, v + 1) ** s).astype(np.int64)


def test_hand_checked_tree():
    # counts [5, 1, 1, 1] -> smoothed [6, 2, 2, 2]; leaves are nodes 3..6 (token t is node 3 + t).
    # heap (weight, id): (6,3) (2,4) (2,5) (2,6)
    #   merge 0: pop (2,4) (2,5)  -> left[0] = 4 (token 1), right[0] = 5 (token 2); push (4,0)
    #   merge 1: pop (2,6) (4,0)  -> left[1] = 6 (token 3), right[1] = 0;           push (6,1)
    #   merge 2: pop (6,1) (6,3)  -> left[2] = 1, right[2] = 3 (token 0)   (tie: id 1 < id 3)
    # root 2.  token 0: 2 -R-> leaf                   nodes [2]      signs [-1]         depth 1
    #          token 1: 2 -L-> 1 -R-> 0 -L-> leaf    nodes [2,1,0]  signs [+1,-1,+1]   depth 3
    #          token 2: 2 -L-> 1 -R-> 0 -R-> leaf    nodes [2,1,0]  signs [+1,-1,-1]   depth 3
    #          token 3: 2 -L-> 1 -L-> leaf           nodes [2,1]    signs [+1,+1]      depth 2
    # expected code length (6*1 + 2*3 + 2*3 + 2*2) / 12 = 22/12; entropy 1/2 + 1/2 log2 6
    tree = build_tree([5, 1, 1, 1])
    assert tree.counts.tolist() == [6, 2, 2, 2]
    assert tree.left.tolist() == [4, 6, 1] and tree.right.tolist() == [5, 0, 3]
    assert tree.root == 2
    nodes, signs, mask = tree.paths()
    assert nodes.tolist() == [[2, 0, 0], [2, 1, 0], [2, 1, 0], [2, 1, 0]]
    assert signs.tolist() == [[-1, 0, 0], [1, -1, 1], [1, -1, -1], [1, 1, 0]]
    assert mask.tolist() == [[True, False, False], [True, True, True], [True, True, True], [True, True, False]]
    assert mask.sum(1).tolist() == depths_by_walking(tree) == [1, 3, 3, 2]
    assert [lvl.tolist() for lvl in tree.levels()] == [[2], [1], [0]]
    assert tree.top_down() == [2, 1, 0]
    assert tree.expected_code_length() == pytest.approx(22 / 12, abs=1e-12)
    assert tree.entropy_bits() == pytest.approx(0.5 + 0.5 * math.log2(6), abs=1e-12)


def test_add_one_smoothing_gives_every_token_a_leaf():
    counts = np.zeros(50, dtype=np.int64)
    counts[[3, 7, 8]] = [1000, 10, 1]  # 47 tokens never seen
    tree = build_tree(counts)
    assert tree.counts.tolist() == (counts + 1).tolist()
    tree.check()
    depth = depths_by_walking(tree)
    _, _, mask = tree.paths()
    assert all(d >= 1 for d in depth) and mask.sum(1).tolist() == depth
    assert depth[3] == 1  # 1001 of 1107: the frequent token sits right under the root
    two = build_tree(np.zeros(2, dtype=np.int64))  # V=2: one decision, leaves are nodes 1 and 2
    assert (two.left.tolist(), two.right.tolist(), two.paths()[2].tolist()) == ([1], [2], [[True], [True]])
    with pytest.raises(ValueError, match="at least two tokens"):
        build_tree([7])


def test_check_accepts_built_trees_and_rejects_broken_ones():
    for counts in ([5, 1, 1, 1], [0, 0], zipf_counts(300), np.full(64, 3)):
        tree = build_tree(counts)
        tree.check()
        HuffmanTree.from_arrays(tree.to_arrays())
    t = build_tree([5, 1, 1, 1])  # left [4, 6, 1], right [5, 0, 3]
    broken = [
        (t.left.copy(), np.array([5, 0, 5])),  # leaf 5 twice, token 0 (node 3) has no parent
        (np.array([4, 6, 2]), t.right.copy()),  # the root as a child of itself
        (t.left[:2].copy(), t.right.copy()),  # too few internal nodes
        (np.array([4, 6, 1]), np.array([5, 0, 7])),  # node 7 does not exist
    ]
    for left, right in broken:
        bad = HuffmanTree(t.counts, left, right)
        with pytest.raises(ValueError, match="not a binary tree"):
            bad.check()
        with pytest.raises(ValueError):
            HuffmanTree.from_arrays(bad.to_arrays())


def test_check_rejects_a_cycle():
    # V=4: root 2 -> (leaf 3, leaf 4); internal 0 -> (1, leaf 5); internal 1 -> (0, leaf 6).
    # Every node but the root is a child exactly once, yet tokens 2 and 3 are unreachable.
    bad = HuffmanTree(np.ones(4, dtype=np.int64), np.array([1, 0, 3]), np.array([5, 6, 4]))
    with pytest.raises(ValueError):
        bad.check()


@pytest.mark.parametrize("name, counts", [
    ("zipf-5000", zipf_counts(5000)),
    ("uniform-5000", np.full(5000, 40)),
    ("uniform-4096", np.full(4096, 40)),
])
def test_expected_code_length_within_one_bit_of_entropy(name, counts):
    tree = build_tree(counts)
    h, length = tree.entropy_bits(), tree.expected_code_length()
    p = tree.counts / tree.counts.sum()  # the same figures computed here, from the smoothed counts
    assert h == pytest.approx(float(-(p * np.log2(p)).sum()), rel=1e-12)
    assert length == pytest.approx(float((p * np.array(depths_by_walking(tree))).sum()), rel=1e-12)
    assert h <= length + 1e-12 and length < h + 1
    if name == "uniform-4096":
        assert length == 12.0  # a perfect binary tree
    if name == "zipf-5000":
        assert h < 9 < math.log2(5000)  # skewed counts: far shorter than a balanced tree's 12.3 bits


def test_a_50k_vocabulary_builds():
    tree = build_tree(zipf_counts(50_000, top=1e8))  # O(V log V) heap; no timing asserted
    tree.check()
    nodes, signs, mask = tree.paths()
    assert nodes.shape == signs.shape == mask.shape and nodes.shape[0] == 50_000
    assert mask[:, 0].all() and (nodes[:, 0] == tree.root).all()
    assert tree.entropy_bits() <= tree.expected_code_length() < tree.entropy_bits() + 1


def test_arrays_round_trip(tmp_path):
    tree = build_tree(zipf_counts(777))
    again = HuffmanTree.from_arrays(tree.to_arrays())
    np.savez(tmp_path / "t.npz", **tree.to_arrays())
    with np.load(tmp_path / "t.npz") as arrays:
        from_file = HuffmanTree.from_arrays(arrays)
    for other in (again, from_file):
        for key in ("counts", "left", "right"):
            assert np.array_equal(getattr(other, key), getattr(tree, key))
            assert getattr(other, key).dtype == np.int64
        for a, b in zip(other.paths(), tree.paths()):
            assert np.array_equal(a, b)


# ============================================================================== head


def random_head(d: int, counts, seed: int = 0, dtype=torch.float32) -> HSMHead:
    torch.manual_seed(seed)
    head = HSMHead(d, len(counts))
    head.set_tree(build_tree(counts))
    with torch.no_grad():
        head.weight.normal_(0, d ** -0.5)
        head.bias.normal_()
    return head.to(dtype)


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0, 100.0])
def test_full_distribution_sums_to_one(scale):
    head = random_head(32, zipf_counts(1000, top=1e4))
    h = torch.randn(16, 32, generator=torch.Generator().manual_seed(1)) * scale
    with torch.no_grad():
        lp = head.all_logprobs(h)
    assert lp.shape == (16, 1000)
    assert torch.isfinite(lp).all() and (lp <= 0).all()
    assert torch.allclose(torch.logsumexp(lp.double(), -1), torch.zeros(16, dtype=torch.double), atol=1e-5)
    assert torch.allclose(torch.logsumexp(lp, -1), torch.zeros(16), atol=1e-5)


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
def test_path_logprobs_equal_the_full_distribution(scale):
    v, n = 37, 8
    head = random_head(12, np.random.default_rng(0).integers(0, 50, v))
    h = torch.randn(n, 12, generator=torch.Generator().manual_seed(2)) * scale
    with torch.no_grad():
        full = head.all_logprobs(h)  # [n, v]
        paths = head.path_logprobs(h.repeat_interleave(v, 0), torch.arange(v).repeat(n)).view(n, v)
    assert torch.allclose(paths, full, atol=1e-5, rtol=1e-6)


def test_large_logits_stay_finite():
    """Scale 100 gives node logits of several hundred: log(sigmoid(x)) would be -inf there."""
    head = random_head(32, zipf_counts(500, top=1e4))
    h = torch.randn(8, 32, generator=torch.Generator().manual_seed(3)) * 100
    with torch.no_grad():
        node_logits = h @ head.weight.t() + head.bias
        assert torch.isinf(torch.log(torch.sigmoid(-node_logits.abs().max()))), "the test needs logits that underflow"
        full = head.all_logprobs(h)
        paths = head.path_logprobs(h.repeat_interleave(500, 0), torch.arange(500).repeat(8)).view(8, 500)
    assert torch.isfinite(full).all() and torch.isfinite(paths).all()
    assert full.min() < -1000  # really far out in the tail, and still finite
    assert torch.allclose(paths, full, rtol=1e-5, atol=1e-4)
    assert torch.allclose(torch.logsumexp(full.double(), -1), torch.zeros(8, dtype=torch.double), atol=1e-5)


def explicit_logprobs(tree: HuffmanTree, weight, bias, h):
    """[N, V] log p built the slow way: for each token walk leaf -> root through parent links
    taken from tree.left/right, multiplying sigmoid(+logit) for a left turn, sigmoid(-logit) for
    a right one."""
    v = tree.vocab_size
    parent = {}
    for n in range(v - 1):
        parent[int(tree.left[n])] = (n, 1.0)
        parent[int(tree.right[n])] = (n, -1.0)
    columns = []
    for token in range(v):
        node, p = v - 1 + token, torch.ones(h.shape[0], dtype=h.dtype)
        while node in parent:
            n, sign = parent[node]
            p = p * torch.sigmoid(sign * (h @ weight[n] + bias[n]))
            node = n
        assert node == tree.root
        columns.append(p)
    return torch.log(torch.stack(columns, 1))


SMALL_COUNTS = [10, 5, 3, 2, 1, 1, 0]  # V=7, smoothed [11, 6, 4, 3, 2, 2, 1]: leaf depths 1 to 5
TARGETS = torch.tensor([0, 3, 6, 2, 6, 1])


def gradients(head, h, targets, explicit: bool):
    head.zero_grad()
    h = h.detach().clone().requires_grad_(True)
    if explicit:
        lp = explicit_logprobs(head.tree, head.weight, head.bias, h)[torch.arange(len(targets)), targets]
    else:
        lp = head.path_logprobs(h, targets)
    (-lp.mean()).backward()
    return head.weight.grad.clone(), head.bias.grad.clone(), h.grad.clone(), lp.detach()


def test_loss_gradient_equals_explicit_construction():
    head = random_head(5, SMALL_COUNTS, dtype=torch.float64)
    assert depths_by_walking(head.tree) == [1, 3, 3, 3, 5, 4, 5]  # an unbalanced tree
    h = torch.randn(len(TARGETS), 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = explicit_logprobs(head.tree, head.weight, head.bias, h)
        assert torch.allclose(ref.exp().sum(-1), torch.ones(len(h), dtype=torch.float64), atol=1e-12)
        assert torch.allclose(head.all_logprobs(h).double(), ref, atol=1e-6)
    *want, lp_want = gradients(head, h, TARGETS, explicit=True)
    *got, lp_got = gradients(head, h, TARGETS, explicit=False)
    # float32 here, hence 1e-6 (the float64 test below is exact to 1e-10)
    assert torch.allclose(lp_got.double(), lp_want, atol=1e-6)
    for g, w in zip(got, want):
        assert torch.allclose(g.double(), w, atol=1e-6, rtol=0)
    assert (want[0].abs().sum(1) > 0).sum() >= 4  # many node rows receive gradient


def test_loss_gradient_is_exact_in_float64():
    head = random_head(5, SMALL_COUNTS, dtype=torch.float64)
    h = torch.randn(len(TARGETS), 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    *want, lp_want = gradients(head, h, TARGETS, explicit=True)
    *got, lp_got = gradients(head, h, TARGETS, explicit=False)
    assert lp_got.dtype == torch.float64 and torch.allclose(lp_got, lp_want, atol=1e-10, rtol=0)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-10, rtol=0)


def test_gradcheck_path_logprobs():
    head = random_head(5, SMALL_COUNTS, dtype=torch.float64)
    h = torch.randn(len(TARGETS), 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    weight = head.weight.detach().clone().requires_grad_(True)
    bias = head.bias.detach().clone().requires_grad_(True)

    class PathLogprobs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, h):
            return self.head.path_logprobs(h, TARGETS)

    def f(h, weight, bias):
        return torch.func.functional_call(PathLogprobs(), {"head.weight": weight, "head.bias": bias}, (h,))

    assert torch.autograd.gradcheck(f, (h, weight, bias))


# ------------------------------------------------------------------------------ depth buckets


def test_bucket_caps_by_hand():
    from hmst_bench_gpt2_hsm.head import bucket_caps

    # depths 1 1 2 3 3 3 5 -> hist [0, 2, 1, 3, 0, 1]
    # 1 bucket: [5], 7 * 5 = 35 rows.  2 buckets: [1, 5] 2 + 25 = 27, [2, 5] 6 + 20 = 26,
    # [3, 5] 18 + 5 = 23 (best).  3 buckets: [1, 3, 5] 2 + 12 + 5 = 19, [2, 3, 5] 6 + 9 + 5 = 20,
    # [1, 2, 5] 2 + 2 + 20 = 24 -> [1, 3, 5].  4 buckets: every depth its own, 2 + 2 + 9 + 5 = 18
    hist = [0, 2, 1, 3, 0, 1]
    assert bucket_caps(hist, 1) == [5]
    assert bucket_caps(hist, 2) == [3, 5]
    assert bucket_caps(hist, 3) == [1, 3, 5]
    assert bucket_caps(hist, 4) == bucket_caps(hist, 9) == [1, 2, 3, 5]
    assert bucket_caps([0, 0, 4], 3) == [2] and bucket_caps([0, 0], 2) == []


def test_bucket_caps_are_optimal():
    """Against every way of cutting the distinct depths into at most b contiguous groups."""
    import itertools

    from hmst_bench_gpt2_hsm.head import bucket_caps

    def rows(hist, caps):
        lo, total = 0, 0
        for c in caps:
            total += sum(hist[lo : c + 1]) * c
            lo = c + 1
        return total

    rng = np.random.default_rng(0)
    for _ in range(40):
        hist = [int(x) for x in rng.integers(0, 6, rng.integers(2, 10))]
        ds = [k for k, n in enumerate(hist) if n]
        if not ds:
            continue
        for b in range(1, 5):
            best = min(rows(hist, list(cut) + [ds[-1]])
                       for m in range(min(b, len(ds)))
                       for cut in itertools.combinations(ds[:-1], m))
            caps = bucket_caps(hist, b)
            assert caps[-1] == ds[-1] and len(caps) <= b and caps == sorted(set(caps))
            assert rows(hist, caps) == best


def bucketed_and_padded(head, h, targets, buckets):
    """(log-probs, weight grad, bias grad, h grad) of -mean path log-prob, bucketed and padded."""
    out = []
    for padded in (False, True):
        head.zero_grad()
        x = h.detach().clone().requires_grad_(True)
        head.depth_buckets = buckets
        lp = head.padded_path_logprobs(x, targets) if padded else head.path_logprobs(x, targets)
        (-lp.mean()).backward()
        out.append((lp.detach(), head.weight.grad.clone(), head.bias.grad.clone(), x.grad.clone()))
    return out


@pytest.mark.parametrize("buckets", [1, 2, 3, 4, 6])
def test_bucketed_equals_padded_in_float64(buckets):
    """A Zipf tree with 9 distinct leaf depths, so buckets hold several depths and still pad;
    losses and all gradients equal the padded computation to rounding (float64, 1e-12), and the
    log-probs equal the explicit product of sigmoids."""
    counts = zipf_counts(200, top=1e4)
    head = random_head(8, counts, dtype=torch.float64)
    targets = torch.from_numpy(np.random.default_rng(1).choice(200, 300, p=counts / counts.sum()))
    depths = head.path_depth[targets]
    assert len(depths.unique()) >= 7 and len(head.path_depth.unique()) >= 9
    h = torch.randn(300, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    bucketed, padded = bucketed_and_padded(head, h, targets, buckets)
    for got, want in zip(bucketed, padded):
        assert torch.allclose(got, want, atol=1e-12, rtol=0)
    with torch.no_grad():
        explicit = explicit_logprobs(head.tree, head.weight, head.bias, h)[torch.arange(300), targets]
    assert torch.allclose(bucketed[0], explicit, atol=1e-12, rtol=0)
    assert (bucketed[1].abs().sum(1) > 0).sum() > 50  # many node rows receive gradient


def test_bucketed_equals_padded_in_float32_and_without_grads():
    counts = zipf_counts(2000, top=1e5)
    head = random_head(32, counts)
    targets = torch.from_numpy(np.random.default_rng(2).choice(2000, 1000, p=counts / counts.sum()))
    h = torch.randn(1000, 32, generator=torch.Generator().manual_seed(8))
    bucketed, padded = bucketed_and_padded(head, h, targets, 4)
    for got, want in zip(bucketed, padded):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
    head.zero_grad()
    with torch.no_grad():  # evaluation
        assert torch.allclose(head.path_logprobs(h, targets), padded[0], atol=1e-6, rtol=1e-5)
    head.weight.requires_grad_(False)  # only h needs a gradient
    x = h.clone().requires_grad_(True)
    (-head.path_logprobs(x, targets).mean()).backward()
    assert torch.allclose(x.grad, padded[3], atol=1e-6, rtol=1e-5) and head.weight.grad is None
    head.weight.requires_grad_(True)
    (-head.path_logprobs(h, targets).mean()).backward()  # only the weights need one
    assert torch.allclose(head.weight.grad, padded[1], atol=1e-6, rtol=1e-5)
    assert head.path_logprobs(h[:0], targets[:0]).shape == (0,)


def test_bucketed_under_autocast():
    """bf16 autocast (as --mixed-precision on a CPU): the bucketed loss and gradients match the
    padded computation under the same autocast to bf16 precision, in the parameters' dtypes."""
    counts = zipf_counts(500, top=1e4)
    head = random_head(32, counts)
    targets = torch.from_numpy(np.random.default_rng(3).choice(500, 256, p=counts / counts.sum()))
    h = torch.randn(256, 32, generator=torch.Generator().manual_seed(9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bucketed, padded = bucketed_and_padded(head, h, targets, 4)
    assert bucketed[1].dtype == bucketed[3].dtype == torch.float32
    for got, want in zip(bucketed, padded):
        assert torch.allclose(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def explicit_descent(tree: HuffmanTree, weight, bias, h) -> list[int]:
    v, out = tree.vocab_size, []
    for row in h:
        node = tree.root
        while node < v - 1:
            node = int(tree.left[node]) if float(weight[node] @ row + bias[node]) >= 0 else int(tree.right[node])
        out.append(node - (v - 1))
    return out


@pytest.mark.parametrize("scale", [0.3, 100.0])
def test_descend_follows_the_likelier_branch(scale):
    head = random_head(16, zipf_counts(300, top=1e4))
    h = torch.randn(64, 16, generator=torch.Generator().manual_seed(6)) * scale
    with torch.no_grad():
        got = head.descend(h)
        full = head.all_logprobs(h)
    assert got.tolist() == explicit_descent(head.tree, head.weight.detach(), head.bias.detach(), h)
    # a leaf holding more than half the mass is the argmax; at large norms that is the usual case
    peaked = full.gather(1, got[:, None])[:, 0].exp() > 0.5
    assert torch.equal(got[peaked], full.argmax(-1)[peaked])
    if scale == 100.0:
        assert peaked.float().mean() > 0.8


# ============================================================================== model


@pytest.fixture(scope="module")
def corpus_data(bench_home):
    from hmst_bench.data.corpora import load_corpus
    from hmst_bench.data.tokenizer import train_tokenizer
    from hmst_bench.data.tokens import encode_corpus

    with pytest.MonkeyPatch.context() as mp:  # module fixtures start before the autouse home
        mp.setenv("HMST_BENCH_HOME", str(bench_home))
        corpus = load_corpus("synthetic-facts")
        tok = train_tokenizer(corpus.split["train"], 512, cache_key=corpus.fingerprint)
        return tok, encode_corpus(corpus, tok).train


@pytest.fixture(scope="module")
def tok(corpus_data):
    return corpus_data[0]


def build(corpus_data, seed=0, prepare=True, **overrides):
    from hmst_bench.plugins import get_registry

    tok, train_tokens = corpus_data
    spec = get_registry().arch("gpt2-hsm")
    cfg = dataclasses.replace(spec.make_config("micro", {"max_seq_len": 32, **overrides}), vocab_size=len(tok))
    torch.manual_seed(seed)
    model = spec.build(cfg, tok).eval()
    with torch.no_grad():  # larger random weights make the distributions far from uniform
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    if prepare:
        model.prepare(train_tokens)
    return model


@pytest.fixture(scope="module")
def model(corpus_data):
    return build(corpus_data)


def rand_ids(tok, b, t, seed):
    return torch.randint(3, len(tok), (b, t), generator=torch.Generator().manual_seed(seed))


def test_prepare_installs_the_corpus_tree(corpus_data, model):
    _, train_tokens = corpus_data
    counts = np.bincount(train_tokens, minlength=model.config.vocab_size) + 1
    assert np.array_equal(model.head.tree.counts, counts)
    fresh = build(corpus_data, prepare=False)
    assert (fresh.head.tree.counts == 1).all()  # the placeholder tree before prepare
    assert model.head.tree.expected_code_length() < fresh.head.tree.expected_code_length()


def test_token_logprobs_gather_next_token_logprobs_and_score_flags_argmax(model, tok):
    x = rand_ids(tok, 2, 20, 3)
    with torch.no_grad():
        dists = torch.stack([model.next_token_logprobs(x[:, : t + 1]) for t in range(20)], 1)  # [2, 20, V]
        targets = torch.roll(x, -1, 1)
        targets[:, ::2] = dists.argmax(-1)[:, ::2]  # half the targets greedy, half random
        lp = model.token_logprobs(x, targets)
        s_lp, greedy = model.score(x, targets)
        loss, aux = model.loss({"input_ids": x, "labels": targets})
    assert torch.allclose(lp, dists.gather(-1, targets[..., None])[..., 0], atol=1e-5)
    assert torch.equal(s_lp, lp)
    assert torch.equal(greedy, dists.argmax(-1) == targets)
    assert greedy[:, ::2].all() and greedy.sum() < greedy.numel()
    assert torch.allclose(loss, -lp.mean(), atol=1e-6) and aux == {}


def cache_free_greedy(model, prompt, n):
    seq, out = prompt.clone(), []
    for _ in range(n):
        t = model.next_token_logprobs(seq).argmax(-1)
        out.append(int(t[0]))
        seq = torch.cat([seq, t[:, None]], 1)
    return out


def test_generation_uses_no_deprecated_transformers_api(model, tok):
    """The GPT-2 backbone gets its KV cache as `cache`, not the deprecated `past_key_values`."""
    prompt = rand_ids(tok, 2, 20, 7)
    with torch.no_grad(), no_deprecations():
        out = model.generate(prompt, max_new_tokens=20)
    assert [len(row) for row in out] == [20, 20]


def frequencies_match(tokens: torch.Tensor, support: torch.Tensor, probs: torch.Tensor) -> None:
    """Only `support` is drawn, each token within 5 binomial sd of its probability."""
    assert torch.isin(tokens, support).all(), "drew a token outside the allowed set"
    for token, p in zip(support.tolist(), probs.tolist()):
        freq = float((tokens == token).double().mean())
        assert abs(freq - p) <= 5 * math.sqrt(p * (1 - p) / tokens.numel()) + 1e-9, (token, freq, p)


TOPK_ROWS = 5_000  # one prompt repeated: one draw per row from the same distribution


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_top_k_samples_the_exact_full_distribution(model, tok, temperature):
    """top_k=2 draws only the two most likely leaves of the full distribution (every leaf's path
    sum, `next_token_logprobs`), with frequencies p_i^(1/T) renormalised over the two: exact at
    any temperature, which ancestral sampling down the tree would not be."""
    prompt = rand_ids(tok, 1, 6, 21)
    with torch.no_grad():
        full = model.next_token_logprobs(prompt)[0].double()
        top = full.topk(3)
        assert float(top.values[0] - top.values[1]) > 0.05 and float(top.values[1] - top.values[2]) > 1e-4
        rows = model.generate(prompt.expand(TOPK_ROWS, -1), 1, temperature=temperature, top_k=2,
                              generators=row_generators(prompt.expand(TOPK_ROWS, -1), 11))
    two = top.indices[:2]
    want = (full[two] / temperature).softmax(0)  # by hand: e^(lp_i/T) / (e^(lp_1/T) + e^(lp_2/T))
    frequencies_match(torch.tensor(rows)[:, 0], two, want)


def test_top_k_with_top_p_and_top_k_one_on_the_full_distribution(model, tok):
    prompt = rand_ids(tok, 1, 6, 22)
    with torch.no_grad():
        full = model.next_token_logprobs(prompt)[0].double()
        top = full.topk(3)
        q = top.values.softmax(0)  # the top 3, renormalised (temperature 1)
        # top_p halfway into the second token: the first two stay, the third (mass before it
        # q1 + q2 >= top_p) goes; the two are drawn in proportion q1 : q2
        top_p = float(q[0] + q[1] / 2)
        rows = model.generate(prompt.expand(TOPK_ROWS, -1), 1, temperature=1.0, top_k=3, top_p=top_p,
                              generators=row_generators(prompt.expand(TOPK_ROWS, -1), 12))
        frequencies_match(torch.tensor(rows)[:, 0], top.indices[:2], q[:2] / q[:2].sum())

        # several steps: top_k=1 at a high temperature is greedy; top_k=3 stays within the top 3
        # of the cache-free full distribution after each prefix
        prompts = rand_ids(tok, 3, 5, 23)
        greedy = model.generate(prompts, 8)
        assert model.generate(prompts, 8, temperature=5.0, top_k=1, generators=row_generators(prompts, 0)) == greedy
        sampled = model.generate(prompts, 8, temperature=5.0, top_k=3, generators=row_generators(prompts, 1))
        assert sampled != greedy
        for prompt_row, row in zip(prompts, sampled):
            seq = prompt_row[None]
            for token in row:
                assert token in model.next_token_logprobs(seq)[0].topk(3).indices.tolist()
                seq = torch.cat([seq, torch.tensor([[token]])], 1)


def test_descent_refuses_sampling(corpus_data, tok, model):
    descent = build(corpus_data, decode="descent")
    descent.load_state_dict(model.state_dict())
    prompt = rand_ids(tok, 2, 6, 7)
    with torch.no_grad():
        greedy = descent.generate(prompt, 5)
        assert descent.generate(prompt, 5, top_k=3, top_p=0.5) == greedy  # greedy: nothing to filter
        for kwargs in ({"top_k": 2}, {"top_p": 0.9}, {}):
            with pytest.raises(ValueError, match="needs decode='exact'"):
                descent.generate(prompt, 5, temperature=0.8, **kwargs)


def test_descent_decoding(corpus_data, tok, model):
    descent = build(corpus_data, decode="descent")
    descent.load_state_dict(model.state_dict())
    prompt = rand_ids(tok, 2, 6, 7)
    with torch.no_grad():
        a = descent.generate(prompt, 12)
        b = descent.generate(prompt, 12)
        # without a cache: descend from the last hidden state, step by step
        seq, want = prompt.clone(), []
        for _ in range(12):
            t = descent.head.descend(descent.hidden(seq[:, -32:])[:, -1])
            want.append(t)
            seq = torch.cat([seq, t[:, None]], 1)
    assert a == b == torch.stack(want, 1).tolist()
    assert all(0 <= t < len(tok) for row in a for t in row)

    # peaked distributions (head weights x100): the descended leaf holds most of the mass at
    # every step, so it is the argmax and descent equals exact greedy decoding
    with torch.no_grad():
        descent.head.weight.mul_(100)
        model_peaked = build(corpus_data)
        model_peaked.load_state_dict(descent.state_dict())
        got = descent.generate(prompt[:1], 12)[0]
        exact = cache_free_greedy(model_peaked, prompt[:1], 12)
        seq = prompt[:1].clone()
        for token in got:
            assert model_peaked.next_token_logprobs(seq)[0, token].exp() > 0.5
            seq = torch.cat([seq, torch.tensor([[token]])], 1)
    assert got == exact


def test_save_load_round_trip(corpus_data, tok, model, tmp_path):
    from hmst_bench.arch import config_to_dict
    from hmst_bench.train.rundir import load_weights, save_weights

    save_weights(tmp_path, model, config_to_dict(model.config))
    model.save_artifacts(tmp_path)
    assert (tmp_path / "hsm_tree.npz").exists()
    again = build(corpus_data, seed=1, prepare=False)
    load_weights(again, tmp_path / "model.safetensors")
    x = rand_ids(tok, 2, 16, 8)
    t = torch.roll(x, -1, 1)
    with torch.no_grad():
        assert not torch.allclose(model.token_logprobs(x, t), again.token_logprobs(x, t))  # the tree matters
        again.load_artifacts(tmp_path)
        for key, arr in model.head.tree.to_arrays().items():
            assert np.array_equal(again.head.tree.to_arrays()[key], arr)
        assert torch.equal(model.token_logprobs(x, t), again.token_logprobs(x, t))
        assert torch.equal(model.next_token_logprobs(x), again.next_token_logprobs(x))
    with pytest.raises(FileNotFoundError, match="hsm_tree.npz is missing"):
        again.load_artifacts(tmp_path / "nowhere")


# ============================================================================== end to end

BUDGET = 5e10


@pytest.fixture(scope="module")
def hsm_run(bench_home, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt2-hsm") / "run"
    run_cli("train", "--arch", "gpt2-hsm", "--size", "micro", "--budget", str(BUDGET), "--corpus", "synthetic-facts",
            "--out", str(out), env={"HMST_BENCH_HOME": str(bench_home)})
    return out


def test_trains_through_the_cli(hsm_run):
    from hmst_bench.data.corpora import load_corpus
    from hmst_bench.data.tokenizer import load_tokenizer
    from hmst_bench.data.tokens import encode_corpus

    info = json.loads((hsm_run / "run.json").read_text())
    assert info["arch"] == "gpt2-hsm" and info["status"] == "complete"
    assert info["achieved_flops"] >= info["budget_flops"] == BUDGET
    assert math.isfinite(info["val_loss"]) and info["final_train_loss"] < math.log(info["config"]["vocab_size"])
    assert (hsm_run / "hsm_tree.npz").exists()
    shares = info["flop_shares"]  # the head's share of a step, measured once the tree is in place
    assert set(shares) == {"backbone", "head"} and 0 < shares["head"] < 1
    assert shares["head"] + shares["backbone"] == pytest.approx(1.0, abs=1e-5)
    with np.load(hsm_run / "hsm_tree.npz") as arrays:
        tree = HuffmanTree.from_arrays(arrays)
    train = encode_corpus(load_corpus("synthetic-facts"), load_tokenizer(hsm_run)).train  # cached by the run
    assert np.array_equal(tree.counts, np.bincount(train, minlength=tree.vocab_size) + 1)


LL_PAIRS = [
    ("Githstin Datoth was born in", " Vyndum"),
    ("Githstin Datoth was born in", " Vyndum in 1821."),
    ("Githstin Datoth was born in", " the"),
    ("Question: where?\nAnswer:", " A"),
    ("The", " city of Vyndum is old."),
]


def test_lm_eval_loglikelihood_is_the_summed_path_logprobs(hsm_run):
    from lm_eval.api.instance import Instance

    from hmst_bench.eval.lm import HmstBenchLM
    from hmst_bench.train.rundir import load_run

    lm = HmstBenchLM(run=str(hsm_run), device="cpu", batch_size=3)
    got = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=a, idx=i)
                            for i, a in enumerate(LL_PAIRS)], disable_tqdm=True)
    run = load_run(hsm_run)
    model, tok = run.model, run.tokenizer
    lengths = set()
    for (context, continuation), (ll, is_greedy) in zip(LL_PAIRS, got):
        ctx = tok.encode(context, add_special_tokens=False)
        cont = tok.encode(context + continuation, add_special_tokens=False)[len(ctx):]
        seq = torch.tensor([ctx + cont])
        lengths.add(min(len(cont), 2))
        with torch.no_grad():
            h = model.hidden(seq[:, :-1])[0, -len(cont):]
            paths = model.head.path_logprobs(h, seq[0, -len(cont):])
            lp = model.token_logprobs(seq[:, :-1], seq[:, 1:])[0, -len(cont):]
            greedy = all(int(model.next_token_logprobs(seq[:, : len(ctx) + k]).argmax()) == token
                         for k, token in enumerate(cont))
        assert ll == pytest.approx(float(paths.sum()), abs=1e-4)
        assert ll == pytest.approx(float(lp.sum()), abs=1e-4)
        assert is_greedy == greedy and ll < 0
    assert lengths == {1, 2}  # one-token (next-token distribution) and longer (score) paths both used


@pytest.fixture(scope="module")
def eval_home(tmp_path_factory):
    return store_home(tmp_path_factory.mktemp("hsm-eval-home"), "truthfulqa")


def test_eval_through_the_cli(hsm_run, eval_home):
    run_cli("eval", "--run", str(hsm_run), "--suite", "truthfulqa_mc1", "--limit", "5",
            env={"HMST_BENCH_HOME": str(eval_home)})
    record = json.loads((hsm_run / "eval" / "truthfulqa_mc1.json").read_text())
    assert 0.0 <= record["results"]["truthfulqa_mc1"]["acc,none"] <= 1.0
    assert record["provenance"]["limit"] == 5 and record["provenance"]["requests"]["total"] > 0


def test_missing_tree_is_a_clear_error(hsm_run, tmp_path):
    from hmst_bench.train.rundir import load_run

    copy = tmp_path / "run"
    shutil.copytree(hsm_run, copy, ignore=shutil.ignore_patterns("eval", "state"))
    (copy / "hsm_tree.npz").unlink()
    with pytest.raises(Exception, match="hsm_tree.npz is missing"):
        load_run(copy)


def test_missing_tree_is_one_line_in_the_cli(hsm_run, eval_home, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(hsm_run, copy, ignore=shutil.ignore_patterns("eval", "state"))
    (copy / "hsm_tree.npz").unlink()
    proc = run_cli("eval", "--run", str(copy), "--suite", "truthfulqa_mc1", "--limit", "1",
                   env={"HMST_BENCH_HOME": str(eval_home)}, check=False)
    assert proc.returncode != 0 and "hsm_tree.npz" in proc.stderr
    assert "Traceback" not in proc.stderr
