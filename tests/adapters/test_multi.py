"""Named adapters and mixed-adapter batches: each adapter, and each routed row, equals that adapter alone."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import dorakit as dk
from fixtures_multi import MLP, perturb_adapters
from fixtures_multi import alone as alone_with

CONFIGS = {
    "default": dk.AdapterConfig(method="dora", rank=4, alpha=8, targets=["up", "down"]),
    "lora": dk.AdapterConfig(method="lora", rank=3, alpha=5, targets=["up", "gate"]),
    "mag": dk.AdapterConfig(method="dora", rank=2, alpha=2, targets=["gate"], magnitude_only=["down"]),
    "dora2": dk.AdapterConfig(method="dora", rank=5, alpha=3, targets=["up", "gate", "down"]),
}


def alone(base: nn.Module, multi: nn.Module, name: str) -> nn.Module:
    """fixtures_multi.alone with this file's CONFIGS."""
    return alone_with(base, multi, name, CONFIGS[name])


@pytest.fixture
def setup() -> tuple[nn.Module, nn.Module, Tensor]:
    torch.manual_seed(0)
    base = MLP().eval()
    model = copy.deepcopy(base)
    dk.apply_adapters(model, CONFIGS["default"])
    for name in ("lora", "mag", "dora2"):
        dk.add_adapter(model, CONFIGS[name], name=name)
    perturb_adapters(model)
    return base, model, torch.randn(5, 3, 6, dtype=torch.float64)


def test_names_keys_and_trainable(setup) -> None:
    base, model, _ = setup
    assert dk.list_adapters(model) == ["default", "lora", "mag", "dora2"] and dk.active_adapter(model) == "default"
    keys = set(model.state_dict())
    assert {"up.lora_A", "up.lora_B", "up.magnitude", "down.magnitude"} <= keys      # default: unchanged keys
    assert {"up.adapters.lora.lora_A", "gate.lora_B", "gate.adapters.dora2.magnitude"} <= keys
    trainable = set(dk.trainable_parameters(model))
    assert trainable == {"up.lora_A", "up.lora_B", "up.magnitude", "down.lora_A", "down.lora_B", "down.magnitude"}
    dk.set_adapter(model, "dora2")
    assert set(dk.trainable_parameters(model)) == {
        "up.adapters.dora2.lora_A", "up.adapters.dora2.lora_B", "up.adapters.dora2.magnitude",
        "gate.adapters.dora2.lora_A", "gate.adapters.dora2.lora_B", "gate.adapters.dora2.magnitude",
        "down.adapters.dora2.lora_A", "down.adapters.dora2.lora_B", "down.adapters.dora2.magnitude"}
    with pytest.raises(ValueError, match="already has an adapter"):
        dk.add_adapter(model, CONFIGS["lora"], name="lora")
    with pytest.raises(ValueError, match="letters, digits"):
        dk.add_adapter(model, CONFIGS["lora"], name="a/b")
    with pytest.raises(KeyError, match="no adapter named"):
        dk.set_adapter(model, "nope")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_active_adapter_equals_it_alone(setup, name: str) -> None:
    base, model, x = setup
    dk.set_adapter(model, name)
    with torch.no_grad():
        want = alone(base, model, name)(x)
        got = model(x)
    assert not torch.allclose(want, base(x))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_one_optimizer_step_moves_only_the_active_adapter(setup) -> None:
    _, model, x = setup
    dk.set_adapter(model, "lora")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(dk.trainable_parameters(model).values(), lr=0.1)
    model.train()
    model(x).square().sum().backward()
    opt.step()
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved == {"up.adapters.lora.lora_A", "up.adapters.lora.lora_B", "gate.lora_A", "gate.lora_B"}


def test_mixed_batch_rows_equal_each_adapter_alone(setup) -> None:
    base, model, x = setup
    rows = ["dora2", None, "default", "mag", "lora"]
    with torch.no_grad():
        with dk.adapter_routing(model, rows):
            got = model(x)
        want = [base(x[i:i + 1]) if n is None else alone(base, model, n)(x[i:i + 1]) for i, n in enumerate(rows)]
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # the routing ends with the block; the active adapter is back
        torch.testing.assert_close(model(x), alone(base, model, "default")(x), rtol=1e-12, atol=1e-12)


def test_mixed_batch_gradients_reach_each_rows_adapter(setup) -> None:
    _, model, x = setup
    for p in model.parameters():
        p.requires_grad_(False)
    slot = model.up.adapters["lora"]
    for p in (model.up.lora_B, slot.lora_B):
        p.requires_grad_(True)
    with dk.adapter_routing(model, ["lora", "lora", None, None, "lora"]):
        model(x).sum().backward()
    assert slot.lora_B.grad.abs().sum() > 0 and model.up.lora_B.grad is None


def test_routing_errors(setup) -> None:
    _, model, x = setup
    with pytest.raises(dk.RoutingError, match="not adapters"):
        with dk.adapter_routing(model, ["nope"] * 5):
            pass
    with pytest.raises(dk.RoutingError, match="4 rows but this batch has 5"):
        with dk.adapter_routing(model, ["lora"] * 4):
            model(x)


def test_merge_unmerge_per_adapter(setup) -> None:
    base, model, x = setup
    with pytest.raises(RuntimeError, match="not the active one"):
        dk.merge_adapters(model, "dora2")
    dk.set_adapter(model, "dora2")
    with torch.no_grad():
        want = model(x)
        dk.merge_adapters(model, "dora2")
        merged = model(x)
        assert model.up.merged_adapter == "dora2"
        dk.unmerge_adapters(model)
        again = model(x)
        dk.set_adapter(model, "default")
        default = model(x)
    torch.testing.assert_close(merged, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(again, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(default, alone(base, model, "default")(x), rtol=1e-10, atol=1e-10)


def test_delete_adapter(setup) -> None:
    base, model, x = setup
    with pytest.raises(RuntimeError, match="is active"):
        dk.delete_adapter(model, "default")
    dk.set_adapter(model, "lora")
    with torch.no_grad():
        want = alone(base, model, "lora")(x)
    dk.delete_adapter(model, "default")
    dk.delete_adapter(model, "mag")
    assert dk.list_adapters(model) == ["lora", "dora2"]
    assert model.up.adapter_name == "lora" and "lora_A" in model.up._parameters   # the heir moved onto the wrapper
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)
    dk.set_adapter(model, "dora2")
    dk.delete_adapter(model, "lora")
    dk.delete_adapter(model, "dora2")
    assert dk.list_adapters(model) == [] and not list(dk.adapter_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)


def test_single_adapter_path_is_untouched(setup) -> None:
    base, _, x = setup
    model = copy.deepcopy(base)
    dk.apply_adapters(model, CONFIGS["default"])
    assert dk.list_adapters(model) == ["default"]
    assert not any(layer.multi for _, layer in dk.adapter_layers(model))
    assert set(model.state_dict()) == set(alone(base, model, "default").state_dict())


def test_cached_norms_per_adapter_in_mixed_batches(setup) -> None:
    base, model, x = setup
    rows = ["dora2", "default", "dora2", None, "default"]
    with torch.no_grad():
        with dk.adapter_routing(model, rows):
            want = model(x)
            with dk.cached_norms(model):
                first, second = model(x), model(x)
    torch.testing.assert_close(first, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(second, want, rtol=1e-12, atol=1e-12)
