"""The adapter layers trace into one torch.compile graph (no graph breaks) and give the eager result."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dorakit as dk


def _model(method: str, dropout: float, norm_grad: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 12))
    dk.apply_adapters(model, dk.AdapterConfig(method=method, rank=4, targets=["0"], magnitude_only=["2"],
                                              dropout=dropout, norm_grad=norm_grad))
    with torch.no_grad():
        for _, layer in dk.adapter_layers(model):
            if layer.lora_B is not None:
                layer.lora_B.normal_(std=0.1)
            if layer.variant != "lora":
                layer.magnitude.mul_(1.25)
    return model


@pytest.mark.parametrize("method,dropout,norm_grad",
                         [("dora", 0.0, "detach"), ("dora", 0.0, "exact"), ("dora", 0.2, "detach"), ("lora", 0.2, "detach")])
def test_fullgraph_compile_matches_eager(method: str, dropout: float, norm_grad: str) -> None:
    model = _model(method, dropout, norm_grad)
    x = torch.randn(5, 24)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for train in (False, True):
        model.train(train)
        grads = []
        for run in (model, compiled):
            torch.manual_seed(1)  # same dropout mask for eager and compiled
            out = run(x)
            model.zero_grad()
            out.square().sum().backward()
            grads.append((out.detach(), [p.grad.clone() for p in dk.adapter_parameters(model).values()]))
        (eager_out, eager_grads), (comp_out, comp_grads) = grads
        torch.testing.assert_close(comp_out, eager_out)
        for g_comp, g_eager in zip(comp_grads, eager_grads):
            torch.testing.assert_close(g_comp, g_eager)
