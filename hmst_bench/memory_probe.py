"""Peak memory of one training step of any registered architecture, measured on the real
process (Linux).

`training_peak_bytes(arch, config, batch, seq_len)` builds `arch` from `config` (a dict of its
config fields) in a fresh Python process, runs one forward and backward of its training loss on
random tokens, and returns how far the resident memory rose above where it stood just before
the step: the kernel's high-water mark (VmHWM) is reset through /proc/self/clear_refs after the
model and the batch exist, so imports and weights are not counted. This is what a one-step
gradient is about (activation memory independent of the number of recurrent cycles: hrm-codegen,
hrm-lora), measured as the operating system sees it rather than as autograd's saved tensors; on
a GPU the same question is answered by torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

_CHILD = r"""
import json, sys, torch
from hmst_bench.plugins import get_registry

args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
torch.manual_seed(0)
spec = get_registry().arch(args["arch"])
model = spec.build(spec.config_cls(**args["config"]), None).train()
ids = torch.randint(4, model.config.vocab_size, (args["batch"], args["seq_len"] + 1))
batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
with torch.no_grad():  # warm the allocator and the kernels once at this shape
    model.loss(batch)

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

before = kib("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the peak resident size to the current one
loss, _ = model.loss(batch)
loss.backward()
print(json.dumps({"peak_bytes": (kib("VmHWM") - before) * 1024}))
"""


def training_peak_bytes(arch: str, config: dict, batch: int, seq_len: int, threads: int = 1) -> int:
    """Bytes the resident set grows by during one training step of `arch` built from `config`."""
    args = json.dumps({"arch": arch, "config": config, "batch": batch, "seq_len": seq_len, "threads": threads})
    # a fixed mmap threshold: glibc then maps every large tensor on its own and unmaps it when
    # freed, so the resident size follows the live tensors instead of the allocator's caching
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, args], capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"])
