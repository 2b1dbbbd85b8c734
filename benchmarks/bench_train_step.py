"""One training step (forward + backward + AdamW) of a LLaMA-shaped model: dorakit vs PEFT, side by side.

Every method runs in this one process on the same randomly initialised model (built from a config,
no weights downloaded), same batch, same rank and targets; the table reports the median step time
over the timed steps, tokens/s and the peak memory of each method's steps.

    python benchmarks/bench_train_step.py --device cuda --preset llama-1b       # the GPU table
    python benchmarks/bench_train_step.py --device cpu --preset tiny            # a CPU check

A method name may carry a mode suffix: "+compile", "+cudagraphs" (torch.compile's default and
reduce-overhead modes) or "+graph" (the eager step captured whole in one CUDA graph and replayed:
what the step costs with no host work per kernel). Ratios are also given within one mode.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import torch

import dorakit as dk

PRESETS = {  # hidden, intermediate, layers, heads, kv heads, batch, seq
    "tiny": (256, 688, 2, 4, 4, 2, 128),
    "llama-1b": (2048, 5632, 22, 32, 4, 4, 1024),
    "llama-1b-long": (2048, 5632, 22, 32, 4, 1, 4096),
    "llama-8b-4l": (4096, 14336, 4, 32, 8, 1, 4096),   # LLaMA-3-8B layer shape, 4 layers
    "32b-2l": (5120, 27648, 2, 40, 8, 1, 4096),        # a 32B-shaped layer stack (Qwen2.5-32B widths), 2 layers
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# dorakit-dora runs backend="auto" (triton on CUDA, fused on CPU); -fused / -torch force a backend.
# peft-*-nocast: PEFT with autocast_adapter_dtype=False (adapters in the base's bf16, not fp32).
# *-qlora / *-qdora: the seven projections quantized to NF4 (double quantization, the model's compute dtype) by
# dorakit.adapters.quant.quantize_model first, the same bitsandbytes Linear4bit layers for both tools;
# dorakit-qdora-fused / -triton: W0 dequantized once per forward for the norm and the product.
METHODS = ["frozen", "dorakit-lora", "peft-lora", "dorakit-dora", "peft-dora"]
QUANT_METHODS = ["dorakit-qdora", "dorakit-qlora", "peft-qdora", "peft-qlora", "dorakit-qdora-fused",
                 "dorakit-qdora-triton", "dorakit-qlora-fused"]
COMPILE_MODES = {"+compile": "default", "+cudagraphs": "reduce-overhead"}
"""Method suffixes that wrap the model in torch.compile, and the mode each uses (see wrap())."""
ALL_METHODS = METHODS + ["dorakit-dora-fused", "dorakit-dora-torch", "peft-lora-nocast", "peft-dora-nocast"] + QUANT_METHODS


def build(preset: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, _, _ = PRESETS[preset]
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(dtype)


def wrap(model: torch.nn.Module, method: str, rank: int) -> torch.nn.Module:
    """The model set up for ``method``; a "+compile" suffix wraps it in torch.compile (default mode),
    "+cudagraphs" in torch.compile(mode="reduce-overhead") (CUDA graphs); "+graph" leaves it eager
    (measure() captures the whole eager step in one CUDA graph)."""
    for suffix, mode in COMPILE_MODES.items():
        if method.endswith(suffix):
            return torch.compile(wrap(model, method.removesuffix(suffix), rank), mode=mode)
    method = method.removesuffix("+graph")
    if method == "frozen":  # the floor: backward through every layer, nothing to update (see inputs())
        return model.requires_grad_(False)
    parts = method.split("-")
    if parts[1] in ("qlora", "qdora"):
        from dorakit.adapters.quant import quantize_model

        quantize_model(model, TARGETS, bits=4, quant_type="nf4", double_quant=True,
                       compute_dtype=next(model.parameters()).dtype)  # bf16 on CUDA, float32 on the CPU
        parts[1] = parts[1][1:]
    if parts[0] == "dorakit":
        backend = parts[2] if len(parts) > 2 else "auto"
        dk.apply_adapters(model, dk.AdapterConfig(method=parts[1], rank=rank, alpha=2 * rank, targets=TARGETS,
                                                  backend=backend))
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                            use_dora=parts[1] == "dora"),
                          autocast_adapter_dtype=not method.endswith("nocast"))


def inputs(model: torch.nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's inputs. A frozen model gets its token embeddings as an input that requires grad
    (looked up outside the model, ~16 MB), so backward still runs through every layer; a hook on the
    embedding would break a compiled graph."""
    if any(p.requires_grad for p in model.parameters()):
        return {"input_ids": batch, "labels": batch}
    with torch.no_grad():
        embeds = model.get_input_embeddings()(batch)
    return {"inputs_embeds": embeds.requires_grad_(), "labels": batch}


