"""Batch-1 decoding with one unmerged adapter: where the time per token goes.

Part 1, one layer: the time of one call at 1 row (a decode step's shape) of nn.Linear against a LoRA /
DoRA adapter on it (backend fused and triton) inside dk.cached_norms, eval, no grad: on a GPU this is
the host's cost per call (launches), which decides batch-1 decoding of an eager model.
Part 2, the model: generate() time per token at batch 1 for the base model, one merged adapter and one
unmerged adapter (DoRA, LoRA; backend auto, and on CUDA triton, whose calls of <= 16 rows take the one-launch
decode kernel), the rows interleaved over --rounds (median), so drift of
clocks and caches hits every row alike.

    python benchmarks/bench_decode.py --device cuda --preset llama-1b
    python benchmarks/bench_decode.py --device cpu --preset tiny --new-tokens 16
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import time

import torch
from torch import nn

import dorakit as dk
from bench_multi_adapter import PRESETS, TARGETS, build, burn_in, generate, sync


def layer_call_us(layer: nn.Module, x: torch.Tensor, device: str, calls: int = 2000) -> float:
    """Median over 5 runs of the mean time of ``calls`` calls, in microseconds."""
    runs = []
    with torch.no_grad():
        for _ in range(50):
            layer(x)
        for _ in range(5):
            sync(device)
            start = time.perf_counter()
            for _ in range(calls):
                layer(x)
            sync(device)
            runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def part_layer(args: argparse.Namespace, dtype: torch.dtype) -> None:
    hidden = PRESETS[args.preset][0]
    x = torch.randn(1, 1, hidden, device=args.device, dtype=dtype)
    print(f"\none layer ({hidden} x {hidden}), 1 row, us per call (median of 5 x 2000 calls)\n")
    print("| layer | us / call | × nn.Linear |\n|---|---|---|")
    base = nn.Linear(hidden, hidden, bias=False, device=args.device, dtype=dtype).eval()
    t0 = layer_call_us(base, x, args.device)
    print(f"| nn.Linear | {t0:.1f} | 1.00× |")
    backends = ["fused", "triton"] if args.device == "cuda" else ["fused"]
    for method in ("lora", "dora"):
        for backend in backends:
            model = nn.Sequential(nn.Linear(hidden, hidden, bias=False, device=args.device, dtype=dtype))
            dk.apply_adapters(model, dk.AdapterConfig(method=method, rank=args.rank, targets=["0"], backend=backend))
            model.eval()
            with dk.cached_norms(model):
                t = layer_call_us(model[0], x, args.device)
            print(f"| {method} {backend} | {t:.1f} | {t / t0:.2f}× |", flush=True)


def part_model(args: argparse.Namespace, dtype: torch.dtype) -> None:
    model = build(args.preset, dtype, args.device)
    ids = torch.randint(3, model.config.vocab_size, (1, args.prompt_len),
                        generator=torch.Generator().manual_seed(2)).to(args.device)
    configs = {}
    for method in ("dora", "lora"):
        for backend in (["auto", "triton"] if args.device == "cuda" else ["auto"]):
            configs[f"{method} {backend}"] = dk.AdapterConfig(method=method, rank=args.rank, alpha=2 * args.rank,
                                                             targets=TARGETS, backend=backend)
    times: dict[str, list[float]] = {}
    burn_in(model, ids, args.new_tokens, args.burn_in)
    for _ in range(args.rounds):
        for name, config in [("base", None), *configs.items(), ("merged dora", configs["dora auto"])]:
            if config is not None:
                dk.apply_adapters(model, config)
                model.eval()
                with torch.no_grad():
                    for _, layer in dk.adapter_layers(model):
                        layer.lora_B.normal_(std=0.02)
                if name.startswith("merged"):
                    dk.merge_adapters(model)
            with dk.cached_norms(model):
                generate(model, ids, 4)  # warm-up (the pack is built here)
                sync(args.device)
                start = time.perf_counter()
                generate(model, ids, args.new_tokens)
                sync(args.device)
            times.setdefault(name, []).append((time.perf_counter() - start) / args.new_tokens * 1e3)
            if config is not None:
                if name.startswith("merged"):
                    dk.unmerge_adapters(model)
                dk.remove_adapters(model)
    base = statistics.median(times["base"])
    print(f"\n{args.preset}, batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens, rank {args.rank} on all "
          f"seven projections; median of {args.rounds} interleaved rounds\n")
    print("| row | ms / token | × base |\n|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {median / base:.2f}× |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--burn-in", type=float, default=5.0, help="seconds of untimed base generate() first")
    parser.add_argument("--parts", default="layer,model", help="comma-separated: layer, model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; dtype {dtype}; commit {commit}; "
          f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    if "layer" in args.parts:
        part_layer(args, dtype)
    if "model" in args.parts:
        part_model(args, dtype)


if __name__ == "__main__":
    main()
