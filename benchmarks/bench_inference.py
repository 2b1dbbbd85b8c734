"""Generation speed of a LLaMA-shaped model: base vs DoRA unmerged (dk.cached_norms) vs DoRA merged, and PEFT.

Same process, same randomly initialised model (built from a config), greedy decoding of a fixed number
of new tokens; the table reports the median over repeats of the whole generate() call.

    python benchmarks/bench_inference.py --device cuda --preset llama-1b
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
from bench_train_step import PRESETS, TARGETS, build

import dorakit as dk

METHODS = ["base", "dorakit-dora-unmerged", "dorakit-dora-merged", "peft-dora-unmerged", "peft-dora-merged"]


def prepare(preset: str, method: str, rank: int, dtype: torch.dtype, device: str) -> torch.nn.Module:
    model = build(preset, dtype, device)
    if method.startswith("dorakit"):
        dk.apply_adapters(model, dk.AdapterConfig(method="dora", rank=rank, alpha=2 * rank, targets=TARGETS))
        layers = [layer for _, layer in dk.adapter_layers(model)]
    elif method.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, use_dora=True)
        )
        layers = [
            m for m in model.modules() if hasattr(m, "lora_B") and "default" in getattr(m, "lora_B", {})
        ]
    else:
        layers = []
    with torch.no_grad():  # a trained-looking adapter: nonzero B, so nothing is an identity
        for layer in layers:
            lora_B = (
                layer.lora_B if isinstance(layer.lora_B, torch.Tensor) else layer.lora_B["default"].weight
            )
            lora_B.normal_(std=0.01)
    if method.endswith("merged") and not method.endswith("unmerged"):
        if method.startswith("dorakit"):
            dk.merge_adapters(model)
        else:
            model = model.merge_and_unload()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    prompt = torch.randint(0, 32000, (args.batch, args.prompt), device=args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(
        f"device: {name}; torch {torch.__version__}; preset {args.preset}; {dtype}; r={args.rank}; batch "
        f"{args.batch}; prompt {args.prompt}; {args.new_tokens} new tokens (greedy); median of {args.repeats}"
    )
    rows = []
    for method in args.methods.split(","):
        model = prepare(args.preset, method, args.rank, dtype, args.device)
        times = []
        # dk.cached_norms: the unmerged DoRA layers compute their norms once for the whole generate() call
        with torch.no_grad(), dk.cached_norms(model):
            for i in range(args.repeats + 1):
                if args.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                out = model.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    do_sample=False,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    pad_token_id=0,
                )
                if args.device == "cuda":
                    torch.cuda.synchronize()
                if i > 0:  # the first call warms up
                    times.append(time.perf_counter() - start)
        assert out.shape[1] == args.prompt + args.new_tokens
        rows.append((method, statistics.median(times)))
        del model
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    base = next((t for m, t in rows if m == "base"), float("nan"))
    print("| method | generate ms | ms / token | tokens/s | / base |\n|---|---|---|---|---|")
    for method, t in rows:
        print(
            f"| {method} | {t * 1e3:.1f} | {t * 1e3 / args.new_tokens:.2f} | "
            f"{args.batch * args.new_tokens / t:,.0f} | {t / base:.2f} |"
        )


if __name__ == "__main__":
    main()
