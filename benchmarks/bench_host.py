"""Host time of the eager step's pieces: single launches and one adapted nn.Linear, on tiny shapes.

The GPU work is a few microseconds, so each number is what the host spends per call (Python,
dispatch, launch); 154 adapted modules run in one LLaMA-1B step. Median of 5 rounds of 200 calls,
synchronized around each round.

    python benchmarks/bench_host.py            # CUDA if available, else CPU (no Triton there)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import dorakit as dk


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; {dtype}; x (8, 64), W0 (64, 64), r = 16")
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
    for method in ["frozen"] + [f"{v}-{b}" for v in ("lora", "dora") for b in backends]:
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
    for label, us in rows:
        print(f"  {us:8.1f} us  {label}")


if __name__ == "__main__":
    main()
