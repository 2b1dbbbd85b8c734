"""Host time of the eager step's pieces: single launches and one adapted nn.Linear, on tiny shapes.

The GPU work is a few microseconds, so each number is what the host spends per call (Python,
dispatch, launch); 154 adapted modules run in one LLaMA-1B step. Median of 5 rounds of 200 calls,
synchronized around each round.

    python benchmarks/bench_host.py            # CUDA if available, else CPU (no Triton there)
    python benchmarks/bench_host.py --src /work/main/src --src src   # two trees side by side (before / after)

Prints DoRA / LoRA per layer forward + backward for each backend; "auto" is what a user gets.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import dorakit as dk

_CHILD = "_DORAKIT_BENCH_HOST_CHILD"

def per_call_us(fn: Callable[[], object], device: str, calls: int = 200, rounds: int = 7) -> float:
    times = []
    for _ in range(rounds):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times[2:])


def layer(method: str, device: str, dtype: torch.dtype, width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    linear = torch.nn.Linear(width, width, bias=False).to(device, dtype)
    if method == "frozen":
        return linear.requires_grad_(False)
    variant, backend = method.split("-")
    model = torch.nn.Sequential(linear)
    dk.apply_adapters(model, dk.AdapterConfig(method=variant, rank=16, alpha=32, targets="all-linear",
                                              backend=backend))
    return model[0]


def measure(device: str) -> list[tuple[str, float]]:
    """(label, microseconds per call) for every row of the table."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(8, 64, device=device, dtype=dtype)
    w = torch.randn(64, 64, device=device, dtype=dtype)
    rows = [("torch.empty", per_call_us(lambda: torch.empty(64, device=device), device)),
            ("F.linear", per_call_us(lambda: F.linear(x, w), device))]
    if device == "cuda":
        from dorakit.adapters.kernels import triton_dora as td

        a, b = torch.randn(16, 64, device=device), torch.randn(64, 16, device=device)
        bufs = td._copy_buffers(a, b, dtype)

        def launch() -> None:
            td._copies_kernel[(2,)](*bufs, 64, 64, 16, 2.0, 2, BLOCK_N=32, BLOCK_K=64, BLOCK_R=16)

        rows.append(("one Triton launch (the LoRA copies kernel)", per_call_us(launch, device)))
        rows.append(("dorakit.adapters.kernels.dora_prepare (allocations + the norm kernel)",
                     per_call_us(lambda: td.dora_prepare(w, a, b, 2.0), device)))
    backends = ["torch", "fused"] + (["triton"] if device == "cuda" else [])
    xg = torch.randn(8, 64, device=device, dtype=dtype, requires_grad=True)
    for method in ["frozen"] + [f"{v}-{b}" for v in ("lora", "dora") for b in ("auto", *backends)]:
        mod = layer(method, device, dtype, 64)
        with torch.no_grad():
            rows.append((f"{method} layer forward, no grad", per_call_us(lambda mod=mod: mod(x), device)))
        rows.append((f"{method} layer forward, grad", per_call_us(lambda mod=mod: mod(xg), device)))

        params = [xg, *(p for p in mod.parameters() if p.requires_grad)]

        def step(mod: torch.nn.Module = mod, params: list[torch.Tensor] = params) -> None:
            for p in params:  # as after zero_grad(set_to_none=True): backward stores, not adds
                p.grad = None
            y = mod(xg)
            y.backward(torch.ones_like(y))

        rows.append((f"{method} layer forward + backward (a whole backward call each)", per_call_us(step, device)))
    return rows


def _side_by_side(args: argparse.Namespace) -> None:
    """One child process per --src tree, alternated --alternations times (the host's load drifts);
    each cell is the median over the alternations of that tree's per-call medians."""
    results: dict[str, list[dict[str, float]]] = {src: [] for src in args.src}
    for _ in range(args.alternations):
        for src in args.src:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(src), **{_CHILD: "1"})
            proc = subprocess.run([sys.executable, __file__, "--device", args.device], env=env, capture_output=True,
                                  text=True, check=True)
            results[src].append(dict(json.loads(proc.stdout.strip().splitlines()[-1])))
    labels = list(results[args.src[0]][0])
    print("  ".join(f"[{i}] {src}" for i, src in enumerate(args.src)))
    table = {src: {k: statistics.median(r[k] for r in runs) for k in labels} for src, runs in results.items()}
    for label in labels:
        cells = "".join(f"{table[src].get(label, float('nan')):9.1f}" for src in args.src)
        print(f"{cells} us  {label}")
    _ratios(table)


def _ratios(table: dict[str, dict[str, float]]) -> None:
    """DoRA / LoRA host time per layer forward + backward, per tree, for every backend both have."""
    tail = " layer forward + backward (a whole backward call each)"
    for src, row in table.items():
        for backend in ("auto", "fused", "triton", "torch"):
            lora, dora = row.get(f"lora-{backend}{tail}"), row.get(f"dora-{backend}{tail}")
            if lora and dora:
                print(f"  {src}: DoRA / LoRA forward + backward, backend={backend}: {dora / lora:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--src", action="append", help="a dorakit src tree (repeatable): compare them side by side")
    parser.add_argument("--alternations", type=int, default=3)
    args = parser.parse_args()
    if os.environ.get(_CHILD):
        print(json.dumps(measure(args.device)))
        return
    if args.src:
        _side_by_side(args)
        return
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; {dtype}; x (8, 64), W0 (64, 64), r = 16")
    rows = measure(device)
    for label, us in rows:
        print(f"  {us:8.1f} us  {label}")
    _ratios({"this tree": dict(rows)})


if __name__ == "__main__":
    main()
