"""Which parameters train, and how many: free functions over a model with adapters."""

from __future__ import annotations

import math

from torch import Tensor, nn

from .inject import adapter_layers

ADAPTER_TENSORS = ("lora_A", "lora_B", "magnitude", "vera_lambda_d", "vera_lambda_b")


def _logical_numel(param: Tensor) -> int:
    """Elements of the weight a parameter stands for: a bitsandbytes 4-bit weight packs two per byte
    and keeps its real shape in ``quant_state``."""
    state = getattr(param, "quant_state", None)
    return math.prod(state.shape) if state is not None and hasattr(state, "shape") else param.numel()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared parameters are counted once, 4-bit weights by
    their logical (unpacked) size."""
    trainable = total = 0
    for param in model.parameters():
        n = _logical_numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """PEFT's line: "trainable params: 470,016 || all params: 86,657,280 || trainable%: 0.5424"."""
    trainable, total = count_parameters(model)
    percent = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``{"<module>.lora_A": A, "<module>.lora_B": B, "<module>.magnitude": m}`` for every adapter (detached)."""
    state: dict[str, Tensor] = {}
    for name, layer in adapter_layers(model):
        for tensor_name in ADAPTER_TENSORS:
            tensor = getattr(layer, tensor_name, None)
            if tensor is not None:
                state[f"{name}.{tensor_name}"] = tensor.detach()
    return state


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter parameters (A, B, magnitude) by dotted name: what an optimizer for the adapters needs."""
    params: dict[str, nn.Parameter] = {}
    for name, layer in adapter_layers(model):
        for tensor_name in ADAPTER_TENSORS:
            param = getattr(layer, tensor_name, None)
            if param is not None:
                params[f"{name}.{tensor_name}"] = param
    return params


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter with requires_grad, by name: the adapters plus trainable biases and
    modules_to_save. This, not adapter_parameters, is what to hand the optimizer."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
