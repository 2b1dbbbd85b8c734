"""GPU checks of the eager layers: bf16 base weights, autocast, device placement. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dorakit as dk
from dorakit.adapters.layers import LinearAdapter

pytestmark = pytest.mark.gpu
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BF16_EPS = 2.0 ** -8  # bf16 has 8 significant bits (7 stored)


def _perturbed_dora(out_f: int, in_f: int, rank: int, dtype: torch.dtype) -> LinearAdapter:
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f, bias=True).to("cuda", dtype)
    layer = LinearAdapter(base, "dora", rank, 2.0 * rank)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.05)
        layer.magnitude.mul_(torch.empty_like(layer.magnitude).uniform_(0.5, 1.5))
    return layer


def _reference(layer: LinearAdapter, x: torch.Tensor) -> torch.Tensor:
    """float64 dense DoRA from the layer's own (rounded) tensors: m ⊙ V / ||V||_c, V = W0 + sBA."""
    W = layer.base_layer.weight.double()
    V = W + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    W_adapted = layer.magnitude.double().unsqueeze(1) * V / V.norm(dim=1, keepdim=True)
    return x.double() @ W_adapted.T + layer.base_layer.bias.double()


@cuda
def test_bf16_base_matches_float64_reference() -> None:
    layer = _perturbed_dora(257, 193, 8, torch.bfloat16)
    assert layer.lora_A.dtype == torch.float32
    x = torch.randn(4, 33, 193, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = _reference(layer, x)
    # Inputs are exact bf16 values; the error comes from bf16 rounding of x W0ᵀ and of the output:
    # relative to the output scale, a few bf16 epsilons over a length-193 dot product.
    scale = ref.abs().max().item()
    assert (y.double() - ref).abs().max().item() <= 4 * BF16_EPS * scale


@cuda
def test_autocast_forward_backward_is_finite_and_close() -> None:
    layer = _perturbed_dora(128, 96, 4, torch.float32)
    x = torch.randn(8, 96, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    y.float().square().mean().backward()
    ref = _reference(layer, x.detach())
    assert (y.double() - ref).abs().max().item() <= 4 * BF16_EPS * ref.abs().max().item()
    for p in (layer.lora_A, layer.lora_B, layer.magnitude, x):
        assert p.grad is not None and torch.isfinite(p.grad).all()


@cuda
def test_merge_unmerge_bf16_restores_weight_to_rounding() -> None:
    layer = _perturbed_dora(64, 48, 4, torch.bfloat16)
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(5, 48, device="cuda", dtype=torch.bfloat16)
    layer.eval()
    y = layer(x)
    layer.merge()
    assert (layer(x).float() - y.float()).abs().max().item() <= 4 * BF16_EPS * y.float().abs().max().item()
    layer.unmerge()
    # merge rounds W' = g ⊙ (W0 + ΔW) to bf16 (error ≤ ulp of |W0 + ΔW|, carried back through / g),
    # unmerge rounds W0 again: a few bf16 epsilons of |W0| + |ΔW| per entry.
    delta = (layer.scaling * layer.lora_B @ layer.lora_A).detach()
    bound = 4 * BF16_EPS * (w0.float().abs() + delta.abs())
    assert ((layer.base_layer.weight.float() - w0.float()).abs() <= bound).all()


@cuda
def test_apply_adapters_on_cuda_model_keeps_device() -> None:
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).cuda()
    dk.apply_adapters(model, dk.AdapterConfig(method="dora", rank=4, targets=["0", "2"]))
    for _, layer in dk.adapter_layers(model):
        assert layer.lora_A.is_cuda and layer.magnitude.is_cuda
    assert model(torch.randn(3, 32, device="cuda")).is_cuda