def graphed_step(model: torch.nn.Module, batch: torch.Tensor, optimizer: torch.optim.Optimizer | None,
                 warmup: int) -> Callable[[], None]:
    """The whole eager step (forward, backward, AdamW) captured once in a CUDA graph, after ``warmup``
    steps on a side stream (PyTorch's whole-network capture recipe); each call replays it, so no
    kernel is launched from Python. The graph reads the same input tensors on every replay."""
    feeds = inputs(model, batch)

    def step() -> None:
        model(**feeds).loss.backward()
        if optimizer is not None:
            optimizer.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            model.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    feeds.get("inputs_embeds", batch).grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def measure(model: torch.nn.Module, batch: torch.Tensor, steps: int, warmup: int, device: str,
            graph: bool = False) -> tuple[float, float, float]:
    """(median step seconds, peak GiB, first step seconds) of ``steps`` steps after ``warmup``; ``graph``:
    CUDA-graph replays. The first step includes torch.compile's compilation for a compiled model."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, capturable=graph) if params else None
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    replay = graphed_step(model, batch, optimizer, warmup) if graph else None
    for i in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if replay is not None:
            replay()
        else:
            loss = model(**inputs(model, batch)).loss
            loss.backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i == 0:
            first = time.perf_counter() - start
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return statistics.median(times), peak, first


def profile_step(model: torch.nn.Module, batch: torch.Tensor, method: str, device: str) -> None:
    """One forward + backward under torch.profiler: wall ms, kernel launches and summed GPU kernel ms."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        model(**inputs(model, batch)).loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.device_time for e in kernels) / 1e3
    print(f"profile {method}: fwd+bwd wall {wall * 1e3:.1f} ms (profiled), {len(kernels)} kernels, "
          f"GPU kernel time {gpu_ms:.1f} ms")
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:90], []).append(e.device_time / 1e3)
    for name, times in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:12]:
        print(f"    {sum(times):7.2f} ms  {len(times):5d}x  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                        help="default: bfloat16 on cuda, float32 on cpu (CPU bf16 matmuls are slow)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, from {ALL_METHODS}, each optionally with a suffix: +compile "
                        "(torch.compile), +cudagraphs (torch.compile mode='reduce-overhead'), +graph (the "
                        "eager step captured whole in one CUDA graph)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the method list this many times, alternating its order; report the median round")
    parser.add_argument("--profile", action="store_true",
                        help="also print each method's CPU time and summed GPU kernel time for one step")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    dtype = getattr(torch, args.dtype)
    batch_size, seq = PRESETS[args.preset][5:]
    batch = torch.randint(0, 32000, (batch_size, seq), device=args.device)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {device_name}; torch {torch.__version__}; preset {args.preset}; {args.dtype}; "
          f"r={args.rank}; batch {batch_size} x {seq}; median of {args.steps} steps after {args.warmup} warm-up")
    methods = args.methods.split(",")
    results: dict[str, list[tuple[float, float, float]]] = {m: [] for m in methods}
    for r in range(args.rounds):  # alternate the order, so that drift (clocks, allocator) favours no one
        for method in methods if r % 2 == 0 else methods[::-1]:
            if method.endswith(tuple(COMPILE_MODES)):  # a fresh Dynamo cache per compiled method: the models
                torch._dynamo.reset()  # share transformers' forwards, and past the cache limit Dynamo runs eager
            model = wrap(build(args.preset, dtype, args.device), method, args.rank)
            try:
                graph = method.endswith("+graph")
                if graph and args.device != "cuda":
                    raise ValueError("+graph needs --device cuda")
                if graph and args.warmup < 1:  # AdamW's state must exist before the capture, or each
                    raise ValueError("+graph needs --warmup 1 or more")  # replay would reset it
                results[method].append(measure(model, batch, args.steps, args.warmup, args.device, graph))
                step, peak, first = results[method][-1]
                print(f"{method}: {step * 1e3:.1f} ms, {peak:.2f} GiB, first step {first:.1f} s", flush=True)
                if args.profile and r == 0 and not graph:
                    profile_step(model, batch, method, args.device)
            except Exception as e:  # noqa: BLE001 - one method failing (a compile mode, say) leaves the others
                print(f"{method} failed: {type(e).__name__}: {str(e)[-1500:]}", flush=True)
            del model
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
    if args.rounds > 1:
        print("per-round step ms: " + "; ".join(f"{m} " + " ".join(f"{s * 1e3:.1f}" for s, _, _ in results[m])
                                               for m in methods))
    rows = [(m, statistics.median(s for s, _, _ in results[m]), max(p for _, p, _ in results[m])) for m in methods
            if results[m]]
    step_of = {m: s for m, s, _ in rows}
    nan = float("nan")
    print("| method | step ms | tokens/s | peak GiB | / frozen | / frozen, same mode | / peft-dora | "
          "/ peft-dora, same mode |\n|---|---|---|---|---|---|---|---|")
    for method, step, peak in rows:
        mode = method[method.index("+"):] if "+" in method else ""  # compare eager with eager, compiled with compiled
        ratios = [step / step_of.get(ref, nan) for ref in ("frozen", "frozen" + mode, "peft-dora", "peft-dora" + mode)]
        print(f"| {method} | {step * 1e3:.1f} | {batch_size * seq / step:,.0f} | {peak:.2f} | "
              + " | ".join(f"{r:.2f}" for r in ratios) + " |")


if __name__ == "__main__":
    main()
