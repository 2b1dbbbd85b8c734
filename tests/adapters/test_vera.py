"""Tests for dorakit.adapters.vera and dorakit.formats.vera_io: VeRA and DVoRA.

The float64 reference never calls dorakit.adapters.functional. It forms the adapted weight densely from the
shared matrices, sliced to the layer (A = vera_A[:r, :in], B = vera_B[:out, :r]),

    V = W0 + diag(b)·B·diag(d)·A                         (VeRA, Kopiczko et al. 2024, Eq. 1)
    W' = m ⊙ V / ||V||_c                                  (DVoRA: DoRA's magnitude over VeRA's direction)

and applies the base layer's own op with W' and the unscaled bias. norm_grad="detach" is modelled by
detaching ||V||_c. PEFT parity follows tests/test_peft_parity.py: same W0, same seed, lambda vectors
perturbed away from their init, max |dorakit - PEFT| <= 1e-5 in float32 for outputs and every gradient.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

import dorakit as dk
from dorakit.adapters.vera import VeraAdapter, VeraConv1DAdapter, VeraLinearAdapter, VeraProjections, vera_projections

peft = pytest.importorskip("peft")

F64 = torch.float64
TOL = {F64: {"rtol": 1e-10, "atol": 1e-12}, torch.float32: {"rtol": 1e-5, "atol": 1e-5}}  # as test_layers.py
RESTORE_TOL = {F64: 1e-12, torch.float32: 1e-6}
PARITY_ATOL = 1e-5
METHODS = ["vera", "dvora"]
KINDS = [("linear", True), ("linear", False), ("hf_conv1d", True)]
CASES = [(m, k, b, g) for m in METHODS for k, b in KINDS for g in (["detach", "exact"] if m == "dvora" else ["detach"])]


# ---- helpers ------------------------------------------------------------------------------------------
def _base(kind: str, bias: bool, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A 7 x 13 layer (out, in) with a random weight and bias."""
    torch.manual_seed(seed)
    base = nn.Linear(13, 7, bias=bias) if kind == "linear" else Conv1D(7, 13)   # Conv1D weight: (13, 7)
    with torch.no_grad():
        if getattr(base, "bias", None) is not None:
            base.bias.normal_()
    return base.to(dtype).requires_grad_(False)


