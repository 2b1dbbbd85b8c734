"""Run by torchrun from test_distributed.py: one DoRA / LoRA training step of a tiny Llama sharded with
FSDP2 (dorakit.training.distributed.wrap), against the same step of the unsharded model in this process.

Prints one JSON line (rank 0): how many all-gathers FSDP issued, and the largest differences of the
loss and of every gradient from the unsharded reference.

    torchrun --standalone --nproc-per-node 2 tests/dist_worker.py dora [fp32|bf16]
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
import transformers

import dorakit as dk
from dorakit.training.distributed import Dist, autocast_needed, setup, teardown, wrap


def tiny_llama(method: str) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    dk.apply_adapters(model, dk.AdapterConfig(method=method, rank=4, alpha=8.0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B != 0 and m != ||W0||: the norm and every gradient matter
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def main(method: str, precision: str) -> None:
    d, device = setup("fsdp", "cpu")
    model = tiny_llama(method)
    reference = copy.deepcopy(model)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    if precision == "bf16":  # what FSDP's bf16 setup does to an adapter model, unsharded
        for p in reference.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    with amp:
        ref_loss = reference(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}

    sharded = wrap(model, Dist("fsdp", d.rank, d.world_size, d.local_rank), device, precision)
    seen = {}
    adapter = next(m for n, m in sharded.named_modules() if n.endswith("q_proj"))
    adapter.register_forward_pre_hook(lambda mod, args: seen.update(
        weight=str(mod.base_layer.weight.dtype), lora_A=str(mod.lora_A.dtype),
        magnitude=str(getattr(mod, "magnitude", mod.lora_A).dtype), autocast=torch.is_autocast_enabled("cpu")))
    gathers, gathered = 0, 0
    names = [n for n in ("all_gather_single", "all_gather_into_tensor") if hasattr(dist, n)]  # FSDP2 calls one
    real = {n: getattr(dist, n) for n in names}

    def counting(name: str) -> object:
        def call(output: torch.Tensor, *args: object, **kwargs: object) -> object:
            nonlocal gathers, gathered
            gathers, gathered = gathers + 1, gathered + output.numel()
            return real[name](output, *args, **kwargs)
        return call

    for n in names:
        setattr(dist, n, counting(n))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16" and autocast_needed(sharded)):
        loss = sharded(input_ids=ids, labels=ids).loss  # every process the same batch: the mean is the reference
    loss.backward()
    for n in names:
        setattr(dist, n, real[n])
    grads = {n: p.grad.full_tensor() for n, p in sharded.named_parameters() if p.requires_grad}
    result = {
        "method": method, "precision": precision, "world": d.world_size, "dtypes_in_forward": seen, "gathers": gathers, "gathered": gathered,
        "magnitude": sum(p.numel() for n, p in reference.named_parameters() if n.endswith("magnitude")),
        "loss_diff": abs(loss.item() - ref_loss.item()),
        "grad_diff": max((grads[n] - g).abs().max().item() for n, g in ref_grads.items()),
        "grad_scale": max(g.abs().max().item() for g in ref_grads.values()),
        "same_names": sorted(grads) == sorted(ref_grads),
        "sharded_magnitude": type(dict(sharded.named_parameters())[next(
            n for n in grads if n.endswith("magnitude"))]).__name__ if method == "dora" else None,
    }
    if d.main:
        print(json.dumps(result))
    teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "fp32")
