"""The exact hierarchical-softmax head: one logit per internal node of a Huffman tree.

    logit_n(h) = w_n . h + c_n,   log p(token | h) = sum over its path of logsigmoid(sign * logit_n)

- `path_logprobs(h, tokens)`: only the nodes on each token's path (O(d * depth) per token) as
  batched matmuls, so FlopCounterMode and therefore the budget meter see the head's real cost.
  Paths are padded tensors (node index, sign, mask); the batch's tokens are sorted by path depth
  and split into up to `depth_buckets` buckets, each padded only to its own deepest path, with
  caps chosen per batch to minimise the padded rows (`bucket_caps`). On CPU this trains the head
  in x0.6-0.7 the time of padding every path to the tree's deepest (`padded_path_logprobs`,
  still there as the reference; the figures are in the README and benchmarks/hsm_head.py);
- `all_logprobs(h)`: all V-1 node logits in one matmul, then every leaf's path sum level by
  level from the root (O(d * V) per row), an exact distribution that sums to one; greedy, top-k
  and top-p decoding use it and are therefore exact;
- `descend(h)`: the fast approximate decoder: from the root, take the more likely branch at each
  node (O(d * depth)). It is not the argmax of the distribution in general.

logsigmoid is used throughout, never log(sigmoid(x)), which underflows for large |x|.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hmst_bench_gpt2_hsm.tree import HuffmanTree, build_tree


DEPTH_BUCKETS = 4  # the most buckets per batch; 4 measured best of 1-4 (README "Depth buckets")


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 logits are summed in fp32; fp64 stays fp64 (exact gradient checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def bucket_caps(hist, buckets: int) -> list[int]:
    """Ascending depth caps of at most `buckets` buckets covering a batch whose path depths have
    histogram `hist` (hist[k] = tokens of depth k); the last cap is the batch's deepest path.
    The caps minimise the padded rows, sum over buckets of (its tokens) * (its cap), by dynamic
    programming over the distinct depths: best[b][j] = fewest rows that cover the j shallowest
    distinct depths with b buckets, the last of which holds depths i..j-1 (cost tokens * ds[j-1])."""
    ds = [k for k, n in enumerate(hist) if n]
    cum = [0]
    for k in ds:
        cum.append(cum[-1] + int(hist[k]))
    k, buckets = len(ds), min(buckets, len(ds))
    if k == 0:
        return []
    inf = float("inf")
    best = [[inf] * (k + 1) for _ in range(buckets + 1)]
    arg = [[0] * (k + 1) for _ in range(buckets + 1)]
    best[0][0] = 0
    for b in range(1, buckets + 1):
        for j in range(b, k + 1):
            for i in range(b - 1, j):
                cost = best[b - 1][i] + (cum[j] - cum[i]) * ds[j - 1]
                if cost < best[b][j]:
                    best[b][j], arg[b][j] = cost, i
    caps, j = [], k
    for b in range(buckets, 0, -1):
        caps.append(ds[j - 1])
        j = arg[b][j]
    return caps[::-1]


class _BucketNodeLogits(torch.autograd.Function):
    """Node logits w_n . h of every (token, path position) row of the depth buckets, flat [M].

    forward(weight [V-1, d], h [N, d], order [N], nodes [M], sizes, caps): bucket b holds the
    next sizes[b] tokens of h[order] and, for each, the next caps[b] entries of `nodes`. One
    gather of all M weight rows, one bmm per bucket. The backward writes each bucket's gradients
    into views of one preallocated [M, d] (and [N, d]) tensor and scatters the weight rows once
    (embedding_dense_backward, as F.embedding's backward). Plain autograd through per-bucket
    views of one gathered tensor would concatenate the [M, d] gradient afterwards, an extra copy
    that cost as much as bucketing saved (benchmarks/hsm_head.py, "autograd_split")."""

    @staticmethod
    def forward(ctx, weight, h, order, nodes, sizes, caps):
        w = F.embedding(nodes, weight)  # [M, d]
        hs = h[order]
        out, row, tok = [], 0, 0
        for n, c in zip(sizes, caps):
            out.append(torch.bmm(w[row : row + n * c].view(n, c, -1), hs[tok : tok + n].unsqueeze(-1)).view(-1))
            row, tok = row + n * c, tok + n
        ctx.save_for_backward(w, hs, order, nodes)
        ctx.sizes, ctx.caps, ctx.num_nodes = sizes, caps, weight.shape[0]
        ctx.dtypes = (weight.dtype, h.dtype)
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        w, hs, order, nodes = ctx.saved_tensors
        need_w, need_h = ctx.needs_input_grad[:2]
        # in the dtype the forward's bmm ran in (autocast's, if it was on), without autocast
        with torch.autocast(grad.device.type, enabled=False):
            w, hs = w.to(grad.dtype), hs.to(grad.dtype)
            grad_w = torch.empty_like(w) if need_w else None
            grad_hs = torch.empty_like(hs) if need_h else None
            row, tok = 0, 0
            for n, c in zip(ctx.sizes, ctx.caps):
                g = grad[row : row + n * c].view(n, c, 1)
                if need_w:  # d logit / d w_n = h
                    torch.bmm(g, hs[tok : tok + n].unsqueeze(1), out=grad_w[row : row + n * c].view(n, c, -1))
                if need_h:  # d logit / d h = w_n, summed over the path
                    torch.bmm(g.transpose(1, 2), w[row : row + n * c].view(n, c, -1), out=grad_hs[tok : tok + n].unsqueeze(1))
                row, tok = row + n * c, tok + n
            grad_weight = grad_h = None
            if need_w:
                grad_weight = torch.ops.aten.embedding_dense_backward(grad_w, nodes, ctx.num_nodes, -1, False)
                grad_weight = grad_weight.to(ctx.dtypes[0])
            if need_h:
                grad_h = torch.empty_like(grad_hs)
                grad_h[order] = grad_hs  # a permutation: no accumulation needed
                grad_h = grad_h.to(ctx.dtypes[1])
        return grad_weight, grad_h, None, None, None, None


class HSMHead(torch.nn.Module):
    def __init__(self, d_model: int, vocab_size: int, init_std: float = 0.02):
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = torch.nn.Parameter(torch.randn(vocab_size - 1, d_model) * init_std)
        self.bias = torch.nn.Parameter(torch.zeros(vocab_size - 1))
        self.depth_buckets = DEPTH_BUCKETS  # 0: pad every path to the tree's deepest
        # the tree of uniform counts (near-balanced) until `prepare` installs the corpus's via set_tree
        self.set_tree(build_tree(np.zeros(vocab_size, dtype=np.int64)))

    def set_tree(self, tree: HuffmanTree) -> None:
        if tree.vocab_size != self.vocab_size:
            raise ValueError(f"tree has {tree.vocab_size} leaves, the head {self.vocab_size}")
        self.tree = tree
        nodes, signs, mask = tree.paths()
        device = self.weight.device
        # buffers that are not weights: the tree is saved as an artifact, not in the state dict
        self.register_buffer("path_nodes", torch.from_numpy(nodes).to(device), persistent=False)
        self.register_buffer("path_signs", torch.from_numpy(signs).to(device), persistent=False)
        self.register_buffer("path_mask", torch.from_numpy(mask).to(device), persistent=False)
        self.register_buffer("path_depth", torch.from_numpy(mask.sum(1)).to(device), persistent=False)
        v = tree.vocab_size
        levels = []
        for internal in tree.levels():
            levels.append(tuple(torch.from_numpy(a).to(device) for a in (internal, tree.left[internal], tree.right[internal])))
        self._levels = levels
        self._depth = nodes.shape[1]
        self._leaf0 = v - 1

    def enable_prf(self, features: int, seed: int = 0) -> None:
        """Estimate node logits with FAVOR+ random features (`prf`) in `path_logprobs` while
        training; `omega` and the counters are in the state dict, so a resumed run redraws on
        the same schedule and an evaluation sees the last features (it uses them only if asked)."""
        self.prf_seed = seed
        self.register_buffer("prf_omega", torch.zeros(features, self.weight.shape[1]))
        self.register_buffer("prf_draws", torch.zeros((), dtype=torch.long))
        self.register_buffer("prf_calls", torch.zeros((), dtype=torch.long))
        self.redraw()

    def redraw(self) -> None:
        from hmst_bench_gpt2_hsm.prf import orthogonal_gaussian

        g = torch.Generator().manual_seed(self.prf_seed * 1_000_003 + int(self.prf_draws))
        self.prf_omega.copy_(orthogonal_gaussian(*self.prf_omega.shape, generator=g))
        self.prf_draws += 1

    def path_logprobs(self, h: torch.Tensor, tokens: torch.Tensor, approximate: bool = False) -> torch.Tensor:
        """[N] log p(tokens | h) for h [N, d]; `approximate`: FAVOR+ node logits (needs enable_prf).

        Exact mode buckets the tokens by path depth (up to `depth_buckets` buckets, each padded
        to its own deepest path): the same sums as `padded_path_logprobs`, and the same
        gradients, with fewer padded rows. The FAVOR+ ablation pads every path."""
        if approximate or self.depth_buckets < 1 or tokens.numel() == 0:
            return self.padded_path_logprobs(h, tokens, approximate)
        depth = self.path_depth[tokens]
        order = torch.argsort(depth, stable=True)
        hist = torch.bincount(depth, minlength=self._depth + 1).tolist()
        caps = bucket_caps(hist, self.depth_buckets)
        sizes, lo = [], 0
        for cap in caps:  # the tokens whose depth is above the previous cap, up to this one
            sizes.append(sum(hist[lo : cap + 1]))
            lo = cap + 1
        groups = list(zip(tokens[order].split(sizes), caps))
        nodes = torch.cat([self.path_nodes[t, :c].reshape(-1) for t, c in groups])
        signs = torch.cat([self.path_signs[t, :c].reshape(-1) for t, c in groups])
        mask = torch.cat([self.path_mask[t, :c].reshape(-1) for t, c in groups])
        logits = _BucketNodeLogits.apply(self.weight, h, order, nodes, sizes, caps)
        logits = logits + F.embedding(nodes, self.bias.unsqueeze(1)).squeeze(1)  # c_n, gathered as the w_n
        terms = F.logsigmoid(signs * _at_least_fp32(logits)).masked_fill(~mask, 0.0)
        rows = [n * c for n, c in zip(sizes, caps)]
        by_depth = torch.cat([t.view(n, c).sum(-1) for t, n, c in zip(terms.split(rows), sizes, caps)])
        return torch.empty_like(by_depth).scatter(0, order, by_depth)  # back to the input order

    def padded_path_logprobs(self, h: torch.Tensor, tokens: torch.Tensor, approximate: bool = False) -> torch.Tensor:
        """`path_logprobs` with every path padded to the tree's deepest: one gather, one bmm."""
        nodes = self.path_nodes[tokens]  # [N, D]
        # F.embedding rather than self.weight[nodes]: the same rows, but its backward
        # (embedding_dense_backward) scatters the N*D row gradients into the weight gradient
        # faster than indexing's index_put_ with accumulate (benchmarks/hsm_head.py)
        w = F.embedding(nodes, self.weight)  # [N, D, d]
        if approximate:
            from hmst_bench_gpt2_hsm.prf import log_features, log_kernel

            logits = log_kernel(log_features(w, self.prf_omega), log_features(h, self.prf_omega).unsqueeze(1))
            logits = logits + self.bias[nodes]
        else:
            logits = torch.bmm(w, h.unsqueeze(-1)).squeeze(-1) + self.bias[nodes]
        terms = F.logsigmoid(self.path_signs[tokens] * _at_least_fp32(logits))
        return terms.masked_fill(~self.path_mask[tokens], 0.0).sum(-1)

    def all_logprobs(self, h: torch.Tensor, approximate: bool = False) -> torch.Tensor:
        """[N, V] log-distribution over the vocabulary for h [N, d]; `approximate`: FAVOR+ node
        logits (still a normalised distribution: each node's two branches sum to one)."""
        if approximate:
            from hmst_bench_gpt2_hsm.prf import log_features, log_kernel

            node_logits = log_kernel(log_features(self.weight, self.prf_omega).unsqueeze(0),
                                     log_features(h, self.prf_omega).unsqueeze(1)) + self.bias
            node_logits = _at_least_fp32(node_logits)
        else:
            node_logits = _at_least_fp32(h @ self.weight.t() + self.bias)  # [N, V-1]
        if self._levels and self._levels[0][0].device != h.device:
            self._levels = [tuple(t.to(h.device) for t in level) for level in self._levels]
        lp = node_logits.new_zeros(h.shape[0], 2 * self.vocab_size - 1)  # log-prob of reaching each node
        for internal, left, right in self._levels:
            base = lp[:, internal]
            logit = node_logits[:, internal]
            lp = lp.index_copy(1, left, base + F.logsigmoid(logit)).index_copy(1, right, base + F.logsigmoid(-logit))
        return lp[:, self._leaf0 :]

    @torch.no_grad()
    def descend(self, h: torch.Tensor) -> torch.Tensor:
        """[N] tokens by taking the likelier branch at every node from the root (approximate)."""
        node = torch.full((h.shape[0],), self.tree.root, dtype=torch.long, device=h.device)
        left = torch.as_tensor(self.tree.left, device=h.device)
        right = torch.as_tensor(self.tree.right, device=h.device)
        done = torch.zeros_like(node, dtype=torch.bool)
        for _ in range(self._depth):
            idx = node.clamp_max(self.vocab_size - 2)
            logit = (self.weight[idx] * h).sum(-1) + self.bias[idx]
            nxt = torch.where(logit >= 0, left[idx], right[idx])
            node = torch.where(done, node, nxt)
            done = node >= self._leaf0
            if bool(done.all()):
                break
        return node - self._leaf0
