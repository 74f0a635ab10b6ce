"""The exact hierarchical-softmax head: one logit per internal node of a Huffman tree.

    logit_n(h) = w_n . h + c_n,   log p(token | h) = sum over its path of logsigmoid(sign * logit_n)

- `path_logprobs(h, tokens)`: only the nodes on each token's path (O(d * depth) per token) as
  one batched matmul, so FlopCounterMode and therefore the budget meter see the head's real
  cost (padded to the deepest path, which is real work too);
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


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 logits are summed in fp32; fp64 stays fp64 (exact gradient checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class HSMHead(torch.nn.Module):
    def __init__(self, d_model: int, vocab_size: int, init_std: float = 0.02):
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = torch.nn.Parameter(torch.randn(vocab_size - 1, d_model) * init_std)
        self.bias = torch.nn.Parameter(torch.zeros(vocab_size - 1))
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
        """[N] log p(tokens | h) for h [N, d]; `approximate`: FAVOR+ node logits (needs enable_prf)."""
        nodes = self.path_nodes[tokens]  # [N, D]
        w = self.weight[nodes]  # [N, D, d]
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
