"""A small block with three differently shaped Linear layers and a perturbation of every adapter it
hosts: what the named-adapter tests (test_multi, test_multi_api, test_gathered) build on."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

import dorakit as dk


class MLP(nn.Module):
    """up (d_in -> d_hidden, bias), gate (square, no bias), down (d_hidden -> d_out, bias): three Linear
    layers, non-square, that adapter configs can target differently."""

    def __init__(self, d_in: int = 6, d_hidden: int = 10, d_out: int = 5, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden, dtype=dtype)
        self.gate = nn.Linear(d_hidden, d_hidden, bias=False, dtype=dtype)
        self.down = nn.Linear(d_hidden, d_out, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, d_in) -> (B, T, d_out)
        return self.down(torch.tanh(self.gate(torch.relu(self.up(x)))))


def perturb_adapters(model: nn.Module, seed: int = 0, b_scale: float = 1.0) -> None:
    """Nonzero B (N(0, b_scale²)) and a magnitude scaled by U(0.5, 1.5) for every adapter of every module
    (each bound in turn), so that no adapter is the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in dk.adapter_layers(model):
            for name in layer.hosted_names():
                with layer.bound(name):
                    if layer.lora_B is not None:
                        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen, dtype=torch.float64)
                                           * b_scale)
                    if getattr(layer, "magnitude", None) is not None:
                        layer.magnitude.mul_(torch.rand(layer.magnitude.shape, generator=gen,
                                                        dtype=torch.float64) + .5)


def alone(base: nn.Module, multi: nn.Module, name: str, config: dk.AdapterConfig) -> nn.Module:
    """A copy of ``base`` with adapter ``name`` of ``multi`` (whose config is ``config``) applied by the
    single-adapter path, the same tensors, in ``base``'s train / eval mode: what each row routed to
    ``name`` must equal."""
    single = copy.deepcopy(base)
    dk.apply_adapters(single, config)
    with torch.no_grad():
        for module_name, layer in dk.adapter_layers(multi):
            if name in layer.hosted_names():
                target = single.get_submodule(module_name)
                with layer.bound(name):
                    for key in ("lora_A", "lora_B", "magnitude"):
                        if getattr(layer, key, None) is not None:
                            getattr(target, key).copy_(getattr(layer, key))
    return single.train(base.training)
