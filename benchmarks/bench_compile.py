"""Compile time of a tiny adapted model under torch.compile(fullgraph=True): DoRA against LoRA.

One process per source tree, DoRA and LoRA in the same process. Each sample is a fresh compile
(torch._dynamo.reset(), Inductor's caches off) timed over the first forward + backward, which
compiles both graphs; the median of ``--repeats`` samples (after one discarded) is printed, then a check that the compiled
outputs and gradients match eager. ``--src`` compares trees side by side (e.g. main's src before the
custom ops against this branch's).

    python benchmarks/bench_compile.py --backend aot_eager --backend inductor
    python benchmarks/bench_compile.py --src /work/main/src --src src        # before vs after
    # GPU (bf16, the fused / Triton paths, the 1B-like width): see --help
    python benchmarks/bench_compile.py --device cuda --dtype bfloat16 --width 2048 --layers 4 --backend inductor
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

_CHILD = "_DORAKIT_BENCH_COMPILE_CHILD"


def _model(method: str, args: argparse.Namespace):  # noqa: ANN202 - a torch.nn.Sequential
    import torch
    from torch import nn

    import dorakit as dk

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    layers: list[nn.Module] = []
    for _ in range(args.layers):
        layers += [nn.Linear(args.width, args.width), nn.GELU()]
    model = nn.Sequential(*layers).to(args.device, dtype).requires_grad_(False)
    dk.apply_adapters(model, dk.AdapterConfig(method=method, rank=args.rank, alpha=2.0 * args.rank,
                                              targets="all-linear"))
    with torch.no_grad():
        for _, layer in dk.adapter_layers(model):
            layer.lora_B.normal_(std=0.05)
    return model


def _step(model, x):  # noqa: ANN001, ANN202
    for p in model.parameters():
        p.grad = None
    y = model(x)
    y.float().square().mean().backward()
    return y.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _child(args: argparse.Namespace) -> dict:
    import torch

    import dorakit

    x = torch.randn(args.batch, args.width, device=args.device, dtype=getattr(torch, args.dtype))
    out: dict = {"torch": torch.__version__, "dorakit": os.path.dirname(dorakit.__file__), "rows": []}
    for backend in args.backend:
        for method in ("lora", "dora"):
            model = _model(method, args)
            y_ref, g_ref = _step(model, x)
            times = []
            for _ in range(args.repeats + 1):  # the first, discarded, warms up Dynamo itself
                torch._dynamo.reset()
                compiled = torch.compile(model, fullgraph=True, backend=backend)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                y, grads = _step(compiled, x)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            times = times[1:]
            err = max([((y - y_ref).norm() / y_ref.norm()).item()]
                      + [((g - r).norm() / r.norm().clamp_min(1e-30)).item() for g, r in zip(grads, g_ref)])
            out["rows"].append({"backend": backend, "method": method, "median_s": statistics.median(times),
                                "times_s": times, "max_rel_err_vs_eager": err})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", action="append", help="torch.compile backend (repeatable; default aot_eager)")
    parser.add_argument("--src", action="append", help="a dorakit src tree to import (repeatable; default: installed)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.backend = args.backend or ["aot_eager"]
    if os.environ.get(_CHILD):
        print(json.dumps(_child(args)))
        return
    argv = [a for a in sys.argv[1:]]
    for src in args.src or [None]:
        env = dict(os.environ, **{_CHILD: "1", "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"})
        if src is not None:
            env["PYTHONPATH"] = os.path.abspath(src)
        proc = subprocess.run([sys.executable, __file__, *argv], env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stderr[-3000:])
            sys.exit(proc.returncode)
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"dorakit from {res['dorakit']}; torch {res['torch']}; {args.device} {args.dtype}; {args.layers} x "
              f"Linear({args.width}, {args.width}) + GELU, r = {args.rank}, x ({args.batch}, {args.width}); "
              f"median of {args.repeats} fresh compiles (first forward + backward)")
        by = {(r["backend"], r["method"]): r for r in res["rows"]}
        for backend in args.backend:
            lora, dora = by[(backend, "lora")], by[(backend, "dora")]
            for r in (lora, dora):
                print(f"  {backend:10s} {r['method']:5s} {r['median_s']:7.2f} s  "
                      f"(max rel err vs eager {r['max_rel_err_vs_eager']:.1e})")
            print(f"  {backend:10s} DoRA / LoRA = {dora['median_s'] / lora['median_s']:.2f}")


if __name__ == "__main__":
    main()
