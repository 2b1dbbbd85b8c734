"""Run by torchrun from test_distributed_quant.py: one QDoRA training step of a tiny Llama loaded in NF4
(BitsAndBytesConfig, as ``dorakit finetune --load-in-4bit`` loads it) and sharded with FSDP2
(dorakit.training.distributed.wrap), against the same step of the unsharded 4-bit model in this process.

Prints one JSON line (rank 0): how each packed 4-bit weight is stored between forwards (its type, dtype and
this rank's share of the bytes), and the largest differences of the loss and of every gradient from the
unsharded reference.

    torchrun --standalone --nproc-per-node 2 tests/training/qdora_worker.py MODEL_DIR
"""

from __future__ import annotations

import json
import sys

import torch
from torch.distributed.tensor import DTensor, Shard

import dorakit as dk
from dorakit.adapters.quant import is_linear4bit
from dorakit.training.distributed import setup, teardown, wrap
from dorakit.training.models import load_model


def qdora(model_dir: str) -> torch.nn.Module:
    """The NF4 model with DoRA on every projection, A, B and m moved off their init (seeded alike on every rank)."""
    torch.manual_seed(0)
    model, _ = load_model(model_dir, "causal", load_in_4bit=True, device=torch.device("cpu"))
    dk.apply_adapters(model, dk.AdapterConfig(method="dora", rank=4, alpha=8.0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B != 0 and m != ||W0||: the norm and every gradient matter
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def main(model_dir: str) -> None:
    d, device = setup("fsdp", "cpu")
    ids = torch.randint(2, 20, (2, 12), generator=torch.Generator().manual_seed(2))
    reference = qdora(model_dir)
    ref_loss = reference(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    packed = {n: m.weight.numel() for n, m in reference.named_modules() if is_linear4bit(m)}

    sharded = wrap(qdora(model_dir), d, device, "fp32")
    stored = {}
    for name, module in sharded.named_modules():
        if is_linear4bit(module):
            w = module.weight
            stored[name] = {"type": type(w.data).__name__, "dtype": str(w.dtype), "frozen": not w.requires_grad,
                            "shard0": isinstance(w.data, DTensor) and w.data.placements == (Shard(0),),
                            "local": w.data.to_local().numel() if isinstance(w.data, DTensor) else w.numel(),
                            "whole": packed[name]}
    loss = sharded(input_ids=ids, labels=ids).loss  # every process the same batch: the mean is the reference
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in sharded.named_parameters() if p.requires_grad}
    result = {
        "world": d.world_size, "stored": stored,
        "loss_diff": abs(loss.item() - ref_loss.item()),
        "grad_diff": max((grads[n] - g).abs().max().item() for n, g in ref_grads.items()),
        "grad_scale": max(g.abs().max().item() for g in ref_grads.values()),
        "same_names": sorted(grads) == sorted(ref_grads),
    }
    if d.main:
        print(json.dumps(result))
    teardown()


if __name__ == "__main__":
    main(sys.argv[1])
