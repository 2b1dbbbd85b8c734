"""Peak memory and time of one training step of one 4-bit layer: QLoRA vs QDoRA vs dense DoRA (CPU).

Each method runs in a fresh subprocess on one LLaMA-7B-MLP-shaped layer (11008 x 4096, bf16 base,
NF4 with double quantization, rank 16): build the layer, drop the dense weight, then reset the
kernel's peak-RSS mark (/proc/self/clear_refs) and run ``--steps`` forward + backward steps. The
table reports the memory that stays (4-bit weight + adapter, or the dense weight) and the peak
*above* that during a step, next to the size of one dense copy of W0.

    python benchmarks/bench_quant_memory.py                  # the table in docs/speed.md (Linux, CPU)
    python benchmarks/bench_quant_memory.py --out 4096 --in 4096 --tokens 64
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ["qlora", "qdora", "qdora-exact", "dense-dora"]


def _rss(field: str) -> int:
    """VmRSS / VmHWM of this process, in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_one(method: str, out_f: int, in_f: int, tokens: int, steps: int, rank: int) -> dict[str, float]:
    import torch
    from torch import nn

    from dorakit.adapters.layers import LinearAdapter
    from dorakit.adapters.quant import Linear4bitAdapter, quantize_linear

    torch.manual_seed(0)
    dense = nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    if method == "dense-dora":
        layer = LinearAdapter(dense, "dora", rank, 2 * rank, backend="torch")
    else:
        layer = Linear4bitAdapter(quantize_linear(dense, compute_dtype=torch.bfloat16),
                                  "lora" if method == "qlora" else "dora", rank, 2 * rank,
                                  norm_grad="exact" if method == "qdora-exact" else "detach")
        del dense
    x = torch.randn(tokens, in_f, dtype=torch.bfloat16)
    gc.collect()
    layer(x).float().sum().backward()                               # warm-up: lazy inits, allocator
    layer.zero_grad(set_to_none=False)
    gc.collect()
    resident = _rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")                  # reset the peak-RSS mark to now
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        layer(x).float().sum().backward()
        times.append(time.perf_counter() - t0)
    return {"peak_above_resident_MB": (_rss("VmHWM") - resident) / 2**20, "step_ms": 1e3 * statistics.median(times),
            "dense_W0_MB": out_f * in_f * 2 / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=int, default=11008)
    p.add_argument("--in", dest="in_f", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # one run, in a subprocess
    a = p.parse_args()
    if a.method:
        print(json.dumps(run_one(a.method, a.out, a.in_f, a.tokens, a.steps, a.rank)))
        return
    print(f"layer {a.out}x{a.in_f} bf16, NF4 + double quant, rank {a.rank}, {a.tokens} tokens, "
          f"dense W0 = {a.out * a.in_f * 2 / 2**20:.0f} MB, 4-bit W0 ~ {a.out * a.in_f / 2 / 2**20:.0f} MB")
    print(f"{'method':<12} {'peak above resident (MB)':>26} {'step (ms)':>10}")
    for method in METHODS:
        cmd = [sys.executable, __file__, "--method", method, "--out", str(a.out), "--in", str(a.in_f),
               "--tokens", str(a.tokens), "--steps", str(a.steps), "--rank", str(a.rank)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"{method:<12} {r['peak_above_resident_MB']:>26.0f} {r['step_ms']:>10.0f}")


if __name__ == "__main__":
    main()
