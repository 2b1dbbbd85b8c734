"""What the 4-bit and 8-bit adapter tests (test_quant.py, test_quant_8bit.py) both use: the output and
gradients of a layer under a fixed loss, their comparison with a dense float64 twin, and an allocation
probe that sees which large tensors outlive a call."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def grads(layer: nn.Module, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The output on x, and the gradients of a fixed loss in x and every adapter parameter."""
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)
    (y * weights).sum().backward()
    out = {"x": x.grad}
    out.update({n: p.grad for n, p in layer.named_parameters(recurse=False)})
    return y.detach(), out


def assert_matches_twin(layer: nn.Module, twin: nn.Module, x: Tensor, tol: dict[str, float],
                        same_names: bool = True) -> None:
    """``layer``'s output and gradients on x (float32) equal its float64 ``twin``'s on x within ``tol``;
    ``same_names``: both have gradients for the same tensors."""
    y, g = grads(layer, x)
    y_ref, g_ref = grads(twin, x.to(torch.float64))
    torch.testing.assert_close(y, y_ref.float(), **tol)
    if same_names:
        assert set(g) == set(g_ref)
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name].float(), **tol, msg=name)


class Allocations(TorchDispatchMode):
    """Every tensor an aten op creates while active: the largest one's bytes, and weak references to
    those of at least ``min_numel`` elements (a copy of W0 among them; views of ``resident``'s storage,
    e.g. an 8-bit layer's own codes, are not new and not counted), to see which outlive the call."""

    def __init__(self, min_numel: int, resident: Tensor | None = None) -> None:
        super().__init__()
        self.min_numel, self.largest, self.big = min_numel, 0, []
        self.resident = None if resident is None else resident.untyped_storage().data_ptr()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
                if t.numel() >= self.min_numel and t.untyped_storage().data_ptr() != self.resident:
                    self.big.append(StorageWeakRef(t.untyped_storage()))
        return out

    def alive(self) -> int:
        return sum(not ref.expired() for ref in self.big)
