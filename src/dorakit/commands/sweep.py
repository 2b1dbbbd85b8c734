"""``dorakit params`` (trainable-parameter counts on the meta device) and ``dorakit sweep`` (rank sweeps).

``params`` builds the model from its config alone on PyTorch's meta device (no weights, no memory),
so a LLaMA-7B-shaped count costs nothing. ``sweep`` runs ``finetune`` once per (method, rank) on
the same data and seed and writes the accuracy-vs-rank table and figure (the paper's Fig. 5).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..adapters.config import AdapterConfig
from ..adapters.inject import apply_adapters
from ..formats.io import atomic_write_bytes
from ..adapters.params import count_parameters
from .report import markdown_table

# Shapes of the paper's base models (Touvron et al. 2023a/b; Llama 3 model card).
PRESETS: dict[str, dict[str, int]] = {
    "llama-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
    "llama2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
    "llama2-70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                   "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000},
}


def meta_model(model: str) -> torch.nn.Module:
    """A causal LM with no weights (meta device) from a preset name or a local model directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if model in PRESETS:
        config = LlamaConfig(**PRESETS[model])
    elif (Path(model) / "config.json").is_file():
        config = AutoConfig.from_pretrained(model, local_files_only=True)
    else:
        raise ValueError(f"--model {model!r}: neither a preset ({', '.join(PRESETS)}) nor a local model directory "
                         "with config.json.")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def adapted_meta_model(model: str, cfg: AdapterConfig | None) -> torch.nn.Module:
    """meta_model with ``cfg``'s adapters applied (None: full fine-tuning, every parameter trains)."""
    net = meta_model(model)
    if cfg is not None:
        apply_adapters(net, cfg)
    return net


def count_for(model: str, method: str, cfg: AdapterConfig | None) -> dict[str, float]:
    """Trainable and total parameters for ``method`` ("full" or an AdapterConfig's) on ``model``.

    The percentage divides by all parameters including the adapters, as PEFT's
    print_trainable_parameters does (this is what reproduces the paper's Table 1 percentages).
    """
    net = meta_model(model)
    base = sum(p.numel() for p in net.parameters())
    if method == "full" or cfg is None:
        return {"trainable": base, "total": base, "base": base, "percent": 100.0}
    apply_adapters(net, cfg)
    trainable, total = count_parameters(net)
    return {"trainable": trainable, "total": total, "base": base, "percent": 100 * trainable / total}


def sweep(finetune_args: object, methods: Sequence[str], ranks: Sequence[int], output_dir: str | Path,
          alpha_per_rank: float = 2.0, seeds: Sequence[int] = ()) -> list[dict[str, object]]:
    """Fine-tune once per (method, rank) with alpha = alpha_per_rank · rank; write sweep.md, sweep.csv,
    sweep.json and, with matplotlib, sweep.png (accuracy vs rank, one line per method).

    With ``seeds``, the whole sweep runs once per seed into ``<output_dir>/seed<S>`` and
    sweep_seeds.md / .json / .png summarise them (mean ± 95% interval, DoRA − LoRA paired by seed);
    the rows of every seed are returned, each with its ``seed``."""
    from ..training.recipes import FinetuneArgs, finetune

    if not isinstance(finetune_args, FinetuneArgs):
        raise TypeError("finetune_args must be a recipes.FinetuneArgs")
    if not finetune_args.eval_data:
        raise ValueError("a sweep compares accuracy: pass --eval-data.")
    out = Path(output_dir)
    if seeds:
        from .sweep_seeds import read_seed_sweeps, write_seed_summary

        every = []
        for seed in seeds:
            train = dataclasses.replace(finetune_args.train, seed=seed)
            rows = sweep(dataclasses.replace(finetune_args, train=train), methods, ranks, out / f"seed{seed}",
                         alpha_per_rank)
            every += [{**row, "seed": seed} for row in rows]
        write_seed_summary(out, {s: r for s, r in read_seed_sweeps(out).items() if s in seeds})
        return every
    rows: list[dict[str, object]] = []
    for method in methods:
        for rank in ranks:
            run_dir = out / f"{method}-r{rank}"
            run = dataclasses.replace(finetune_args, method=method, rank=rank, alpha=alpha_per_rank * rank,
                                      output_dir=str(run_dir),
                                      resume=finetune_args.resume and (run_dir / "run.json").exists())
            outcome = finetune(run)
            if outcome.result.interrupted:  # Ctrl-C: keep the table of the runs that finished
                _write_sweep(rows, out)
                raise KeyboardInterrupt(f"sweep interrupted in {run_dir}; rerun the same command with --resume "
                                        "to continue it")
            rows.append({"method": method, "rank": rank, "accuracy": 100 * outcome.result.eval["eval_accuracy"],
                         "trainable": outcome.trainable, "percent": 100 * outcome.trainable / outcome.total,
                         "seconds": outcome.result.seconds})
    _write_sweep(rows, out)
    return rows


def _write_sweep(rows: list[dict[str, object]], out: Path) -> None:
    columns = [("method", "method"), ("rank", "rank"), ("accuracy", "accuracy %"), ("trainable", "trainable"),
               ("percent", "trainable %"), ("seconds", "seconds")]
    atomic_write_bytes(out / "sweep.md", (markdown_table(rows, columns) + "\n").encode())
    atomic_write_bytes(out / "sweep.json", json.dumps(rows, indent=2).encode())
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k, _ in columns])
        writer.writeheader()
        writer.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [r for r in rows if r["method"] == method]
        ax.plot([r["rank"] for r in pts], [r["accuracy"] for r in pts], marker="o", label=str(method))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank r")
    ax.set_ylabel("accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=150)
    plt.close(fig)
