"""Cost of the gpt2-hsm hierarchical-softmax head against a full softmax head, in one run.

Prints one JSON object with, for each vocabulary size V (default 4096, 32768, 50257; d = 768):

- training, 4096 tokens: forward+backward time and peak memory of the HSM head
  (`HSMHead.path_logprobs`, loss = -mean, backward) and of a full softmax head
  (`nn.Linear(d, V)` + `F.cross_entropy`) on the same hidden states and targets, and their
  ratios hsm/softmax; the head's FLOPs per token (torch.utils.flop_counter.FlopCounterMode over
  one forward+backward, divided by the tokens; it counts the matmuls, not the elementwise ops);
- decoding one hidden state at a time, time per token: exact (`all_logprobs` + argmax), tree
  descent (`descend`, approximate) and a full softmax (linear + argmax), and their ratios;
- the Huffman tree: max depth (every path is padded to it in training), expected path length
  (`tree.expected_code_length()`), unigram entropy, and the batch's mean path length;
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
memory_allocated before. FLOPs are counted in the same subprocess on the meta device (same ops and
shapes, no arithmetic).

Times are measured in the main process, both heads of a V built side by side: one warm-up pass
each, then --repeats passes each, the heads alternating (order flipped every round) so load from
other work on a shared machine falls on both alike; the figure is the median pass. The median
process CPU time is reported as well ("hsm_vs_softmax_cpu_time") as a cross-check. Decoding: the
three decoders alternate round by round over the same single hidden states; median per token.

    python benchmarks/hsm_head.py [--device cpu] [--vocab 4096,32768,50257] [--repeats 3]

Only the JSON goes to stdout; progress goes to stderr. About 3 minutes on 2 CPU cores, nearly
all of it the full softmax at the two large V.
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

    # FLOPs of one forward+backward, counted on the meta device (shapes only)
    meta_head, meta_loss = make_heads(kind, v, args.d_model, args.seed, "meta")
    mh = torch.empty(args.tokens, args.d_model, device="meta", requires_grad=True)
    mt = torch.empty(args.tokens, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        meta_loss(mh, mt).backward()
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
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    json.dump(result, json_out)
    json_out.write("\n")
    json_out.flush()


if __name__ == "__main__":
    main()
