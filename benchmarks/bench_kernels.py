"""The DoRA kernels alone, on the projection shapes of LLaMA-1B / LLaMA-3-8B: time and bandwidth.

For each (out, in) shape: the per-step norm and adapter copies (``dora_prepare``: the Triton kernel,
and the torch ops of the "fused" backend), with the bandwidth it reaches reading W0 once (median of
CUDA-graph replays over copies of W0 that overflow the L2 cache). ``--sweep`` tries other launch
settings on the 1B shapes ("programs": 1 is one slice of K, no split). The setting kept in
``dorakit.adapters.kernels.triton_dora.PREPARE_CONFIG`` came from the same sweep run on a scratch copy of
the kernel over the 1B and 8B shapes, timed with ``do_bench`` (see docs/speed.md).

    python benchmarks/bench_kernels.py                      # bf16, r = 16, CUDA
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
from collections.abc import Callable

import torch

SHAPES = {  # (out, in) of each projection kind
    "llama-1b": {"q/o": (2048, 2048), "k/v": (256, 2048), "gate/up": (5632, 2048), "down": (2048, 5632)},
    "llama-8b": {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)},
}


def bench_us(fn: Callable[[torch.Tensor], object], weights: list[torch.Tensor], replays: int = 20) -> float:
    """Median GPU µs of fn(w): one CUDA graph calls it once per copy of W0 in ``weights`` (together
    several times the L2 cache, so each call reads its W0 from memory, as in a training step), and
    the graph's replays are timed with events. The graph leaves out the host's launch overhead."""
    for w in weights:  # compile, allocate
        fn(w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(w)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(weights))
    return statistics.median(times)


L2_ROTATION = 200e6
"""Bytes of W0 copies each timed graph cycles through: four times an H100's 50 MB L2."""


def main() -> None:
    from dorakit.adapters.functional import row_norm_sq
    from dorakit.adapters.kernels import dora_prepare, triton_dora

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--sweep", action="store_true", help="try every launch setting, not just the kept one")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; {args.dtype}; r={args.rank}")
    configs = [None]  # None: the kept triton_dora.PREPARE_CONFIG
    if args.sweep:
        configs += [{"block_n": bn, "block_k": bk, "num_warps": nw, "num_stages": ns, "programs": p}
                    for bn, bk, nw, ns, p in itertools.product((16, 32, 64), (64, 128, 256), (4, 8), (2, 3),
                                                               (1, 528, 1056))
                    if bn * bk <= 8192]
    for preset, shapes in SHAPES.items():
        for name, (n, k) in shapes.items():
            cfgs = configs if preset == "llama-1b" else configs[:1]  # the sweep on the 1B shapes only
            torch.manual_seed(0)
            w = torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5
            a = torch.randn(args.rank, k, device="cuda") / k**0.5
            b = torch.randn(n, args.rank, device="cuda") * 0.01
            wsq = row_norm_sq(w)
            w_bytes = w.numel() * w.element_size()
            weights = [w] + [w.clone() for _ in range(max(1, math.ceil(L2_ROTATION / w_bytes)) - 1)]
            ref = dora_prepare(w, a, b, 2.0, wsq, "fused")[0]
            fused_us = bench_us(lambda w, a=a, b=b, wsq=wsq: dora_prepare(w, a, b, 2.0, wsq, "fused"), weights)
            rows = [("torch (fused backend)", fused_us)]
            for cfg in cfgs:
                try:
                    out = triton_dora.norm_from_partials(triton_dora.dora_prepare(w, a, b, 2.0, cfg)[0])
                except Exception as e:  # noqa: BLE001 - a launch setting the compiler rejects
                    print(f"  {cfg}: {type(e).__name__}")
                    continue
                err = ((out - ref).abs() / ref).max().item()
                label = "triton " + ("(kept)" if cfg is None else str(cfg))
                us = bench_us(lambda w, a=a, b=b, cfg=cfg: triton_dora.dora_prepare(w, a, b, 2.0, cfg), weights)
                rows.append((f"{label} rel.err {err:.1e}", us))
            rows.sort(key=lambda r: r[1])
            print(f"{preset} {name} ({n} x {k}): reading W0 once at 3.35 TB/s = {w_bytes / 3.35e12 * 1e6:.1f} us")
            for label, us in rows[: 8 if args.sweep else len(rows)]:
                print(f"  {us:8.1f} us  {w_bytes / us / 1e3:7.0f} GB/s  {label}")


if __name__ == "__main__":
    main()