def _perturb(layers: list[VeraAdapter], seed: int = 0) -> None:
    """b, d ~ N(0, 1) and m scaled by U(0.5, 1.5): far from init (b = 0 makes every test trivial)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            for p in (layer.vera_lambda_b, layer.vera_lambda_d):
                p.copy_(torch.randn(p.shape, generator=gen))
            if layer.method == "dvora":
                layer.magnitude.mul_(torch.rand(layer.magnitude.shape, generator=gen) + 0.5)


def _layer(method: str, kind: str, bias: bool, dtype: torch.dtype = F64, norm_grad: str = "detach") -> VeraAdapter:
    # shared matrices larger than the layer in every dimension, so the slicing is tested
    projections = VeraProjections(seed=3, rank=4, out_features=11, in_features=17, dtype=dtype)
    cls = VeraLinearAdapter if kind == "linear" else VeraConv1DAdapter
    layer = cls(_base(kind, bias, dtype), projections, method, norm_grad=norm_grad)
    _perturb([layer])
    return layer


def _reference(layer: VeraAdapter, x: Tensor) -> Tensor:
    """Dense float64 forward; gradients flow to x, b, d and m (and through ||V||_c for norm_grad="exact")."""
    base = layer.base_layer
    w0 = (base.weight.T if isinstance(base, Conv1D) else base.weight).to(F64)          # (out, in)
    out, inp = w0.shape
    A = layer.vera_projections.vera_A[: layer.rank, :inp].to(F64)                       # (r, in)
    B = layer.vera_projections.vera_B[:out, : layer.rank].to(F64)                       # (out, r)
    V = w0 + torch.diag(layer.vera_lambda_b) @ B @ torch.diag(layer.vera_lambda_d) @ A  # (out, in)
    if layer.method == "dvora":
        norm = V.norm(dim=1)
        if layer.norm_grad == "detach":
            norm = norm.detach()
        V = layer.magnitude.unsqueeze(1) * V / norm.unsqueeze(1)
    bias = getattr(base, "bias", None)
    return F.linear(x, V, None if bias is None else bias.to(F64))


def _linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(up=nn.Linear(12, 20), act=nn.Tanh(), down=nn.Linear(20, 7, bias=False),
                                     head=nn.Linear(7, 3)))


def _conv1d_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(up=Conv1D(20, 12), act=nn.Tanh(), down=Conv1D(7, 20)))


def _vera_layers(model: nn.Module) -> list[VeraAdapter]:
    return [layer for _, layer in dk.adapter_layers(model)]


# ---- the shared matrices ------------------------------------------------------------------------------
def test_projections_are_peft_bitwise() -> None:
    from peft.tuners.vera.model import _kaiming_init

    gen = torch.Generator().manual_seed(1234)
    want_A, want_B = _kaiming_init((5, 19), generator=gen), _kaiming_init((23, 5), generator=gen)
    A, B = vera_projections(1234, 5, 23, 19)
    assert torch.equal(A, want_A) and torch.equal(B, want_B)


@pytest.mark.parametrize("method", METHODS)
def test_shared_once_frozen_and_not_in_state_dict(method: str) -> None:
    model = _linear_model()
    dk.apply_adapters(model, dk.AdapterConfig(method=method, rank=4, targets=["up", "down"], vera_seed=7))
    up, down = model.up, model.down
    assert up.vera_projections is down.vera_projections
    assert up.vera_projections.shapes == ((4, 20), (20, 4))                       # (r, max in), (max out, r)
    assert not any("vera_A" in k or "vera_B" in k for k in model.state_dict())
    assert not list(up.vera_projections.parameters())
    expected = {f"{n}.{p}" for n in ("up", "down") for p in ("vera_lambda_d", "vera_lambda_b")}
    if method == "dvora":
        expected |= {"up.magnitude", "down.magnitude"}
    assert set(dk.trainable_parameters(model)) == expected == set(dk.adapter_parameters(model))
    clone = copy.deepcopy(model).to(F64)
    assert clone.up.vera_projections is clone.down.vera_projections
    assert clone.up.vera_projections is not up.vera_projections
    assert clone.up.vera_projections.vera_A.dtype == F64


# ---- the layer against the float64 reference ----------------------------------------------------------
@pytest.mark.parametrize("method,kind,bias,norm_grad", CASES)
def test_forward_and_every_gradient_match_reference(method: str, kind: str, bias: bool, norm_grad: str) -> None:
    layer = _layer(method, kind, bias, norm_grad=norm_grad)
    x = torch.randn(2, 3, 13, dtype=F64, requires_grad=True)
    params = [layer.vera_lambda_d, layer.vera_lambda_b] + ([layer.magnitude] if method == "dvora" else [])
    y = layer(x)
    grad_out = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *params], grad_out)
    y_ref = _reference(layer, x)
    want = torch.autograd.grad(y_ref, [x, *params], grad_out)
    torch.testing.assert_close(y, y_ref, **TOL[F64])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[F64])
    assert all(g.abs().max() > 0 for g in got)


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init(method: str) -> None:
    base = _base("linear", True, torch.float32)
    layer = VeraLinearAdapter(copy.deepcopy(base), VeraProjections(0, 4, 7, 13), method)
    x = torch.randn(5, 13)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=1e-6)
    assert torch.all(layer.vera_lambda_d == 0.1) and torch.all(layer.vera_lambda_b == 0)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("method,kind,bias", [(m, k, b) for m in METHODS for k, b in KINDS])
def test_merge_equals_unmerged_and_unmerge_restores(method: str, kind: str, bias: bool, dtype: torch.dtype) -> None:
    layer = _layer(method, kind, bias, dtype)
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(4, 13, dtype=dtype)
    with torch.no_grad():
        y_base, y = layer.base_layer(x), layer(x)
        layer.merge()
        y_merged = layer(x)
    torch.testing.assert_close(y_merged, y, **TOL[dtype])
    assert (y_merged - y_base).abs().max() > 1e-3                                   # the adapter does something
    layer.unmerge()
    # |V| <= |W0| + |B_eff||A| entrywise: the size of the values the roundings act on (as test_layers.py)
    A, B = layer.lora_A_2d().detach().to(F64), layer.lora_B_2d().detach().to(F64)
    scale = w0.abs().max().item() + (B.abs() @ A.abs()).max().item()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=RESTORE_TOL[dtype] * scale)


@pytest.mark.parametrize("method", METHODS)
def test_one_step_moves_every_parameter_and_not_the_shared(method: str) -> None:
    model = _linear_model()
    dk.apply_adapters(model, dk.AdapterConfig(method=method, rank=4, targets=["up", "down"]))
    _perturb(_vera_layers(model))
    shared = [t.clone() for t in (model.up.vera_projections.vera_A, model.up.vera_projections.vera_B)]
    params = dk.trainable_parameters(model)
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.SGD(params.values(), lr=0.1)
    model(torch.randn(6, 12)).square().mean().backward()
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in params.items())
    assert torch.equal(shared[0], model.up.vera_projections.vera_A)
    assert torch.equal(shared[1], model.up.vera_projections.vera_B)


# ---- PEFT parity --------------------------------------------------------------------------------------
def _peft_pair(build, targets: list[str], dropout: float = 0.0, **peft_kwargs: object) -> tuple[nn.Module, nn.Module]:
    """(PEFT VeRA model with perturbed lambdas, dorakit VeRA model with the same lambdas)."""
    base = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(
            r=4, target_modules=targets, projection_prng_key=11, vera_dropout=dropout, **peft_kwargs))
    dm = copy.deepcopy(base)
    dk.apply_adapters(dm, dk.AdapterConfig(method="vera", rank=4, targets=targets, vera_seed=11, dropout=dropout))
    _perturb(_vera_layers(dm), seed=1)
    with torch.no_grad():
        for name, layer in dk.adapter_layers(dm):
            peft_layer = pm.base_model.model.get_submodule(name)
            peft_layer.vera_lambda_d["default"].copy_(layer.vera_lambda_d)
            peft_layer.vera_lambda_b["default"].copy_(layer.vera_lambda_b)
            assert torch.equal(peft_layer.vera_A["default"], layer.vera_projections.vera_A)
            assert torch.equal(peft_layer.vera_B["default"], layer.vera_projections.vera_B)
    return pm, dm


@pytest.mark.parametrize("build,dropout", [(_linear_model, 0.0), (_conv1d_model, 0.0), (_linear_model, 0.3)])
def test_peft_vera_parity_outputs_and_grads(build, dropout: float) -> None:
    targets = ["up", "down"]
    pm, dm = _peft_pair(build, targets, dropout, fan_in_fan_out=build is _conv1d_model)
    pm.train(dropout > 0)
    dm.train(dropout > 0)
    x = torch.randn(3, 5, 12)
    results = []
    for model in (pm, dm):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(5)                                                         # the same dropout masks
        y = model(xi)
        y.square().mean().backward()
        grads = {n: model.get_submodule(("base_model.model." if model is pm else "") + n) for n in targets}
        lam = [(g.vera_lambda_d["default"] if model is pm else g.vera_lambda_d).grad for g in grads.values()]
        lam += [(g.vera_lambda_b["default"] if model is pm else g.vera_lambda_b).grad for g in grads.values()]
        results.append((y.detach(), xi.grad, lam))
    (yp, gxp, lp), (yd, gxd, ld) = results
    with torch.no_grad(), dk.adapters_disabled(dm):
        y_base = dm(x)
    assert (yd - y_base).abs().max() > 1e-2                                         # the lambdas do something
    torch.testing.assert_close(yd, yp, rtol=0, atol=PARITY_ATOL)
    torch.testing.assert_close(gxd, gxp, rtol=0, atol=PARITY_ATOL)
    for a, b in zip(ld, lp):
        torch.testing.assert_close(a, b, rtol=0, atol=PARITY_ATOL)


# ---- save / load --------------------------------------------------------------------------------------
def _trained(method: str, **cfg: object) -> nn.Module:
    model = _linear_model()
    dk.apply_adapters(model, dk.AdapterConfig(method=method, rank=4, targets=["up", "down"], vera_seed=5, **cfg))
    _perturb(_vera_layers(model), seed=2)
    return model


X = torch.randn(4, 12, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("save_projection", [False, True])
def test_vera_file_loads_in_peft(tmp_path, save_projection: bool) -> None:
    model = _trained("vera", vera_save_projection=save_projection)
    dk.save_adapter(model, tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "VERA" and raw["save_projection"] is save_projection
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                        # PEFT warns when it regenerates from the seed
        pm = peft.PeftModel.from_pretrained(_linear_model(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(pm(X), model(X), rtol=0, atol=PARITY_ATOL)


@pytest.mark.parametrize("save_projection", [False, True])
def test_peft_vera_file_loads_in_dorakit(tmp_path, save_projection: bool) -> None:
    pm, _ = _peft_pair(_linear_model, ["up", "down"])
    pm.peft_config["default"].save_projection = save_projection
    pm.save_pretrained(tmp_path)
    model = _linear_model()
    report = dk.load_adapter(model, tmp_path)
    assert report is not None and report.names == ["up", "down"]
    with torch.no_grad():
        torch.testing.assert_close(model(X), pm(X), rtol=0, atol=PARITY_ATOL)


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_plain_and_existing(tmp_path, method: str) -> None:
    model = _trained(method, bias="lora_only", modules_to_save=["head"], norm_grad="exact")
    with torch.no_grad():
        model.up.base_layer.bias.add_(1.0)
        model.head.weight.mul_(2.0)
    dk.save_adapter(model, tmp_path)
    fresh = _linear_model()
    dk.load_adapter(fresh, tmp_path)
    assert dk.adapter_config(fresh).norm_grad == "exact" and fresh.up.method == method
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), model(X), rtol=0, atol=0)
    _perturb(_vera_layers(fresh), seed=8)                             # overwrite onto matching adapters
    assert dk.load_adapter(fresh, tmp_path) is None
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), model(X), rtol=0, atol=0)


def test_dvora_file_is_refused_by_peft(tmp_path) -> None:
    dk.save_adapter(_trained("dvora"), tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "DVORA" and raw["dorakit_format"] == 1 and len(raw["projection_sha256"]) == 64
    with pytest.raises(Exception, match="DVORA"):
        peft.PeftModel.from_pretrained(_linear_model(), tmp_path)


# ---- bad input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"rank_pattern": {"up": 8}}, "rank_pattern"), ({"alpha_pattern": {"up": 8}}, "alpha_pattern"),
    ({"use_rslora": True}, "use_rslora"), ({"magnitude_only": ["head"]}, "magnitude_only"),
    ({"backend": "fused"}, "eager"), ({"vera_seed": -1}, "vera_seed"), ({"vera_d_initial": 0.0}, "vera_d_initial"),
    ({"vera_save_projection": 1}, "vera_save_projection")])
def test_config_rejects(kwargs: dict, match: str) -> None:
    with pytest.raises(dk.ConfigError, match=match):
        dk.AdapterConfig(method="vera", **kwargs)


def test_rank_or_layer_larger_than_shared_matrices() -> None:
    shared = VeraProjections(0, 4, 7, 13)
    with pytest.raises(ValueError, match="larger than the shared matrices' rank 4"):
        VeraLinearAdapter(_base("linear", True, torch.float32), shared, "vera", rank=5)
    with pytest.raises(ValueError, match="does not fit the shared VeRA matrices"):
        VeraLinearAdapter(nn.Linear(14, 7), shared, "dvora")


def test_unsupported_module_is_named() -> None:
    model = nn.Sequential(OrderedDict(conv=nn.Conv1d(3, 4, 3), lin=nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="'conv'.*nn.Linear and transformers Conv1D"):
        dk.apply_adapters(model, dk.AdapterConfig(method="dvora", rank=2, targets=["conv", "lin"]))


def test_dvora_onto_adapters_with_another_seed(tmp_path, model_snapshot) -> None:
    dk.save_adapter(_trained("dvora"), tmp_path)                       # seed 5
    other = _linear_model()
    dk.apply_adapters(other, dk.AdapterConfig(method="dvora", rank=4, targets=["up", "down"], vera_seed=6))
    before = model_snapshot(other)
    with pytest.raises(dk.AdapterFileError, match="seed .*5.*seed 6"):
        dk.load_adapter(other, tmp_path)
    assert all(torch.equal(before[2][k], v) for k, v in other.state_dict().items())


def test_dvora_with_edited_seed_fails_the_checksum(tmp_path) -> None:
    dk.save_adapter(_trained("dvora"), tmp_path)
    path = tmp_path / "adapter_config.json"
    raw = json.loads(path.read_text())
    raw["projection_prng_key"] = 6
    path.write_text(json.dumps(raw))
    # the weights' metadata binds the seed too, so a hand edit is caught either way; drop that binding to reach
    # the checksum (what a torch whose generator draws other numbers would hit)
    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file(tensors, tmp_path / "adapter_model.safetensors", {"format": "pt"})
    model = _linear_model()
    with pytest.raises(dk.AdapterFileError, match="SHA-256 mismatch"):
        dk.load_adapter(model, tmp_path)
    assert not list(dk.adapter_layers(model))


def test_dvora_onto_a_model_of_another_shape(tmp_path) -> None:
    dk.save_adapter(_trained("dvora"), tmp_path)
    torch.manual_seed(0)
    wider = nn.Sequential(OrderedDict(up=nn.Linear(12, 24), act=nn.Tanh(), down=nn.Linear(24, 7, bias=False),
                                      head=nn.Linear(7, 3)))
    with pytest.raises(dk.AdapterFileError, match="different base model"):
        dk.load_adapter(wider, tmp_path)
    assert not list(dk.adapter_layers(wider))


def test_stored_matrices_of_a_smaller_rank(tmp_path) -> None:
    model = _trained("vera", vera_save_projection=True)
    dk.save_adapter(model, tmp_path)
    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"][:3].contiguous()
    tensors["base_model.vera_B"] = tensors["base_model.vera_B"][:, :3].contiguous()
    save_file(tensors, tmp_path / "adapter_model.safetensors", {"format": "pt"})
    with pytest.raises(dk.AdapterFileError, match="r=4 is larger than the file's matrices' rank 3"):
        dk.load_adapter(_linear_model(), tmp_path)


def test_lora_file_onto_vera_model_is_refused(tmp_path) -> None:
    lora = _linear_model()
    dk.apply_adapters(lora, dk.AdapterConfig(method="lora", rank=4, targets=["up", "down"]))
    dk.save_adapter(lora, tmp_path)
    with pytest.raises(dk.AdapterFileError, match="VeRA / DVoRA adapters"):
        dk.load_adapter(_trained("vera"), tmp_path)


def test_peft_state_dict_points_to_save_adapter() -> None:
    with pytest.raises(dk.AdapterFileError, match="save_adapter"):
        dk.peft_state_dict(_trained("dvora"))
