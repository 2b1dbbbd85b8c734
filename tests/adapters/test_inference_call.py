"""The inference call inside dk.cached_norms (fast_path.FastPath._inference_call): the decode loop's path.

It must give the values the autograd Function gives outside the block (the same products, bitwise),
skip the Function, follow every change its state can see (W0, A, B, m, s, backend, dtype, autocast,
hooks, the active adapter) and never run where it does not apply (grad, training, magnitude-only).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import dorakit as dk
from dorakit.adapters import fast_path


def _model(variant: str, dtype: torch.dtype = torch.float32, names: tuple[str, ...] = ()) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 18, dtype=dtype), nn.ReLU(), nn.Linear(18, 12, bias=False, dtype=dtype))
    config = (dk.AdapterConfig(method="dora", rank=4, targets=["0"], magnitude_only=["2"]) if variant == "magnitude"
              else dk.AdapterConfig(method=variant, rank=4, targets=["0", "2"]))
    dk.apply_adapters(model, config)
    for name in names:
        dk.add_adapter(model, config, name=name)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in dk.adapter_layers(model):
            for name in layer.hosted_names():
                with layer.bound(name):
                    if layer.lora_B is not None:
                        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)
                    if getattr(layer, "magnitude", None) is not None:
                        layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=gen).to(dtype))
    return model.eval()


def _outside(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x)


def _inside(model: nn.Module, x: Tensor, calls: int = 3) -> list[Tensor]:
    with torch.no_grad(), dk.cached_norms(model):
        return [model(x) for _ in range(calls)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("variant", ["dora", "lora"])
def test_inference_call_equals_the_function_bitwise_and_skips_it(variant: str, dtype: torch.dtype,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(variant, dtype)
    x = torch.randn(3, 5, 24, dtype=dtype)
    ref = _outside(model, x)
    layers = [layer for _, layer in dk.adapter_layers(model)]
    assert all(layer._fast_impl(x) == "fused" for layer in layers)

    def no_function(*args: object, **kw: object) -> None:
        raise AssertionError("the inference call must not run the autograd Function")

    with torch.no_grad(), dk.cached_norms(model):
        first = model(x)  # builds the packs (this call may take the Function)
        assert all(layer._infer_cache is not None and layer._infer_cache[1] is not None for layer in layers)
        monkeypatch.setattr(fast_path, "dora_linear", no_function)
        again = [model(x) for _ in range(2)]
        monkeypatch.undo()
    for y in (first, *again):
        assert y.dtype == ref.dtype and y.equal(ref)
    assert all(layer._infer_cache is None for layer in layers)  # dropped on exit


def test_inference_call_follows_changes_it_can_see() -> None:
    """After each change inside the block the output equals the Function's outside it."""
    model = _model("dora")
    x = torch.randn(4, 24)
    first, second = model[0], model[2]
    changes = [
        lambda: first.magnitude.mul_(1.5),  # g = m / n is kept in the pack: m's version is in its state
        lambda: first.lora_A.add_(0.1),
        lambda: second.base_layer.weight.mul_(0.5),
        lambda: setattr(first, "scaling", first.scaling * 2),
        lambda: first.base_layer.bias.add_(1.0),  # the bias is read on every call, never kept
    ]
    for change in changes:
        with torch.no_grad(), dk.cached_norms(model):
            before = [model(x) for _ in range(2)][-1]
            assert first._infer_cache[1] is not None
            change()
            after = model(x)
        assert not after.equal(before)
        assert after.equal(_outside(model, x))
    with torch.no_grad(), dk.cached_norms(model):
        model(x)
        second.backend = "torch"  # the eager path: the pack is dropped (the values may agree bitwise)
        y = model(x)
        assert second._infer_cache[1] is None and first._infer_cache[1] is not None
    assert y.equal(_outside(model, x))


def test_inference_call_under_autocast_and_grad_runs_as_outside() -> None:
    model = _model("dora")
    x = torch.randn(4, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _outside(model, x)
        with torch.no_grad(), dk.cached_norms(model):
            y = model(x)
            assert model[0]._infer_cache is not None and model[0]._infer_cache[1] is None  # no pack under autocast
    assert y.dtype == torch.bfloat16 and y.equal(ref)
    with dk.cached_norms(model):
        y = model(x)  # grad enabled: the Function, no pack
        assert y.requires_grad and model[0]._infer_cache is None
    model.train()
    with torch.no_grad(), dk.cached_norms(model):
        model(x)
        assert model[0]._infer_cache is None  # training mode: never kept


def test_each_named_adapter_keeps_its_own_pack() -> None:
    """set_adapter swaps the adapter's tensors and its pack with them: alternating adapters inside one
    block gives each adapter's own output (outside the block: the Function)."""
    model = _model("dora", names=("b",))
    x = torch.randn(4, 24)
    refs = {}
    for name in ("default", "b"):
        dk.set_adapter(model, name)
        refs[name] = _outside(model, x)
    assert not refs["default"].equal(refs["b"])
    with torch.no_grad(), dk.cached_norms(model):
        for name in ("default", "b", "default", "b"):
            dk.set_adapter(model, name)
            assert model(x).equal(refs[name])
        assert model[0].adapters["b"]._infer_cache is not None  # the own adapter's pack, parked in its slot


def test_magnitude_only_and_hooked_lora_take_no_pack() -> None:
    x = torch.randn(4, 24)
    model = _model("magnitude")
    with torch.no_grad(), dk.cached_norms(model):
        y = model(x)
        assert model[2]._infer_cache is None and model[0]._infer_cache[1] is not None  # magnitude-only: no state
    assert y.equal(_outside(model, x))
    lora = _model("lora")
    calls = []
    lora[0].base_layer.register_forward_hook(lambda mod, inp, out: calls.append(1))
    with torch.no_grad(), dk.cached_norms(lora):
        ys = [lora(x) for _ in range(3)]
        assert lora[0]._infer_cache[1] is None and lora[2]._infer_cache[1] is not None
    assert len(calls) == 3 and ys[-1].equal(_outside(lora, x))  # the hook ran on every call
