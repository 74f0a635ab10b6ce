"""Cost of the gpt2-hsm hierarchical-softmax head against a full softmax head, in one run.

Prints one JSON object with, for each vocabulary size V (default 4096, 32768, 50257; d = 768):

- training, 4096 tokens: forward+backward time and peak memory of the HSM head
  (`HSMHead.path_logprobs`, loss = -mean, backward) and of a full softmax head
  (`nn.Linear(d, V)` + `F.cross_entropy`) on the same hidden states and targets, and their
  ratios hsm/softmax; the head's FLOPs per token (torch.utils.flop_counter.FlopCounterMode over
  one forward+backward, divided by the tokens; it counts the matmuls, not the elementwise ops);
- decoding one hidden state at a time, time per token: exact (`all_logprobs` + argmax), tree
  descent (`descend`, approximate) and a full softmax (linear + argmax), and their ratios;
- the Huffman tree: max depth (training pads each depth bucket's paths to its own deepest),
  expected path length
  (`tree.expected_code_length()`), unigram entropy, and the batch's mean path length;
- "bucketing" (issue 5 item 2: are paths worth bucketing by depth?): forward+backward time of
  the training loss with every path padded to the tree's deepest (`padded_path_logprobs`, the
  reference) against `path_logprobs` with the batch's tokens sorted by path depth and split
  into 1-4 buckets (`depth_buckets`; the head's default is 4), each padded only to its own
  deepest path, caps chosen per batch to minimise the padded rows (timed as part of the step;
  1 bucket = padded to the batch's deepest path); also the same 4 buckets through plain
  autograd (`autograd_split_path_logprobs` below: per-bucket views of one gathered tensor,
  whose backward concatenates the [rows, d] gradient), and the first implementation of the
  padded head (`index_gather_path_logprobs`: weight[nodes], whose backward is index_put_ with
  accumulate). Each variant: its median time; its time over the reference's, the median over
  rounds of the ratio within a round (wall clock and process CPU time); padded rows as a fraction of the reference's, and its
  largest difference from the reference in loss and gradients (the same sums, so rounding).
  Measured at torch's thread count and again on one thread (see `bucketing` for why);
- "scaling": for each figure its exponent alpha in figure ~ V^alpha, least squares over the V
  measured, beside the exponent log2(V) itself has over the same V (about 0.1) and that of V (1):
  where the HSM figures stay near the former, O(log V) holds; where they approach 1 it does not.

Token counts are Zipf-like (numpy zipf a=1.1, folded into V by modulo, seeded), so the tree is
a realistic Huffman tree; the 4096 targets are drawn the same way. The HSM biases are set to the
unigram log-odds of each node's two subtrees (weights random), so descent follows frequent
branches as a trained head would. Hidden states are standard normal with requires_grad, so the
backward also computes the gradient for the backbone.

Peak memory is measured in a fresh subprocess per (head, V), over its first forward+backward. On
CPU it is the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs
right before; free heap handed back with malloc_trim first) minus its resident set just before:
it includes the activations and the gradients of the head's weights and of h, not the parameters
and inputs themselves (torch's CPU allocations are invisible to tracemalloc; this counts what the
OS had to give). Where clear_refs cannot be written, the ru_maxrss delta of that fresh process is
used and "memory_method" says so. On CUDA it is torch.cuda.max_memory_allocated minus
memory_allocated before. FLOPs are counted in the same subprocess over one more forward+backward
on the same tokens (real tensors: with depth buckets the HSM head's work depends on the tokens'
path depths, which the meta device cannot see).

Times are measured in the main process, both heads of a V built side by side: one warm-up pass
each, then --repeats passes each, the heads alternating (order flipped every round) so load from
other work on a shared machine falls on both alike; the figure is the median pass. The median
process CPU time is reported as well ("hsm_vs_softmax_cpu_time") as a cross-check. Decoding: the
three decoders alternate round by round over the same single hidden states; median per token.

    python benchmarks/hsm_head.py [--device cpu] [--vocab 4096,32768,50257] [--repeats 3]
                                  [--buckets 1,2,3,4] [--bucket-repeats 9]

Only the JSON goes to stdout; progress goes to stderr. About 8 minutes on 2 idle CPU cores, most of
it the full softmax at the two large V and the bucketing comparison (`--buckets ""` skips it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

ZIPF_A = 1.1
COUNT_DRAWS = 5_000_000


def log(msg: str) -> None:
    print(f"[hsm_head] {msg}", file=sys.stderr, flush=True)


def zipf_counts(v: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.bincount((rng.zipf(ZIPF_A, COUNT_DRAWS) - 1) % v, minlength=v)


def zipf_tokens(v: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    return (rng.zipf(ZIPF_A, n) - 1) % v


def unigram_bias(tree) -> np.ndarray:
    """log-odds of going left at each internal node under the tree's own counts."""
    v = tree.vocab_size
    weight = np.zeros(2 * v - 1)
    weight[v - 1 :] = tree.counts
    for node in range(v - 1):  # merge order: children before parents
        weight[node] = weight[tree.left[node]] + weight[tree.right[node]]
    return np.log(weight[tree.left]) - np.log(weight[tree.right])


