"""`dorakit finetune` under torchrun: step time, tokens/s and peak GPU memory per strategy and process count.

Builds a LLaMA-shaped model from a config (random weights, saved to a local directory; nothing is
downloaded) and synthetic instruction records of a fixed length, then runs the real command,
``torchrun --nproc-per-node N -m dorakit finetune --strategy S``, for each (N, strategy) and reads
its metrics.jsonl and summary.json. The per-process batch stays the same, so N processes train
N times the tokens per step.

    python benchmarks/bench_distributed.py --preset llama-1b --nprocs 1 2 --strategies none ddp fsdp
    python benchmarks/bench_distributed.py --preset tiny --device cpu --nprocs 1 2 --strategies ddp fsdp
    python benchmarks/bench_distributed.py --load-in-4bit --nprocs 1 2 --strategies none fsdp   # QDoRA
    python benchmarks/bench_distributed.py --load-in-4bit --preset llama-8b --nprocs 1 2 --strategies fsdp \
        --same-global-batch                                       # issue 27: QDoRA 8B, 1 vs 2 GPUs

``--load-in-4bit`` runs each command with ``dorakit finetune --load-in-4bit`` (NF4 base, QLoRA /
QDoRA). Several processes shard the NF4 base with ``--strategy fsdp``; ``--strategy ddp`` with a
4-bit base is refused by ``dorakit finetune``, and such a row prints its one-line error.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

PRESETS = {  # hidden, intermediate, layers, heads, kv heads, per-process batch, tokens per example
    "tiny": (64, 128, 2, 4, 2, 2, 64),
    "llama-1b": (2048, 5632, 22, 32, 4, 4, 1024),
    "llama-8b-4l": (4096, 14336, 4, 32, 8, 1, 2048),    # LLaMA-3-8B layers, 4 of them
    "llama-8b": (4096, 14336, 32, 32, 8, 1, 2048),      # LLaMA-3-8B-shaped (saved in bf16: ~16 GB on disk)
}
VOCAB = 32000


def build(preset: str, root: Path) -> tuple[Path, Path]:
    """A random LLaMA of ``preset``'s shape with a word-level tokenizer, and 64 records whose prompt +
    response tokenize to about the preset's length."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    hidden, inter, layers, heads, kv, _, length = PRESETS[preset]
    words = [f"w{i}" for i in range(VOCAB - 3)]
    vocab = {tok: i for i, tok in enumerate(["<s>", "</s>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    model_dir = root / "model"
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(model_dir)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                   bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if hidden >= 4096 else previous)  # an 8B model in fp32 is 32 GB
    try:
        transformers.LlamaForCausalLM(cfg).save_pretrained(model_dir)
    finally:
        torch.set_default_dtype(previous)
    rng = random.Random(0)
    records = [{"instruction": " ".join(rng.choices(words, k=length - 60)), "input": "",
                "output": " ".join(rng.choices(words, k=20)), "answer": "x"} for _ in range(64)]
    data = root / "train.json"
    data.write_text(json.dumps(records))
    return model_dir, data


def run(model: Path, data: Path, out: Path, nproc: int, strategy: str, args: argparse.Namespace) -> dict:
    batch, length = PRESETS[args.preset][5:]
    accum = max(args.nprocs) // nproc if args.same_global_batch else 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "dorakit", "finetune", "--model", str(model), "--data", str(data), "--output-dir", str(out),
           "--method", args.method, "--rank", str(args.rank), "--alpha", str(2 * args.rank), "--max-steps",
           str(args.steps), "--batch-size", str(batch), "--max-len", str(length), "--precision", args.precision,
           "--device", args.device, "--strategy", strategy, "--train-on-inputs", "--grad-accum", str(accum)]
    if args.load_in_4bit:
        cmd.append("--load-in-4bit")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "4"})
    if proc.returncode != 0:  # dorakit's own one-line error if there is one (torchrun prints a banner after it)
        lines = proc.stderr.strip().splitlines()
        ours = [ln for ln in lines if ln.startswith("dorakit: error:")]
        return {"error": (ours or lines or [f"exit {proc.returncode}"])[-1]}
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in itertools.pairwise(lines)][args.warmup:]
    summary = json.loads((out / "summary.json").read_text())
    step_tokens = (lines[-1]["tokens"] - lines[0]["tokens"]) / (len(lines) - 1)
    step_s = statistics.median(times)
    return {"step_ms": 1000 * step_s, "tokens_per_s": step_tokens / step_s,
            "peak_gib": summary["peak_cuda_bytes"] / 2**30, "final_loss": summary["final_loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="llama-1b")
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--strategies", nargs="+", default=["none", "ddp", "fsdp"])
    p.add_argument("--method", default="dora")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3, help="step times left out of the median")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--device", default="auto")
    p.add_argument("--workdir", default=None)
    p.add_argument("--load-in-4bit", action="store_true", help="NF4 base (QLoRA / QDoRA), as finetune's flag")
    p.add_argument("--same-global-batch", action="store_true",
                   help="N processes run --grad-accum max(nprocs)/N, so every row trains the same global batch "
                        "(and the same losses, to rounding)")
    args = p.parse_args()
    if args.same_global_batch and any(max(args.nprocs) % n for n in args.nprocs):
        p.error(f"--same-global-batch needs every --nprocs to divide the largest, got {args.nprocs}")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="dorakit-bench-"))
    model, data = build(args.preset, root)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "CPU"
    base = "NF4 base (--load-in-4bit)" if args.load_in_4bit else "dense base"
    print(f"{args.preset}, {args.method} r{args.rank}, {base}, {args.precision}, per-process batch "
          f"{PRESETS[args.preset][5]} × {PRESETS[args.preset][6]} tokens"
          + (f", global batch {max(args.nprocs) * PRESETS[args.preset][5]} in every row" if args.same_global_batch
             else "") + f", {device}, torch {torch.__version__}")
    print("| processes | strategy | step ms | tokens/s | peak GiB per process | final loss |")
    print("|---|---|---|---|---|---|")
    for nproc in args.nprocs:
        for strategy in args.strategies:
            if strategy == "none" and nproc > 1:
                continue
            r = run(model, data, root / f"{strategy}-{nproc}", nproc, strategy, args)
            if "error" in r:
                print(f"| {nproc} | {strategy} | error: {r['error']} | | | |", flush=True)
            else:
                print(f"| {nproc} | {strategy} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.2f} | "
                      f"{r['final_loss']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
