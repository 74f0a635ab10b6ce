"""HMST's building blocks against their references, in one run (issue 7's benchmark).

Prints one JSON object:
- moe: the MoE feed-forward layer (8 experts, top-2, dropless gather/scatter dispatch) against a
  dense SwiGLU FFN with the same ACTIVE parameters (width top_k x the expert width), forward and
  backward tokens/s on the same [batch, seq, d_model] input, and the ratio moe/dense;
- scan: the selective SSM's parallel scan against the per-timestep sequential loop at L = 1024,
  forward and forward+backward, speedup = sequential / parallel (issue target >= 10x);
- faiss: the semantic store with `--faiss-n` entries (default 1M random unit vectors, auto
  policy: flat up to 100k, then HNSW): build time, query p50/p99 for k = 5, recall@5 against
  exact search on 200 queries, resident memory.

    python benchmarks/hmst.py [--size tiny] [--faiss-n 1000000] [--faiss-sweep 64,128,256,512]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def moe_vs_dense(size: str, batch: int, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from hmst_bench_hmst.moe import MoE
    from hmst_bench_hmst.plugin import HMST

    cfg = HMST.make_config(size)
    d, d_ff, k = cfg.d_model, cfg.expert_d_ff, cfg.top_k

    class DenseFFN(nn.Module):
        """SwiGLU of width k * d_ff: as many parameters as the k experts a token uses."""

        def __init__(self):
            super().__init__()
            self.gate_up = nn.Linear(d, 2 * k * d_ff, bias=False)
            self.down = nn.Linear(k * d_ff, d, bias=False)

        def forward(self, x):
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)

    torch.manual_seed(0)
    moe, dense = MoE(d, d_ff, cfg.n_experts, k), DenseFFN()
    active_moe = k * moe.params_per_expert() + sum(p.numel() for n, p in moe.named_parameters() if "router" in n)
    x0 = torch.randn(batch, cfg.max_seq_len, d)

    def rate(fn) -> float:
        times = []
        for _ in range(repeats + 1):
            x = x0.clone().requires_grad_(True)
            t = time.perf_counter()
            out = fn(x)
            out = out[0] if isinstance(out, tuple) else out
            out.square().mean().backward()
            times.append(time.perf_counter() - t)
        return x0.shape[0] * x0.shape[1] / statistics.median(times[1:])

    m, dn = rate(moe), rate(dense)
    return {"size": size, "tokens": batch * cfg.max_seq_len, "n_experts": cfg.n_experts, "top_k": k,
            "moe_active_params": active_moe, "dense_params": sum(p.numel() for p in dense.parameters()),
            "moe_tokens_per_s": round(m, 1), "dense_tokens_per_s": round(dn, 1), "moe_vs_dense": round(m / dn, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--faiss-n", type=int, default=1_000_000)
    parser.add_argument("--faiss-dim", type=int, default=64)
    parser.add_argument("--faiss-sweep", default="", help="efSearch (HNSW) or nprobe (IVF-PQ) values to measure too, e.g. 64,128,256,512")
    args = parser.parse_args()

    from hmst_bench_hmst.semantic import benchmark as faiss_benchmark
    from hmst_bench_hmst.ssm import benchmark_scan

    result = {"moe": moe_vs_dense(args.size, args.batch, args.repeats)}
    rows = [benchmark_scan(b, 1024, d, 16, backward=bw) for (b, d) in ((2, 64), (4, 128)) for bw in (False, True)]
    result["scan"] = [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    sweep = tuple(int(v) for v in args.faiss_sweep.split(",") if v.strip())
    result["faiss"] = faiss_benchmark(n=args.faiss_n, dim=args.faiss_dim, sweep=sweep)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
