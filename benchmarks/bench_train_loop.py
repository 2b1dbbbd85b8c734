"""dorakit's own training loop (dorakit.training.train.train) on a LLaMA-shaped model: eager vs ``cuda_graph=True``.

Where bench_train_step.py times one step in isolation, this runs the loop a user runs (``dorakit
finetune`` calls it): data collation, loss weighting, clipping, AdamW, the LR schedule, a metrics
line per step. The data are random token sequences of varied length (uniform in [seq/2, seq]),
right-padded per batch (eager) or to a bucket width (CUDA graphs: graphs.padded_width); tokens/s counts
the real tokens only. Step times are the differences of the logged elapsed times; the table gives
their median after the warm-up steps (the first capture falls there; a batch of a width not seen
before captures its graph when it comes, and that step is counted). Same model, same data, same process for every row; the method list runs
--rounds times, alternating its order, and the table gives the median round (per-round steps are printed).

    python benchmarks/bench_train_loop.py --preset llama-1b        # the GPU table (needs CUDA)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_train_step import PRESETS, build, wrap

from dorakit.training.data import IGNORE_INDEX, Batches, CausalExample, collate_causal
from dorakit.training.train import TrainConfig, train

METHODS = ["dorakit-dora", "dorakit-dora+graph", "dorakit-lora", "dorakit-lora+graph", "peft-dora", "peft-dora+graph",
           "peft-lora", "peft-lora+graph"]


def make_data(n: int, seq: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq // 2, seq + 1, (n,), generator=gen).tolist()
    seqs = [torch.randint(3, 32000, (length,), generator=gen).tolist() for length in lengths]

    def make_batch(idx: list[int]) -> dict[str, torch.Tensor]:  # right-padded with id 0, as the recipe collates
        return collate_causal([CausalExample(seqs[i], seqs[i]) for i in idx], 0)

    return make_batch


def run(method: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    graph = method.endswith("+graph")
    model = wrap(build(args.preset, torch.bfloat16, "cuda"), method.removesuffix("+graph"), args.rank)
    batch_size, seq = PRESETS[args.preset][5:]
    n = batch_size * (args.warmup + args.steps)
    cfg = TrainConfig(max_steps=args.warmup + args.steps, lr=1e-4, cuda_graph=graph)
    try:
        result = train(model, Batches(n, batch_size, seed=0), make_data(n, seq), cfg, out, progress=False,
                       device="cuda", items=lambda b: int((b["labels"][:, 1:] != IGNORE_INDEX).sum()),
                       pad_values={"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX})
    finally:  # a failed method leaves no model behind on the GPU
        del model
        gc.collect()
        torch.cuda.empty_cache()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in records if "elapsed_s" in r]
    tokens = [r["tokens"] for r in records if "tokens" in r]
    steps = [b - a for a, b in zip(elapsed[args.warmup - 1:], elapsed[args.warmup:])]
    step_tokens = [b - a for a, b in zip(tokens[args.warmup - 1:], tokens[args.warmup:])]
    return {"step_s": statistics.median(steps),
            "tokens_per_s": statistics.median(t / s for t, s in zip(step_tokens, steps)),
            "peak_gib": result.peak_memory_bytes / 2**30, "captures": result.graph_captures,
            "loss": result.losses[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-1b", choices=sorted(PRESETS))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated: dorakit-dora, dorakit-lora, peft-dora, peft-lora, each eager or with "
                        "+graph (train(cuda_graph=True))")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_train_loop.py needs a CUDA device (the eager-vs-graph question is a GPU one).")
    if args.warmup < 1:
        raise SystemExit("--warmup must be 1 or more (the first step captures the graph).")
    batch_size, seq = PRESETS[args.preset][5:]
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; preset {args.preset}; bf16 base, "
          f"fp32 adapters; r={args.rank}; batch {batch_size} x [{seq // 2}, {seq}] tokens; median of {args.steps} "
          f"steps after {args.warmup}")
    methods = args.methods.split(",")
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):  # alternate the order, so that drift (clocks, caches) favours no one
            for method in methods if r % 2 == 0 else methods[::-1]:
                try:
                    runs[method].append(run(method, args, Path(tmp) / f"{method}-{r}"))
                    print(f"round {r} {method}: " + ", ".join(f"{k} {v:.4g}" for k, v in runs[method][-1].items()),
                          flush=True)
                except Exception as e:  # noqa: BLE001 - one method failing leaves the others
                    print(f"{method} failed: {type(e).__name__}: {str(e)[-1500:]}", flush=True)
    rows = {m: {k: statistics.median(x[k] for x in runs[m]) for k in runs[m][0]} for m in methods if runs[m]}
    ref = rows.get("peft-dora", {}).get("step_s", float("nan"))
    print("| method | step ms | tokens/s | peak GiB | graphs captured | / peft-dora (eager) |\n|---|---|---|---|---|---|")
    for method, r in rows.items():
        print(f"| {method} | {r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.2f} | "
              f"{r['captures']} | {r['step_s'] / ref:.2f} |")


if __name__ == "__main__":
    main()
