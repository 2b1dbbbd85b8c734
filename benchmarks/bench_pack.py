"""Tokens/s of ``dorakit finetune --pack`` against padded batches: the same chats, model, seed and steps.

Builds a tiny LLaMA (word tokenizer with a chat template) and ``--n`` short chats of varied length in a
temporary folder, then runs ``dorakit finetune`` through the CLI in-process, alternating unpacked and
packed, ``--repeats`` times each; prints each run's tokens/s (the examples' own tokens: padding is not
counted either way) and the medians. Packed rows hold several examples, so a packed step sees more
tokens: compare tokens/s, not steps/s.

    python benchmarks/bench_pack.py                       # CPU, about a minute
    python benchmarks/bench_pack.py --hidden 256 --steps 20 --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _setup(root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    import torch
    import transformers
    from fixtures_text import chat_tokenizer

    words = [f"w{i}" for i in range(200)]
    tok = chat_tokenizer(root / "model", [" ".join(words)])
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=args.max_len, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "model")
    gen = torch.Generator().manual_seed(0)
    chats = []
    for _ in range(args.n):  # lengths skewed short, a few long: what padding wastes most on
        n = int(torch.randint(2, 12, (1,), generator=gen)) if torch.rand(1, generator=gen) < 0.8 else int(
            torch.randint(20, args.max_len // 2 - 10, (1,), generator=gen))
        q = " ".join(words[i] for i in torch.randint(0, 200, (n,), generator=gen).tolist())
        chats.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": q}]})
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    return root / "model", data


def _run(model: Path, data: Path, out: Path, pack: bool, args: argparse.Namespace) -> float:
    from dorakit.commands.cli import main

    argv = ["finetune", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--method", "dora",
            "--rank", "8", "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-len",
            str(args.max_len), "--device", args.device, "--log-every", str(args.steps), "--save-every", "0",
            *(["--pack"] if pack else [])]
    assert main(argv) == 0
    last = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()][-1]
    return float(last["tokens_per_s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256, help="chats")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, data = _setup(root, args)
        speeds: dict[bool, list[float]] = {False: [], True: []}
        for k in range(args.repeats):
            for pack in (False, True):
                speeds[pack].append(_run(model, data, root / f"run-{pack}-{k}", pack, args))
                print(f"{'packed' if pack else 'padded'} run {k}: {speeds[pack][-1]:,.0f} tokens/s", flush=True)
    padded, packed = statistics.median(speeds[False]), statistics.median(speeds[True])
    print(f"median tokens/s: padded {padded:,.0f}, packed {packed:,.0f}, packed / padded {packed / padded:.2f}x")


if __name__ == "__main__":
    main()
