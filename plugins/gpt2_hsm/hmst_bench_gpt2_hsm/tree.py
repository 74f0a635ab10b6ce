"""The Huffman tree of a hierarchical softmax, built from token counts.

Every token is a leaf; each of the V-1 internal nodes n holds a binary decision, "left" with
probability sigmoid(logit_n) and "right" with sigmoid(-logit_n), so a token's probability is the
product of the decisions on its root-to-leaf path and the V leaf probabilities sum to one by
construction. Huffman's construction (merge the two lightest subtrees, repeatedly) gives frequent
tokens short paths: the expected path length is within one decision of the unigram entropy in
bits. Counts are add-one smoothed, so every token of the vocabulary has a leaf; there is no depth
cap. Building takes O(V log V) with a heap; ties break on the smaller node id, so the same counts
always give the same tree.

Node ids: internal nodes 0..V-2 (the root is V-2, the last merge), leaves V-1+token.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class HuffmanTree:
    counts: np.ndarray  # [V] smoothed counts the tree was built from (int64)
    left: np.ndarray  # [V-1] child ids (internal < V-1 <= leaf) of each internal node
    right: np.ndarray  # [V-1]

    @property
    def vocab_size(self) -> int:
        return len(self.counts)

    @property
    def root(self) -> int:
        return self.vocab_size - 2

    def paths(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(nodes [V, D] int64, signs [V, D] float32 of +1 left / -1 right, mask [V, D] bool),
        root first, padded with node 0, sign 0 and mask False up to the greatest depth D."""
        v = self.vocab_size
        parent = np.full(2 * v - 1, -1, dtype=np.int64)
        sign = np.zeros(2 * v - 1, dtype=np.float32)
        parent[self.left], sign[self.left] = np.arange(v - 1), 1.0
        parent[self.right], sign[self.right] = np.arange(v - 1), -1.0
        depth = np.zeros(2 * v - 1, dtype=np.int64)
        for node in self.top_down():  # parents before children
            for child in (self.left[node], self.right[node]):
                depth[child] = depth[node] + 1
        leaf_depth = depth[v - 1 :]
        d = int(leaf_depth.max())
        nodes = np.zeros((v, d), dtype=np.int64)
        signs = np.zeros((v, d), dtype=np.float32)
        mask = np.zeros((v, d), dtype=bool)
        for token in range(v):
            node, k = v - 1 + token, leaf_depth[token]
            while parent[node] >= 0:
                k -= 1
                nodes[token, k], signs[token, k], mask[token, k] = parent[node], sign[node], True
                node = parent[node]
        return nodes, signs, mask

    def top_down(self) -> list[int]:
        """Internal nodes, every parent before its children (breadth first from the root)."""
        order, frontier, v = [], [self.root], self.vocab_size
        while frontier:
            order.extend(frontier)
            frontier = [c for n in frontier for c in (self.left[n], self.right[n]) if c < v - 1]
        return order

    def levels(self) -> list[np.ndarray]:
        """Internal nodes grouped by depth, root level first."""
        out, frontier, v = [], [self.root], self.vocab_size
        while frontier:
            out.append(np.array(frontier, dtype=np.int64))
            frontier = [int(c) for n in frontier for c in (self.left[n], self.right[n]) if c < v - 1]
        return out

    def expected_code_length(self) -> float:
        """Mean path length in decisions (bits) under the tree's own (smoothed) distribution."""
        _, _, mask = self.paths()
        p = self.counts / self.counts.sum()
        return float((p * mask.sum(1)).sum())

    def entropy_bits(self) -> float:
        p = self.counts / self.counts.sum()
        return float(-(p * np.log2(p)).sum())

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"counts": self.counts, "left": self.left, "right": self.right}

    @classmethod
    def from_arrays(cls, arrays) -> "HuffmanTree":
        tree = cls(np.asarray(arrays["counts"], dtype=np.int64), np.asarray(arrays["left"], dtype=np.int64),
                   np.asarray(arrays["right"], dtype=np.int64))
        tree.check()
        return tree

    def check(self) -> None:
        v = self.vocab_size
        children = np.concatenate([self.left, self.right])
        if len(self.left) != v - 1 or sorted(children.tolist()) != [n for n in range(2 * v - 1) if n != v - 2]:
            raise ValueError("not a binary tree over the vocabulary (every node but the root must be a child once)")
        if len(self.top_down()) != v - 1:  # with one parent each, only a cycle can hide nodes from the root
            raise ValueError("not a binary tree over the vocabulary (some nodes are not reachable from the root)")


def build_tree(counts) -> HuffmanTree:
    """Huffman tree of `counts` (length V >= 2) after add-one smoothing."""
    counts = np.asarray(counts, dtype=np.int64) + 1
    v = len(counts)
    if v < 2:
        raise ValueError("a hierarchical softmax needs at least two tokens")
    heap = [(int(c), v - 1 + t) for t, c in enumerate(counts)]  # (weight, node id): ids break ties
    heapq.heapify(heap)
    left = np.empty(v - 1, dtype=np.int64)
    right = np.empty(v - 1, dtype=np.int64)
    for node in range(v - 1):  # internal ids in merge order, so the root is the last, V-2
        w1, a = heapq.heappop(heap)
        w2, b = heapq.heappop(heap)
        left[node], right[node] = a, b
        heapq.heappush(heap, (w1 + w2, node))
    return HuffmanTree(counts, left, right)