def make_heads(kind: str, v: int, d: int, seed: int, device: str):
    """(module, loss function of (h, tokens)) for one head, on `device`."""
    import torch
    import torch.nn.functional as F

    from hmst_bench_gpt2_hsm.head import HSMHead
    from hmst_bench_gpt2_hsm.tree import build_tree

    torch.manual_seed(seed)
    if kind == "hsm":
        tree = build_tree(zipf_counts(v, seed))
        with torch.device(device):
            head = HSMHead(d, v)
        head.set_tree(tree)
        if device != "meta":
            with torch.no_grad():
                head.bias.copy_(torch.from_numpy(unigram_bias(tree)).to(head.bias))
        return head, lambda h, t: -head.path_logprobs(h, t).mean()
    with torch.device(device):
        head = torch.nn.Linear(d, v)
    return head, lambda h, t: F.cross_entropy(head(h), t)


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM")


def child(kind: str, v: int, args) -> dict:
    """One (head, V) in this fresh process: peak memory of a forward+backward, and its FLOPs."""
    import ctypes
    import gc
    import resource

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    device = args.device
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    head, loss_fn = make_heads(kind, v, args.d_model, args.seed, device)
    tokens = torch.from_numpy(zipf_tokens(v, args.tokens, args.seed)).to(device)
    h = torch.randn(args.tokens, args.d_model, device=device, requires_grad=True)

    def step() -> None:
        head.zero_grad(set_to_none=True)
        h.grad = None
        loss_fn(h, tokens).backward()

    # peak memory of the first forward+backward
    gc.collect()
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        sync()
        peak, method = torch.cuda.max_memory_allocated() - before, "torch.cuda.max_memory_allocated delta"
    else:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        try:
            before = current_rss()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident set
            step()
            peak, method = vm_hwm() - before, "VmHWM - RSS before, fresh process, clear_refs reset"
        except OSError:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            step()
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            peak, method = after - before, "ru_maxrss delta, fresh process"

    # FLOPs of one forward+backward on the same tokens
    with FlopCounterMode(display=False) as counter:
        step()
    ops = {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {"peak_bytes": int(peak), "memory_method": method,
            "flops": int(counter.get_total_flops()), "flops_by_op": ops}


def run_child(kind: str, v: int, args) -> dict:
    cmd = [sys.executable, __file__, "--_child", f"{kind}:{v}", "--device", args.device,
           "--tokens", str(args.tokens), "--d-model", str(args.d_model), "--seed", str(args.seed),
           ]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_times(v: int, args) -> dict:
    """Median wall and process-CPU seconds of a forward+backward of each head, alternating."""
    import torch

    device = args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    heads = {kind: make_heads(kind, v, args.d_model, args.seed, device) for kind in ("hsm", "softmax")}
    tokens = torch.from_numpy(zipf_tokens(v, args.tokens, args.seed)).to(device)
    h = torch.randn(args.tokens, args.d_model, device=device, requires_grad=True)

    def step(kind: str) -> tuple[float, float]:
        head, loss_fn = heads[kind]
        head.zero_grad(set_to_none=True)
        h.grad = None
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        loss_fn(h, tokens).backward()
        sync()
        return time.perf_counter() - wall, time.process_time() - cpu

    for kind in heads:  # warm-up
        step(kind)
    wall, cpu = {k: [] for k in heads}, {k: [] for k in heads}
    for r in range(args.repeats):
        for kind in list(heads) if r % 2 == 0 else list(heads)[::-1]:
            w, c = step(kind)
            wall[kind].append(w)
            cpu[kind].append(c)
    return {"wall": {k: float(np.median(x)) for k, x in wall.items()},
            "cpu": {k: float(np.median(x)) for k, x in cpu.items()}}


def decode_times(v: int, args) -> dict:
    """Median seconds per token of the three decoders, one hidden state at a time."""
    import torch

    device = args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    hsm, _ = make_heads("hsm", v, args.d_model, args.seed, device)
    lin, _ = make_heads("softmax", v, args.d_model, args.seed, device)
    states = torch.randn(args.decode_tokens, args.d_model, device=device)
    decoders = {
        "exact": lambda x: hsm.all_logprobs(x).argmax(-1),
        "descent": lambda x: hsm.descend(x),
        "softmax": lambda x: lin(x).argmax(-1),
    }
    per_token = {k: [] for k in decoders}
    picks = {}
    with torch.inference_mode():
        for name, fn in decoders.items():  # warm-up
            picks[name] = torch.cat([fn(states[i : i + 1]) for i in range(states.shape[0])])
        for r in range(args.decode_rounds):
            order = list(decoders) if r % 2 == 0 else list(decoders)[::-1]
            for name in order:
                fn = decoders[name]
                sync()
                t0 = time.perf_counter()
                for i in range(states.shape[0]):
                    fn(states[i : i + 1])
                sync()
                per_token[name].append((time.perf_counter() - t0) / states.shape[0])
    depth = hsm.path_mask.sum(1).cpu()
    return {
        "seconds_per_token": {k: float(np.median(x)) for k, x in per_token.items()},
        "descent_mean_steps": round(float(depth[picks["descent"].cpu()].float().mean()), 2),
        "descent_agrees_with_exact": round(float((picks["descent"] == picks["exact"]).float().mean()), 4),
    }


def autograd_split_path_logprobs(head, h, tokens, buckets: int):
    """`head.path_logprobs` (exact, bucketed) through plain autograd: one gather of every bucket's
    rows, split into per-bucket views, one bmm each; autograd then concatenates the per-bucket
    [rows, d] gradients in the backward. Returns the [N] log-probs in the input order."""
    import torch
    import torch.nn.functional as F

    from hmst_bench_gpt2_hsm.head import _at_least_fp32, bucket_caps

    depth = head.path_depth[tokens]
    order = torch.argsort(depth, stable=True)
    hist = torch.bincount(depth).tolist()
    caps = bucket_caps(hist, buckets)
    sizes, lo = [], 0
    for cap in caps:
        sizes.append(sum(hist[lo : cap + 1]))
        lo = cap + 1
    ts = tokens[order]
    nodes = [head.path_nodes[t, :c] for t, c in zip(ts.split(sizes), caps)]
    flat = torch.cat([n.reshape(-1) for n in nodes])
    rows = [n.numel() for n in nodes]
    out = []
    for t, c, n, w, b, hb in zip(ts.split(sizes), caps, sizes, F.embedding(flat, head.weight).split(rows),
                                 head.bias[flat].split(rows), h[order].split(sizes)):
        logits = torch.bmm(w.view(n, c, -1), hb.unsqueeze(-1)).squeeze(-1) + b.view(n, c)
        terms = F.logsigmoid(head.path_signs[t, :c] * _at_least_fp32(logits))
        out.append(terms.masked_fill(~head.path_mask[t, :c], 0.0).sum(-1))
    lp = torch.cat(out)
    return torch.empty_like(lp).scatter(0, order, lp)


def index_gather_path_logprobs(head, h, tokens):
    """The padded head as first written: the path rows gathered by indexing, weight[nodes]."""
    import torch
    import torch.nn.functional as F

    from hmst_bench_gpt2_hsm.head import _at_least_fp32

    nodes = head.path_nodes[tokens]
    logits = torch.bmm(head.weight[nodes], h.unsqueeze(-1)).squeeze(-1) + head.bias[nodes]
    terms = F.logsigmoid(head.path_signs[tokens] * _at_least_fp32(logits))
    return terms.masked_fill(~head.path_mask[tokens], 0.0).sum(-1)


def bucketing(v: int, args) -> dict:
    """Padded vs depth-bucketed training forward+backward of the HSM loss on one batch."""
    import torch

    from hmst_bench_gpt2_hsm.head import bucket_caps

    device = args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    head, _ = make_heads("hsm", v, args.d_model, args.seed, device)
    default_buckets = head.depth_buckets
    tokens = torch.from_numpy(zipf_tokens(v, args.tokens, args.seed)).to(device)
    h = torch.randn(args.tokens, args.d_model, device=device, requires_grad=True)
    n_buckets = [int(x) for x in args.buckets.split(",")]
    depth = head.path_depth[tokens]
    hist = torch.bincount(depth).tolist()

    def bucketed(b: int):
        def loss():
            head.depth_buckets = b
            return -head.path_logprobs(h, tokens).mean()
        return loss

    variants = {"padded": lambda: -head.padded_path_logprobs(h, tokens).mean()}
    variants.update({f"bucketed_{b}": bucketed(b) for b in n_buckets})
    variants["autograd_split_4"] = lambda: -autograd_split_path_logprobs(head, h, tokens, 4).mean()
    variants["index_gather_padded"] = lambda: -index_gather_path_logprobs(head, h, tokens).mean()

    def step(name: str) -> tuple[float, float, tuple]:
        head.zero_grad(set_to_none=True)
        h.grad = None
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        loss = variants[name]()
        loss.backward()
        sync()
        return time.perf_counter() - wall, time.process_time() - cpu, (loss.detach(), head.weight.grad, head.bias.grad, h.grad)

    # a warm-up pass of each, which also checks that they compute the same loss and gradients
    ref = step("padded")[2]
    diff = {}
    for name in list(variants)[1:]:
        diff[name] = max(float((a - b).abs().max()) for a, b in zip(step(name)[2], ref))
    padded_rows = args.tokens * head.path_nodes.shape[1]
    caps = {f"bucketed_{b}": bucket_caps(hist, b) for b in n_buckets}
    caps["autograd_split_4"] = bucket_caps(hist, 4)
    caps["index_gather_padded"] = [head.path_nodes.shape[1]]
    default = f"bucketed_{default_buckets}"

    def measure() -> dict:
        wall, cpu = {k: [] for k in variants}, {k: [] for k in variants}
        for r in range(args.bucket_repeats):
            for name in list(variants) if r % 2 == 0 else list(variants)[::-1]:
                w, c, _ = step(name)
                wall[name].append(w)
                cpu[name].append(c)

        def paired(times: dict, name: str) -> float:
            """Median over rounds of the variant's time over the reference's in the same round:
            load from other processes that drifts between rounds cancels."""
            return float(np.median(np.array(times[name]) / np.array(times["padded"])))

        by = {}
        for name in list(variants)[1:]:
            lo, rows = 0, 0
            for cap in caps[name]:
                rows += sum(hist[lo : cap + 1]) * cap
                lo = cap + 1
            by[name] = {"caps": caps[name], "rows_vs_padded": round(rows / padded_rows, 4),
                        "seconds": round(float(np.median(wall[name])), 5),
                        "vs_padded_time": round(paired(wall, name), 4), "vs_padded_cpu_time": round(paired(cpu, name), 4),
                        "max_abs_diff_vs_padded": diff[name]}
        best = min(n_buckets, key=lambda b: by[f"bucketed_{b}"]["vs_padded_time"])
        return {
            "padded_seconds": round(float(np.median(wall["padded"])), 5),
            "variants": by,
            "best_buckets": best,
            "best_bucketed_vs_padded_time": by[f"bucketed_{best}"]["vs_padded_time"],
            "default_vs_padded_time": by[default]["vs_padded_time"] if default in by else None,
            "default_vs_first_implementation_time": (
                round(by[default]["vs_padded_time"] / by["index_gather_padded"]["vs_padded_time"], 4) if default in by else None),
        }

    # at torch's thread count, then on one thread: on a shared machine other processes stall the
    # threads of a parallel op unevenly, which hits the bucketed variant's more numerous, smaller
    # ops harder; one thread is only slowed down, so its ratios stay those of an idle machine
    threads = torch.get_num_threads()
    by_threads = {}
    try:
        for n in sorted({threads, 1}, reverse=True):
            torch.set_num_threads(n)
            by_threads[str(n)] = measure()
    finally:
        torch.set_num_threads(threads)
        head.depth_buckets = default_buckets
    return {
        "tree_max_depth": int(head.path_nodes.shape[1]),
        "batch_max_depth": int(depth.max()),
        "batch_mean_depth": round(float(depth.float().mean()), 3),
        "default_buckets": default_buckets,
        "by_threads": by_threads,
    }


def exponent(vs: list[int], ys: list[float]) -> float | None:
    if len(vs) < 2 or min(ys) <= 0:
        return None
    return round(float(np.polyfit(np.log(vs), np.log(ys), 1)[0]), 3)


def verdict(alpha: float | None) -> str:
    if alpha is None:
        return "n/a"
    if alpha <= 0.3:
        return "sub-linear: consistent with O(log V)"
    if alpha >= 0.7:
        return "close to O(V)"
    return "between O(log V) and O(V)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", default="4096,32768,50257", help="comma-separated vocabulary sizes")
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per training forward+backward")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per head after the warm-up (median)")
    parser.add_argument("--decode-tokens", type=int, default=32, help="hidden states decoded one at a time per round")
    parser.add_argument("--decode-rounds", type=int, default=5)
    parser.add_argument("--buckets", default="1,2,3,4", help="bucket counts to compare with padding ('' skips)")
    parser.add_argument("--bucket-repeats", type=int, default=9, help="timed rounds of the bucketing variants (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._child:
        kind, v = args._child.split(":")
        print(json.dumps(child(kind, int(v), args)), flush=True)
        return

    # everything but the final JSON goes to stderr, also what libraries print to stdout
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    started = time.perf_counter()

    import torch

    from hmst_bench_gpt2_hsm.tree import build_tree

    vocab = [int(x) for x in args.vocab.split(",")]
    per_v, memory_method = {}, None
    for v in vocab:
        tree = build_tree(zipf_counts(v, args.seed))
        _, _, mask = tree.paths()
        batch_depth = mask.sum(1)[zipf_tokens(v, args.tokens, args.seed)]
        train = {}
        for kind in ("hsm", "softmax"):
            log(f"V={v} {kind}: peak memory and FLOPs of a forward+backward (fresh process)")
            train[kind] = run_child(kind, v, args)
            memory_method = train[kind]["memory_method"]
        log(f"V={v}: training forward+backward times")
        times = train_times(v, args)
        log(f"V={v}: decoding")
        dec = decode_times(v, args)
        bucket = None
        if args.buckets:
            log(f"V={v}: padded vs depth-bucketed paths, training forward+backward")
            bucket = bucketing(v, args)
        t, c = times["wall"], times["cpu"]
        m = {k: r["peak_bytes"] for k, r in train.items()}
        f = {k: r["flops"] / args.tokens for k, r in train.items()}
        s = dec["seconds_per_token"]
        per_v[v] = {
            "tree": {"max_depth": int(mask.shape[1]), "expected_path_length": round(tree.expected_code_length(), 3),
                     "unigram_entropy_bits": round(tree.entropy_bits(), 3),
                     "batch_mean_path_length": round(float(batch_depth.mean()), 3)},
            "train_seconds": {k: round(x, 5) for k, x in t.items()},
            "train_peak_mib": {k: round(x / 2**20, 1) for k, x in m.items()},
            "train_flops_per_token": f,
            "hsm_vs_softmax_time": round(t["hsm"] / t["softmax"], 5),
            "hsm_vs_softmax_cpu_time": round(c["hsm"] / c["softmax"], 5),
            "hsm_vs_softmax_memory": round(m["hsm"] / m["softmax"], 4),
            "hsm_vs_softmax_flops": round(f["hsm"] / f["softmax"], 6),
            "decode_ms_per_token": {k: round(x * 1e3, 4) for k, x in s.items()},
            "exact_vs_softmax_decode_time": round(s["exact"] / s["softmax"], 4),
            "descent_vs_softmax_decode_time": round(s["descent"] / s["softmax"], 4),
            "descent_vs_exact_decode_time": round(s["descent"] / s["exact"], 4),
            "descent_mean_steps": dec["descent_mean_steps"],
            "descent_agrees_with_exact_untrained": dec["descent_agrees_with_exact"],
            "hsm_flops_by_op": train["hsm"]["flops_by_op"],
        }
        if bucket is not None:
            per_v[v]["bucketing"] = bucket
            for n, m in bucket["by_threads"].items():
                log(f"V={v}, {n} thread(s): bucketed/padded time {m['default_vs_padded_time']} "
                    f"({bucket['default_buckets']} buckets), best {m['best_bucketed_vs_padded_time']} ({m['best_buckets']})")
        log(f"V={v}: hsm/softmax time {per_v[v]['hsm_vs_softmax_time']}, memory {per_v[v]['hsm_vs_softmax_memory']}, "
            f"descent/exact decode {per_v[v]['descent_vs_exact_decode_time']}")

    def series(get) -> list[float]:
        return [get(per_v[v]) for v in vocab]

    figures = {
        "hsm_train_time": series(lambda r: r["train_seconds"]["hsm"]),
        "softmax_train_time": series(lambda r: r["train_seconds"]["softmax"]),
        "hsm_train_memory": series(lambda r: r["train_peak_mib"]["hsm"]),
        "softmax_train_memory": series(lambda r: r["train_peak_mib"]["softmax"]),
        "hsm_train_flops": series(lambda r: r["train_flops_per_token"]["hsm"]),
        "softmax_train_flops": series(lambda r: r["train_flops_per_token"]["softmax"]),
        "exact_decode_time": series(lambda r: r["decode_ms_per_token"]["exact"]),
        "descent_decode_time": series(lambda r: r["decode_ms_per_token"]["descent"]),
        "softmax_decode_time": series(lambda r: r["decode_ms_per_token"]["softmax"]),
        "hsm_max_depth": series(lambda r: r["tree"]["max_depth"]),
        "hsm_expected_path_length": series(lambda r: r["tree"]["expected_path_length"]),
    }
    alphas = {k: exponent(vocab, ys) for k, ys in figures.items()}
    hsm_vs = series(lambda r: r["hsm_vs_softmax_time"])
    scaling = {
        "exponent_of_V": alphas,
        "reference_exponents": {"log2_V": exponent(vocab, [math.log2(v) for v in vocab]), "V": 1.0},
        "verdict": {k: verdict(a) for k, a in alphas.items() if not k.startswith("softmax")},
        "verdict_thresholds": "alpha <= 0.3: consistent with O(log V); alpha >= 0.7: close to O(V)",
        "hsm_vs_softmax_time_shrinks_as_V_grows": all(b < a for a, b in zip(hsm_vs, hsm_vs[1:])),
        "hsm_vs_softmax_time_by_V": dict(zip(map(str, vocab), hsm_vs)),
    }
    bucket_summary = None
    if args.buckets:
        bucket_summary = {"method": f"{args.bucket_repeats} rounds after one warm-up pass each, the variants "
                                    f"alternating within a round; ratios are medians over rounds of the within-round "
                                    f"ratio; bucket caps chosen per batch to minimise padded rows"}
        for n in per_v[vocab[0]]["bucketing"]["by_threads"]:
            m = {v: per_v[v]["bucketing"]["by_threads"][n] for v in vocab}
            default = {str(v): m[v]["default_vs_padded_time"] for v in vocab}
            bucket_summary[f"{n}_threads"] = {
                "default_bucketed_vs_padded_time_by_V": default,
                "saves_over_10_percent_at_every_V": all(x is not None and x < 0.9 for x in default.values()),
                "best_buckets_by_V": {str(v): m[v]["best_buckets"] for v in vocab},
                "autograd_split_4_vs_padded_time_by_V": {
                    str(v): m[v]["variants"]["autograd_split_4"]["vs_padded_time"] for v in vocab},
                "default_vs_first_implementation_time_by_V": {
                    str(v): m[v]["default_vs_first_implementation_time"] for v in vocab},
            }
    result = {
        "benchmark": "hsm_head",
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "d_model": args.d_model,
        "train_tokens": args.tokens,
        "counts": f"numpy zipf a={ZIPF_A}, {COUNT_DRAWS} draws folded into V, seed {args.seed}, add-one smoothed",
        "memory_method": memory_method,
        "time_method": f"median of {args.repeats} passes per head after one warm-up pass each, the heads alternating",
        "decode_method": f"{args.decode_tokens} single hidden states per round, median of {args.decode_rounds} rounds",
        "by_vocab": {str(v): r for v, r in per_v.items()},
        "scaling": scaling,
        "bucketing": bucket_summary,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    json.dump(result, json_out)
    json_out.write("\n")
    json_out.flush()


if __name__ == "__main__":
    main()
