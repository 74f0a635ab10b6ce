"""The FAVOR+ ablation of the gpt2-hsm head: the random features estimate exp(w.h) without
bias; the sigmoid built on that estimate is close to the exact one for small vectors and breaks
down as their norms grow (the figures the README quotes come from `prf_bias_table`)."""

from __future__ import annotations

import math

import pytest
import torch

from hmst_bench_gpt2_hsm.prf import log_features, log_kernel, orthogonal_gaussian

D = 64
DRAWS = 60


def prf_bias_table(norms=(0.5, 1.0, 3.0), features=(16, 256), draws=DRAWS):
    """{(norm, m): (relative bias, std)}: (mean estimated sigmoid - exact) / min(exact, 1 - exact)
    and the estimate's spread, for w, h of that norm (fixed directions, cosine about -0.3) over
    `draws` independent feature draws."""
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    u, v = u / u.norm(), (v - 0.3 * u) / (v - 0.3 * u).norm()
    table = {}
    for r in norms:
        w, h = (u * r).float(), (v * r).float()
        exact = torch.sigmoid(w @ h)
        for m in features:
            est = torch.stack([torch.sigmoid(log_kernel(log_features(w, om), log_features(h, om)))
                               for om in (orthogonal_gaussian(m, D, torch.Generator().manual_seed(k)) for k in range(draws))])
            table[(r, m)] = (float((est.mean() - exact) / min(exact, 1 - exact)), float(est.std()))
    return table


def test_features_are_unbiased_for_the_exponential():
    """E[phi(w).phi(h)] = exp(w.h): the mean over many draws of the kernel estimate."""
    g = torch.Generator().manual_seed(1)
    w, h = torch.randn(D, generator=g) * 0.1, torch.randn(D, generator=g) * 0.1
    est = torch.stack([log_kernel(log_features(w, om), log_features(h, om)).exp()
                       for om in (orthogonal_gaussian(64, D, torch.Generator().manual_seed(k)) for k in range(400))])
    standard_error = float(est.std()) / math.sqrt(len(est))
    assert abs(float(est.mean()) - math.exp(float(w @ h))) < 4 * standard_error
    assert (est > 0).all()  # positive features: the estimate is never negative


def test_orthogonal_blocks():
    om = orthogonal_gaussian(2 * D, D, torch.Generator().manual_seed(0)).double()
    block = om[:D] / om[:D].norm(dim=1, keepdim=True)
    assert torch.allclose(block @ block.t(), torch.eye(D, dtype=torch.float64), atol=1e-5)


def test_sigmoid_bias_small_for_small_norms_and_breaks_down_for_large():
    table = prf_bias_table()
    assert abs(table[(0.5, 256)][0]) < 0.02 and abs(table[(0.5, 16)][0]) < 0.1
    assert abs(table[(1.0, 256)][0]) < 0.1
    for m in (16, 256):
        assert table[(3.0, m)][0] < -0.4  # |w|, |h| ~ 3: the estimate collapses towards 0
    assert table[(0.5, 256)][1] < table[(0.5, 16)][1]  # more features, less spread


def test_prf_training_path_and_exact_evaluation():
    """With use_prf the training loss uses the estimate and redraws on schedule; evaluation
    (eval mode) is exact: the same numbers as the head without features."""
    import dataclasses

    from hmst_bench.plugins import get_registry

    class Tok:
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    spec = get_registry().arch("gpt2-hsm")
    config = dataclasses.replace(spec.make_config("micro", {"max_seq_len": 16, "use_prf": True, "prf_redraw": 2}),
                                 vocab_size=50)
    torch.manual_seed(0)
    model = spec.build(config, Tok())
    ids = torch.randint(3, 50, (2, 16))
    batch = {"input_ids": ids, "labels": torch.roll(ids, -1, 1)}
    model.train()
    first_omega = model.head.prf_omega.clone()
    approx = model.loss(batch)[0].detach()
    model.loss(batch)  # the second training pass redraws
    assert not torch.equal(first_omega, model.head.prf_omega) and int(model.head.prf_draws) == 2
    model.eval()
    with torch.no_grad():
        exact, _ = model.loss(batch)
        direct = -model.head.path_logprobs(model.hidden(ids).flatten(0, 1), batch["labels"].flatten()).mean()
    assert float(exact) == pytest.approx(float(direct), abs=1e-6)
    assert float(approx) != pytest.approx(float(exact), abs=1e-6)


def _small_model(**overrides):
    import dataclasses

    from hmst_bench.plugins import get_registry

    class Tok:
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    spec = get_registry().arch("gpt2-hsm")
    config = dataclasses.replace(spec.make_config("micro", {"max_seq_len": 16, **overrides}), vocab_size=50)
    torch.manual_seed(0)
    return spec.build(config, Tok())


def test_approximate_evaluation_only_when_asked():
    """prf_eval: evaluation uses the FAVOR+ estimate too, and its full distribution still sums to
    one and agrees with the path log-probs; without it evaluation is exact."""
    ids = torch.randint(3, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    targets = torch.roll(ids, -1, 1)
    exact_model = _small_model(use_prf=True).eval()
    approx_model = _small_model(use_prf=True, prf_eval=True).eval()
    approx_model.load_state_dict(exact_model.state_dict())
    with torch.no_grad():
        exact = exact_model.token_logprobs(ids, targets)
        approx = approx_model.token_logprobs(ids, targets)
        dist = approx_model.next_token_logprobs(ids)
        h = exact_model.hidden(ids)[:, -1]
        plain = exact_model.head.path_logprobs(h, targets[:, -1])
    assert torch.allclose(exact[:, -1], plain, atol=1e-6)
    assert not torch.allclose(exact, approx, atol=1e-3)
    assert torch.allclose(torch.logsumexp(dist, -1), torch.zeros(2), atol=1e-5)
    assert torch.allclose(dist.gather(1, targets[:, -1:])[:, 0], approx[:, -1], atol=1e-5)


def test_flop_shares_by_hand():
    """The head's forward is one bmm per depth bucket: 2 * d FLOPs per padded path row. The
    initial tree of 50 equal counts has 14 leaves at depth 5 and 36 at depth 6, so with up to 4
    buckets each depth gets its own and nothing is padded: 2 * d * (sum of the targets' depths).
    Padded to the deepest path (depth_buckets = 0) it is 2 * d * 6 per token."""
    model = _small_model()
    assert model.head.path_depth.bincount().tolist() == [0, 0, 0, 0, 0, 14, 36]
    ids = torch.randint(3, 50, (2, 16), generator=torch.Generator().manual_seed(2))
    labels = torch.roll(ids, -1, 1)
    batch = {"input_ids": ids, "labels": labels}
    from hmst_bench.budget import count_flops

    with torch.no_grad():
        shares = model.flop_shares(batch)
        _, backbone = count_flops(lambda: model.hidden(ids))
        model.head.depth_buckets = 0
        padded_shares = model.flop_shares(batch)
    depths = model.head.path_depth[labels]
    assert 0 < int((depths == 5).sum()) < ids.numel()  # both depths occur
    head = 2 * model.config.d_model * int(depths.sum())
    padded = 2 * model.config.d_model * 6 * ids.numel()
    assert shares["head"] == pytest.approx(head / (head + backbone), rel=1e-9)
    assert padded_shares["head"] == pytest.approx(padded / (padded + backbone), rel=1e-9)
    assert shares["head"] + shares["backbone"] == pytest.approx(1.0)
