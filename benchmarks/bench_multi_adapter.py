"""Many adapters on one base: generate() speed of dorakit's mixed-adapter batch vs the alternatives.

A LLaMA-shaped model built from a LlamaConfig (random weights, no download), rank 16 on all seven
projections, 8 different adapters (random nonzero B, so they differ), greedy decoding of a fixed number
of new tokens (min_new_tokens = max_new_tokens, so no row stops early). Rows, at batch 1 (adapter a0)
and batch 32 (8 adapters mixed, 4 prompts each):

    base            the model without adapters
    dorakit         unmerged under dk.cached_norms: one adapter (batch 1), dk.adapter_routing (batch 32)
    merged          dk.merge_adapters(model, name) per adapter, its rows generated, then unmerged: one
                    merged model per adapter run in turn (8 sub-batches of 4); merge time not counted
    peft-mixed      PEFT LoRA, generate(adapter_names=...) (PEFT refuses adapter_names with DoRA)
    peft-in-turn    PEFT DoRA unmerged, set_adapter per adapter, run in turn

Same process, same weights: PEFT loads the adapters dorakit saved (dk.save_adapter, PEFT's layout).
ms/token is the whole generate() call over the new tokens (prefill included); tok/s counts every row.

    python benchmarks/bench_multi_adapter.py --device cpu --presets tiny
    python benchmarks/bench_multi_adapter.py --device cuda --presets llama-1b,llama-8b --methods dora,lora
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

import dorakit as dk

PRESETS = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": (128, 344, 2, 4, 2, 2048),
    "w512": (512, 1376, 4, 8, 4, 8192),
    "llama-1b": (2048, 5632, 22, 32, 4, 32000),
    "llama-8b": (4096, 14336, 32, 32, 8, 128256),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NAMES = [f"a{i}" for i in range(8)]


def build(preset: str, dtype: torch.dtype, device: str) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, vocab = PRESETS[preset]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=1024)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[int], object], new: int, args: argparse.Namespace) -> tuple[float, object]:
    """(median seconds of ``fn(new)`` over --repeats calls after a short warm-up call, the last call's result)."""
    fn(min(new, 4))
    times, out = [], None
    for _ in range(args.repeats):
        sync(args.device)
        start = time.perf_counter()
        out = fn(new)
        sync(args.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def generate(model: nn.Module, ids: torch.Tensor, new: int, **kw: object) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, pad_token_id=0, **kw)
    return out[:, ids.shape[1]:]


def add_adapters(model: nn.Module, method: str, rank: int, backend: str = "auto") -> None:
    """8 named adapters a0..a7, each with its own random nonzero B (and perturbed magnitude for DoRA)."""
    gen = torch.Generator().manual_seed(1)
    for name in NAMES:
        dk.add_adapter(model, dk.AdapterConfig(method=method, rank=rank, alpha=2 * rank, targets=TARGETS,
                                                      backend=backend), name=name)
    with torch.no_grad():
        for _, layer in dk.adapter_layers(model):
            for name in layer.hosted_names():
                with layer.bound(name):
                    B = torch.randn(layer.lora_B.shape, generator=gen) * 0.02
                    layer.lora_B.copy_(B)
                    if getattr(layer, "magnitude", None) is not None:
                        layer.magnitude.mul_(1 + 0.05 * torch.randn(layer.magnitude.shape, generator=gen).to(
                            layer.magnitude))
    dk.set_adapter(model, NAMES[0])


def burn_in(model: nn.Module, ids: torch.Tensor, new: int, seconds: float) -> None:
    """Untimed generate() for ``seconds``: clocks and caches settle before the first timed row."""
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        generate(model, ids, new)


def in_turn(rows: list[str], run_one: Callable[[str, torch.Tensor], torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Each adapter's rows as one sub-batch, in turn; outputs put back in row order."""
    out = [None] * len(rows)
    for name in dict.fromkeys(rows):
        idx = [i for i, n in enumerate(rows) if n == name]
        for i, o in zip(idx, run_one(name, ids[idx]), strict=True):
            out[i] = o
    return torch.stack(out)


def dorakit_rows(model: nn.Module, prompts: dict[int, torch.Tensor], rows: dict[int, list[str]], args: argparse.Namespace,
                 ) -> dict[tuple[int, str], tuple[float, torch.Tensor]]:
    res = {}
    for batch, ids in prompts.items():
        with dk.cached_norms(model):
            if batch == 1:
                res[batch, "dorakit"] = timed(lambda new, ids=ids: generate(model, ids, new), args.new_tokens, args)
            else:
                def mixed(new: int, ids: torch.Tensor = ids, names: list[str] = rows[batch]) -> torch.Tensor:
                    with dk.adapter_routing(model, names):
                        return generate(model, ids, new)
                res[batch, "dorakit"] = timed(mixed, args.new_tokens, args)
        res[batch, "merged"] = merged_in_turn(model, ids, rows[batch], args)
    return res


def merged_in_turn(model: nn.Module, ids: torch.Tensor, rows: list[str], args: argparse.Namespace,
                   ) -> tuple[float, torch.Tensor]:
    """Merge each adapter, time its sub-batch's generate() (median over repeats), unmerge."""
    total, outs = 0.0, {}
    for name in dict.fromkeys(rows):
        idx = [i for i, n in enumerate(rows) if n == name]
        dk.set_adapter(model, name)
        dk.merge_adapters(model, name)
        seconds, outs[name] = timed(lambda new, idx=idx: generate(model, ids[idx], new), args.new_tokens, args)
        total += seconds
        dk.unmerge_adapters(model)
    dk.set_adapter(model, NAMES[0])
    return total, in_turn(rows, lambda name, _: outs[name], ids)


def peft_rows(model: nn.Module, directory: str, method: str, prompts: dict[int, torch.Tensor],
              rows: dict[int, list[str]], args: argparse.Namespace) -> tuple[nn.Module, dict]:
    """PEFT on the same base with the adapters dorakit saved; returns (the plain base back, results)."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, f"{directory}/{NAMES[0]}", adapter_name=NAMES[0])
    for name in NAMES[1:]:
        peft_model.load_adapter(f"{directory}/{name}", adapter_name=name)
    peft_model.eval()
    res = {}

    def one(name: str, ids: torch.Tensor, new: int) -> torch.Tensor:
        peft_model.set_adapter(name)
        return generate(peft_model, ids, new)

    for batch, ids in prompts.items():
        names = rows[batch]
        if method == "lora":
            res[batch, "peft-mixed"] = timed(lambda new, ids=ids, names=names: generate(
                peft_model, ids, new, adapter_names=names), args.new_tokens, args)
        else:
            res[batch, "peft-in-turn"] = timed(lambda new, ids=ids, names=names: in_turn(
                names, lambda name, sub: one(name, sub, new), ids), args.new_tokens, args)
    return peft_model.unload(), res


def run_method(model: nn.Module, method: str, prompts: dict, rows: dict, args: argparse.Namespace) -> tuple:
    add_adapters(model, method, args.rank, args.backend)
    res = dorakit_rows(model, prompts, rows, args)
    if not args.no_peft:
        with tempfile.TemporaryDirectory() as directory:
            dk.save_adapter(model, directory)
            for name in NAMES[1:]:
                dk.delete_adapter(model, name)
            dk.delete_adapter(model, NAMES[0])
            model, peft_res = peft_rows(model, directory, method, prompts, rows, args)
        res.update(peft_res)
    else:
        for name in [*NAMES[1:], NAMES[0]]:
            dk.delete_adapter(model, name)
    return model, res


def table(preset: str, base: dict, results: dict, args: argparse.Namespace) -> list[str]:
    lines = []
    for method, res in results.items():
        for batch in args.batches:
            merged = res.get((batch, "merged"), (None,))[0]
            for row in ("base", "dorakit", "merged", "peft-mixed", "peft-in-turn"):
                got = base.get(batch) if row == "base" else res.get((batch, row))
                if got is None:
                    continue
                seconds, out = got
                ref = res[batch, "dorakit"][1]
                same = "" if row in ("base", "dorakit") else f"{(out == ref).float().mean().item():.0%}"
                lines.append(f"| {preset} | {method} | {batch} | {row} | {batch * args.new_tokens / seconds:,.1f} | "
                             f"{1e3 * seconds / args.new_tokens:.2f} | {seconds / base[batch][0]:.2f}× | "
                             f"{merged / seconds:.2f}× | {same} |")
    return lines


def run_preset(preset: str, methods: list[str], dtype: torch.dtype, args: argparse.Namespace) -> None:
    """Print the table rows of one preset: the base model, then each method's adapters on the same weights."""
    model = build(preset, dtype, args.device)
    gen = torch.Generator().manual_seed(2)
    prompts = {b: torch.randint(3, model.config.vocab_size, (b, args.prompt_len), generator=gen).to(args.device)
               for b in args.batches}
    rows = {b: [NAMES[0]] if b == 1 else [NAMES[i % len(NAMES)] for i in range(b)] for b in args.batches}
    burn_in(model, prompts[args.batches[0]], args.new_tokens, args.burn_in)
    base = {b: timed(lambda new, ids=ids: generate(model, ids, new), args.new_tokens, args)
            for b, ids in prompts.items()}
    for method in methods:  # each method's rows as soon as they are measured
        model, result = run_method(model, method, prompts, rows, args)
        print("\n".join(table(preset, base, {method: result}, args)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--presets", default="tiny", help=f"comma-separated, of {sorted(PRESETS)}")
    parser.add_argument("--methods", default="dora,lora", help="comma-separated: dora, lora (or 'both')")
    parser.add_argument("--method", dest="methods", help="alias of --methods (dora | lora | both)")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes; > 1 mixes 8 adapters")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--backend", default="auto", choices=["auto", "fused", "triton", "torch"],
                        help="the adapters' backend (dk.AdapterConfig.backend)")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per row (median), after one warm-up")
    parser.add_argument("--burn-in", type=float, default=10.0,
                        help="seconds of untimed base-model generate() before the first timed row")
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT rows")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared CPU, spinning OpenMP threads distort the timings)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = ["dora", "lora"] if args.methods == "both" else args.methods.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    bad = [m for m in methods if m not in ("dora", "lora")] + [p for p in args.presets.split(",") if p not in PRESETS]
    if bad or any(b < 1 or (b > 1 and b % len(NAMES)) for b in args.batches):
        parser.error(f"unknown method / preset {bad}, or a batch > 1 that is not a multiple of {len(NAMES)}")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"device: {device_name} ({torch.get_num_threads()} CPU threads); torch {torch.__version__}; dtype {dtype}; "
          f"commit {commit}; backend {args.backend}; "
          f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens (greedy), rank {args.rank} on {TARGETS}, "
          f"{len(NAMES)} adapters; batch > 1: {len(NAMES)} adapters mixed\n")
    print("| preset | method | batch | row | tok/s | ms/token | time × base | tok/s × merged | tokens = dorakit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset in args.presets.split(","):
        run_preset(preset, methods, dtype, args)
        if args.device == "cuda":
            torch.cuda.empty_cache()

if __name__ == "__main__":
    main()
