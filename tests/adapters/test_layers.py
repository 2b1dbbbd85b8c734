"""Tests for dorakit.adapters.layers: every adapter layer against a dense float64 reference written here.

The reference never calls dorakit.adapters.functional. It forms the adapted weight densely,

    V = W0 + s·B·A,   W' = m ⊙ V / ||V||_c   (DoRA, Liu et al. 2024, Eq. 5)
    W' = W0 + s·B·A                          (LoRA)
    W' = m ⊙ W0 / ||W0||_c                   (magnitude-only)

in the (out, in) view of the base weight, and then applies the base layer's own op (F.linear,
x @ W for transformers' Conv1D, F.conv1d/2d/3d, F.embedding) with W' and the unscaled bias.
norm_grad="detach" is modelled by detaching ||V||_c in the reference (paper §4.3).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

import dorakit as dk
from dorakit import AdapterStateError, Conv1DAdapter, ConvAdapter, EmbeddingAdapter, LinearAdapter

F64 = torch.float64
VARIANTS = ["lora", "dora", "magnitude"]
KINDS = ["linear", "hf_conv1d", "conv1d", "conv2d", "conv3d", "embedding"]
# transformers' Conv1D always has a bias; nn.Embedding never has one.
KIND_BIAS = [("linear", True), ("linear", False), ("hf_conv1d", True), ("conv1d", True), ("conv1d", False),
             ("conv2d", True), ("conv2d", False), ("conv3d", True), ("conv3d", False), ("embedding", False)]
CLS = {"linear": LinearAdapter, "hf_conv1d": Conv1DAdapter, "conv1d": ConvAdapter, "conv2d": ConvAdapter,
       "conv3d": ConvAdapter, "embedding": EmbeddingAdapter}
RANK, ALPHA = 3, 5.0

# Per-dtype tolerances for comparing two computations of the same layer output (decided up front).
# float64: both sides are exact up to ~1e-15 relative; 1e-10 leaves room for ~30-term sums and the
# factored-vs-dense norm. float32: u = 2^-24 ≈ 6e-8; dot products of <= 60 terms in two different
# orders plus the norm and the scale give a few·gamma_60 ≈ 1e-5·(typical magnitude) at most.
TOL = {F64: {"rtol": 1e-10, "atol": 1e-12}, torch.float32: {"rtol": 1e-5, "atol": 1e-5}}
# Unmerge restores W0 up to ~8 roundings (merge: V, m/n, product; unmerge: n/m, product, sBA, minus)
# of values of size |W0| + s|B||A|: 8·u ≈ 5e-7 (fp32) / 2e-15 (fp64) relative to that scale.
RESTORE_TOL = {F64: 1e-12, torch.float32: 1e-6}


# ---- building the cases ------------------------------------------------------------------------

def make_base(kind: str, bias: bool, dtype: torch.dtype, seed: int) -> tuple[nn.Module, Tensor]:
    """A base layer with odd, non-square shapes and random (nonzero) weight and bias, and an input."""
    g = torch.Generator().manual_seed(seed)
    if kind == "linear":
        base, x_shape = nn.Linear(13, 7, bias=bias), (2, 3, 13)
    elif kind == "hf_conv1d":
        base, x_shape = Conv1D(7, 13), (2, 3, 13)                 # nf=out=7, nx=in=13; weight (13, 7)
    elif kind == "conv1d":
        base, x_shape = nn.Conv1d(5, 7, 3, stride=2, padding=1, dilation=2, bias=bias), (2, 5, 11)
    elif kind == "conv2d":
        base = nn.Conv2d(3, 7, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1), bias=bias)
        x_shape = (2, 3, 9, 6)
    elif kind == "conv3d":
        base = nn.Conv3d(2, 5, 3, stride=2, padding=1, dilation=(2, 1, 1), bias=bias)
        x_shape = (2, 2, 7, 5, 5)
    elif kind == "embedding":
        base = nn.Embedding(13, 7)                       # (vocab, dim): out = dim = 7, in = vocab = 13
    else:
        raise AssertionError(kind)
    base = base.to(F64)
    with torch.no_grad():
        w = base.weight
        if kind == "embedding":
            w.copy_(torch.randn(w.shape, generator=g, dtype=F64))
        else:
            fan_in = w.numel() // (w.shape[1] if kind == "hf_conv1d" else w.shape[0])
            w.copy_(torch.randn(w.shape, generator=g, dtype=F64) / math.sqrt(fan_in))
        if getattr(base, "bias", None) is not None:
            base.bias.copy_(torch.randn(base.bias.shape, generator=g, dtype=F64))
    base = base.to(dtype).requires_grad_(False)
    if kind == "embedding":
        x = torch.randint(0, 13, (3, 5), generator=g)
    else:
        x = torch.randn(x_shape, generator=g, dtype=F64).to(dtype)
    return base, x


def make_layer(kind: str, variant: str, bias: bool = True, dtype: torch.dtype = F64, *, seed: int = 0,
               **kwargs: object) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(seed)                                        # A's init
    base, x = make_base(kind, bias, dtype, seed)
    layer = CLS[kind](base, variant, RANK, ALPHA, **kwargs)
    return layer, x


@torch.no_grad()
def perturb(layer: nn.Module, seed: int = 1) -> None:
    """Move B (and A, which is 0 at init for embeddings) and the magnitude away from their init."""
    g = torch.Generator().manual_seed(seed)

    def rnd(t: Tensor) -> Tensor:
        return torch.randn(t.shape, generator=g, dtype=F64).to(t.dtype)

    if layer.lora_A is not None:
        layer.lora_A.add_(0.3 * rnd(layer.lora_A))
        layer.lora_B.copy_(0.5 * rnd(layer.lora_B))
    if getattr(layer, "magnitude", None) is not None:
        m = layer.magnitude
        m.mul_(0.5 + torch.rand(m.shape, generator=g, dtype=F64).to(m.dtype))


def scaling_of(use_rslora: bool) -> float:
    return ALPHA / math.sqrt(RANK) if use_rslora else ALPHA / RANK


# ---- the float64 reference (independent of dorakit) -------------------------------------------

def ref_w0_2d(kind: str, base: nn.Module) -> Tensor:
    """The base weight as (out, in), read straight from the module."""
    w = base.weight.detach()
    if kind in ("hf_conv1d", "embedding"):
        return w.T.clone()
    return w.flatten(1).clone()


def ref_weight(variant: str, W0: Tensor, A: Tensor | None, B: Tensor | None, m: Tensor | None, s: float,
               norm_grad: str = "detach") -> Tensor:
    """Dense adapted weight W' (out, in) in float64."""
    if variant == "lora":
        return W0 + s * (B.flatten(1) @ A.flatten(1))
    V = W0 if variant == "magnitude" else W0 + s * (B.flatten(1) @ A.flatten(1))
    norm = V.square().sum(dim=1).sqrt()
    if norm_grad == "detach":
        norm = norm.detach()
    return (m / norm)[:, None] * V


def ref_apply(kind: str, base: nn.Module, W2d: Tensor, x: Tensor, bias: Tensor | None) -> Tensor:
    """The base layer's op with an (out, in) weight W2d and an explicit bias."""
    if kind == "linear":
        return F.linear(x, W2d, bias)
    if kind == "hf_conv1d":
        y = x @ W2d.T
        return y if bias is None else y + bias
    if kind == "embedding":
        assert bias is None
        return F.embedding(x, W2d.T)
    conv = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}[kind]
    return conv(x, W2d.reshape(W2d.shape[0], *base.weight.shape[1:]), bias, base.stride, base.padding,
                base.dilation)


def channel(kind: str, v: Tensor, ndim: int) -> Tensor:
    """A per-output-channel vector shaped to broadcast against a layer output."""
    if kind.startswith("conv"):
        return v.view(1, -1, *([1] * (ndim - 2)))
    return v


def ref_leaves(layer: nn.Module) -> dict[str, Tensor]:
    """Float64 leaf copies of the layer's trainable tensors, for autograd through the reference."""
    out = {}
    for name in ("lora_A", "lora_B", "magnitude"):
        p = getattr(layer, name, None)
        if p is not None:
            out[name] = p.detach().to(F64).clone().requires_grad_(True)
    return out


def ref_forward(kind: str, layer: nn.Module, x: Tensor, leaves: dict[str, Tensor], s: float,
                norm_grad: str) -> Tensor:
    base = layer.base_layer
    W = ref_weight(layer.variant, ref_w0_2d(kind, base).to(F64), leaves.get("lora_A"), leaves.get("lora_B"),
                   leaves.get("magnitude"), s, norm_grad)
    bias = getattr(base, "bias", None)
    return ref_apply(kind, base, W, x, None if bias is None else bias.detach().to(F64))


def adapter_grads(layer: nn.Module) -> dict[str, Tensor]:
    return {n: getattr(layer, n).grad for n in ("lora_A", "lora_B", "magnitude")
            if getattr(layer, n, None) is not None}


# ---- forward and every gradient vs the float64 reference ---------------------------------------

# (variant, norm_grad, use_rslora): norm_grad only matters for DoRA, the scaling only with A, B.
GRAD_CASES = [("lora", "detach", False), ("lora", "detach", True), ("dora", "detach", False),
              ("dora", "exact", False), ("dora", "detach", True), ("dora", "exact", True),
              ("magnitude", "detach", False), ("magnitude", "exact", False)]


@pytest.mark.parametrize("kind,bias", KIND_BIAS)
@pytest.mark.parametrize("variant,norm_grad,use_rslora", GRAD_CASES)
def test_forward_and_gradients_match_float64_reference(kind: str, bias: bool, variant: str, norm_grad: str,
                                                       use_rslora: bool) -> None:
    layer, x = make_layer(kind, variant, bias, norm_grad=norm_grad, use_rslora=use_rslora)
    perturb(layer)
    s = scaling_of(use_rslora)
    if variant != "magnitude":
        assert layer.scaling == pytest.approx(s, rel=1e-15)
    has_x_grad = kind != "embedding"
    xl = x.clone().requires_grad_(has_x_grad)
    y = layer(xl)
    assert y.dtype == F64
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    (y * w).sum().backward()

    leaves = ref_leaves(layer)
    xr = x.clone().requires_grad_(has_x_grad)
    yr = ref_forward(kind, layer, xr, leaves, s, norm_grad)
    (yr * w).sum().backward()

    torch.testing.assert_close(y, yr, **TOL[F64])
    grads = adapter_grads(layer)
    expected = {"lora": {"lora_A", "lora_B"}, "dora": {"lora_A", "lora_B", "magnitude"},
                "magnitude": {"magnitude"}}[variant]
    assert set(grads) == set(leaves) == expected
    for name, leaf in leaves.items():
        assert grads[name] is not None, name
        torch.testing.assert_close(grads[name], leaf.grad, **TOL[F64], msg=lambda m, n=name: f"grad {n}: {m}")
        assert leaf.grad.abs().max() > 1e-6, f"trivial gradient for {name}"
    if has_x_grad:
        torch.testing.assert_close(xl.grad, xr.grad, **TOL[F64])
    # The base layer stays frozen: no gradient reaches it.
    assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant,norm_grad", [("lora", "detach"), ("dora", "detach"), ("dora", "exact"),
                                               ("magnitude", "detach")])
def test_float32_forward_matches_float64_reference(kind: str, variant: str, norm_grad: str) -> None:
    """A float32 layer (float32 adapters, norms accumulated in float32) against the float64 reference
    of the very same stored values, at the float32 tolerance of TOL (all dot products here have <= 54
    terms)."""
    layer, x = make_layer(kind, variant, kind != "embedding", torch.float32, norm_grad=norm_grad)
    perturb(layer)
    assert all(p.dtype == torch.float32 for p in layer.parameters())
    with torch.no_grad():
        y = layer(x)
        base64 = _to64(layer.base_layer)
        x64 = x.double() if x.is_floating_point() else x
        W = ref_weight(variant, ref_w0_2d(kind, base64), *_abm64(layer), scaling_of(False))
        yr = ref_apply(kind, base64, W, x64, getattr(base64, "bias", None))
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), yr, **TOL[torch.float32])


def _to64(base: nn.Module) -> nn.Module:
    return copy.deepcopy(base).double()


def _abm64(layer: nn.Module) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    return tuple(None if getattr(layer, n, None) is None else getattr(layer, n).detach().double()
                 for n in ("lora_A", "lora_B", "magnitude"))


@pytest.mark.parametrize("kind", ["linear", "conv2d", "embedding"])
def test_norm_grad_setting_changes_only_the_A_B_gradients(kind: str) -> None:
    """Negative control for the test above: "exact" and "detach" give the same output and the same
    magnitude gradient, but different A and B gradients (the norm depends on A and B)."""
    ys, grads = {}, {}
    for norm_grad in ("detach", "exact"):
        layer, x = make_layer(kind, "dora", norm_grad=norm_grad)
        perturb(layer)
        y = layer(x)
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
        (y * w).sum().backward()
        ys[norm_grad], grads[norm_grad] = y.detach(), adapter_grads(layer)
    torch.testing.assert_close(ys["detach"], ys["exact"], **TOL[F64])
    torch.testing.assert_close(grads["detach"]["magnitude"], grads["exact"]["magnitude"], **TOL[F64])
    for name in ("lora_A", "lora_B"):
        assert (grads["detach"][name] - grads["exact"][name]).abs().max() > 1e-6, name


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv3d"])
def test_bias_is_not_scaled(kind: str) -> None:
    """With x = 0 every product vanishes and the output is exactly the (unscaled) bias."""
    layer, x = make_layer(kind, "dora", bias=True)
    perturb(layer)
    with torch.no_grad():
        y = layer(torch.zeros_like(x))
    b = channel(kind, layer.base_layer.bias, y.ndim)
    torch.testing.assert_close(y, b.expand_as(y), rtol=0, atol=0)
    assert (layer.magnitude / layer.base_layer.weight.flatten(1).norm(dim=1) - 1).abs().max() > 1e-2


# ---- adapted weight, init ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_adapted_weight_2d_matches_reference(kind: str, variant: str) -> None:
    layer, _ = make_layer(kind, variant)
    perturb(layer)
    W0 = ref_w0_2d(kind, layer.base_layer)
    torch.testing.assert_close(layer.weight_2d(), W0, rtol=0, atol=0)
    with torch.no_grad():
        ref = ref_weight(variant, W0, layer.lora_A, layer.lora_B, getattr(layer, "magnitude", None),
                         scaling_of(False))
    got = layer.adapted_weight_2d()
    assert got.shape == W0.shape and got.dtype == F64
    torch.testing.assert_close(got, ref, **TOL[F64])
    assert (got - W0).abs().max() > 1e-3                           # negative control: W' != W0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("norm_grad", ["detach", "exact"])
def test_dora_equals_lora_equals_base_at_init(kind: str, norm_grad: str) -> None:
    """ΔW = s·B·A = 0 at init (B = 0, or A = 0 for embeddings) and m = ||W0||_c, so W' = W0."""
    bias = kind != "embedding"
    dora, x = make_layer(kind, "dora", bias, norm_grad=norm_grad)
    lora, _ = make_layer(kind, "lora", bias)
    mag, _ = make_layer(kind, "magnitude", bias)
    W0 = ref_w0_2d(kind, dora.base_layer)
    # m is initialised to the column norm ||W0||_c, one entry per output row.
    torch.testing.assert_close(dora.magnitude, W0.norm(dim=1), rtol=1e-13, atol=0)
    torch.testing.assert_close(mag.magnitude, W0.norm(dim=1), rtol=1e-13, atol=0)
    zero_factor = dora.lora_A if kind == "embedding" else dora.lora_B
    other = dora.lora_B if kind == "embedding" else dora.lora_A
    assert (zero_factor == 0).all() and (other != 0).any()
    with torch.no_grad():
        y_base = dora.base_layer(x)
        y_dora, y_lora, y_mag = dora(x), lora(x), mag(x)
    torch.testing.assert_close(y_dora, y_lora, **TOL[F64])
    torch.testing.assert_close(y_dora, y_base, **TOL[F64])
    torch.testing.assert_close(y_mag, y_base, **TOL[F64])


# ---- merge / unmerge ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind,bias", KIND_BIAS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_merged_equals_unmerged_and_unmerge_restores_w0(kind: str, bias: bool, variant: str,
                                                        dtype: torch.dtype) -> None:
    layer, x = make_layer(kind, variant, bias, dtype)
    perturb(layer)
    base = layer.base_layer
    w0 = base.weight.detach().clone()
    with torch.no_grad():
        y_base = base(x)
        y_unmerged = layer(x)
        adapted = layer.adapted_weight_2d()

    layer.merge()
    assert layer.merged
    with torch.no_grad():
        y_merged = layer(x)
    torch.testing.assert_close(y_merged, y_unmerged, **TOL[dtype])
    torch.testing.assert_close(layer.weight_2d(), adapted, **TOL[dtype])
    # Negative controls: the merged weight and output are not the base ones.
    assert (base.weight - w0).abs().max() > 1e-3
    assert (y_merged - y_base).abs().max() > 1e-3

    merged_w = base.weight.detach().clone()
    with pytest.raises(AdapterStateError, match="already merged"):
        layer.merge()
    torch.testing.assert_close(base.weight, merged_w, rtol=0, atol=0)   # a refused merge changes nothing
    assert layer.merged

    layer.unmerge()
    assert not layer.merged
    w0d = w0.to(F64)
    scale = w0d.abs().max().item()
    if variant != "magnitude":
        A, B = layer.lora_A.detach().to(F64).flatten(1), layer.lora_B.detach().to(F64).flatten(1)
        # |V| <= |W0| + s|B||A| entrywise: the size of the values the roundings act on.
        scale = scale + (scaling_of(False) * (B.abs() @ A.abs())).max().item()
    torch.testing.assert_close(base.weight.to(F64), w0d, rtol=0, atol=RESTORE_TOL[dtype] * scale)
    with torch.no_grad():
        y_again = layer(x)
    torch.testing.assert_close(y_again, y_unmerged, **TOL[dtype])
    w_unmerged = base.weight.detach().clone()
    with pytest.raises(AdapterStateError, match="not merged"):
        layer.unmerge()
    torch.testing.assert_close(base.weight, w_unmerged, rtol=0, atol=0)  # a refused unmerge changes nothing


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_unmerge_of_fresh_layer_raises(kind: str, variant: str) -> None:
    layer, _ = make_layer(kind, variant)
    w0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(AdapterStateError, match="not merged"):
        layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=0)


# ---- training -----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant,norm_grad", [("lora", "detach"), ("dora", "detach"), ("dora", "exact"),
                                               ("magnitude", "detach")])
@pytest.mark.parametrize("kind,optim", [(k, "sgd") for k in KINDS]
                         + [(k, "adamw") for k in ("linear", "conv2d", "embedding")])
def test_optimizer_steps_move_every_adapter_tensor(kind: str, variant: str, norm_grad: str,
                                                   optim: str) -> None:
    """What is asserted, precisely:

    * the trainable tensors are exactly {A, B} (lora), {A, B, m} (dora), {m} (magnitude);
    * step 1: the zero-initialised factor (B; A for embeddings) and m change; the other factor gets
      an exactly-zero gradient (ΔW is bilinear in A, B and the norm depends on ΔW only through B·A)
      and so stays bit-for-bit unchanged (SGD without momentum/decay; AdamW with weight_decay=0);
    * step 2: the other factor changes too, so after two steps every trainable tensor has moved;
    * the base weight and bias never change.
    """
    bias = kind != "embedding"
    layer, x = make_layer(kind, variant, bias, norm_grad=norm_grad)
    expected = {"lora": {"lora_A", "lora_B"}, "dora": {"lora_A", "lora_B", "magnitude"},
                "magnitude": {"magnitude"}}[variant]
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == expected
    params = [getattr(layer, n) for n in sorted(expected)]
    opt = (torch.optim.SGD(params, lr=0.5) if optim == "sgd"
           else torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0))
    with torch.no_grad():
        target = layer.base_layer(x) + torch.randn(layer.base_layer(x).shape,
                                                   generator=torch.Generator().manual_seed(3), dtype=F64)
    frozen = {n: p.detach().clone() for n, p in layer.base_layer.named_parameters()}

    def step() -> None:
        opt.zero_grad()
        F.mse_loss(layer(x), target).backward()
        opt.step()

    def snapshot() -> dict[str, Tensor]:
        return {n: getattr(layer, n).detach().clone() for n in expected}

    before = snapshot()
    step()
    after1 = snapshot()
    if variant != "magnitude":
        zero_name, other_name = ("lora_A", "lora_B") if kind == "embedding" else ("lora_B", "lora_A")
        assert (before[zero_name] == 0).all()
        assert not torch.equal(after1[zero_name], before[zero_name]), f"{zero_name} did not move at step 1"
        assert (getattr(layer, other_name).grad == 0).all()
        assert torch.equal(after1[other_name], before[other_name])
    if "magnitude" in expected:
        assert not torch.equal(after1["magnitude"], before["magnitude"]), "magnitude did not move at step 1"
    step()
    after2 = snapshot()
    if variant != "magnitude":
        assert not torch.equal(after2[other_name], after1[other_name]), f"{other_name} did not move at step 2"
    for n in expected:
        assert not torch.equal(after2[n], before[n]), f"{n} did not move in two steps"
    for n, p in layer.base_layer.named_parameters():
        assert torch.equal(p, frozen[n]), f"base {n} changed"


# ---- dropout -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "hf_conv1d", "conv1d", "conv2d"])
@pytest.mark.parametrize("variant,norm_grad", [("lora", "detach"), ("dora", "detach"), ("dora", "exact"),
                                               ("magnitude", "detach")])
def test_dropout_train_mode_matches_peft_formula(kind: str, variant: str, norm_grad: str) -> None:
    """Train mode, p > 0 (x̃ = dropout(x), g = m / ||W0 + sBA||_c):
    DoRA: y = x W0ᵀ + (g − 1) ⊙ x̃ W0ᵀ + g ⊙ s·x̃ Aᵀ Bᵀ + b;  LoRA: y = x W0ᵀ + b + s·x̃ Aᵀ Bᵀ;
    magnitude-only has no adapter input, so dropout does not touch it.
    The mask is reproduced by seeding the RNG identically: the layer draws it once, from x.
    In eval mode dropout is off and the plain formula holds."""
    p, seed = 0.4, 1234
    layer, x = make_layer(kind, variant, bias=True, dropout=p, norm_grad=norm_grad)
    perturb(layer)
    layer.train()
    s = scaling_of(False)
    xl = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = layer(xl)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    (y * w).sum().backward()

    base = layer.base_layer
    leaves = ref_leaves(layer)
    xr = x.clone().requires_grad_(True)
    W0 = ref_w0_2d(kind, base)
    b = base.bias.detach()
    if variant == "magnitude":
        yr = ref_forward(kind, layer, xr, leaves, s, norm_grad)
    else:
        torch.manual_seed(seed)
        xt = F.dropout(xr, p, training=True)
        delta = s * (leaves["lora_B"].flatten(1) @ leaves["lora_A"].flatten(1))
        if variant == "lora":
            yr = ref_apply(kind, base, W0, xr, b) + ref_apply(kind, base, delta, xt, None)
        else:
            norm = (W0 + delta).square().sum(dim=1).sqrt()
            if norm_grad == "detach":
                norm = norm.detach()
            g = channel(kind, leaves["magnitude"] / norm, y.ndim)
            yr = (ref_apply(kind, base, W0, xr, None) + (g - 1) * ref_apply(kind, base, W0, xt, None)
                  + g * ref_apply(kind, base, delta, xt, None) + channel(kind, b, y.ndim))
    (yr * w).sum().backward()
    torch.testing.assert_close(y, yr, **TOL[F64])
    grads = adapter_grads(layer)
    for name, leaf in leaves.items():
        torch.testing.assert_close(grads[name], leaf.grad, **TOL[F64], msg=lambda m, n=name: f"grad {n}: {m}")
    torch.testing.assert_close(xl.grad, xr.grad, **TOL[F64])

    # Eval mode: dropout is a no-op and the plain formula holds.
    layer.eval()
    with torch.no_grad():
        y_eval = layer(x)
        y_plain = ref_forward(kind, layer, x, ref_leaves(layer), s, norm_grad)
    torch.testing.assert_close(y_eval, y_plain, **TOL[F64])
    if variant == "magnitude":
        torch.testing.assert_close(y.detach(), y_eval, **TOL[F64])
    else:
        assert (y.detach() - y_eval).abs().max() > 1e-3         # negative control: the mask did something


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_embedding_with_dropout_raises(variant: str) -> None:
    base, _ = make_base("embedding", False, F64, 0)
    with pytest.raises(ValueError, match="dropout"):
        EmbeddingAdapter(base, variant, RANK, ALPHA, dropout=0.1)


# ---- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rank", [0, -1, 2.0, True])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_invalid_rank_raises_value_error(kind: str, rank: object, use_rslora: bool) -> None:
    base, _ = make_base(kind, True, F64, 0)
    with pytest.raises(ValueError, match="rank"):
        CLS[kind](base, "dora", rank, ALPHA, use_rslora=use_rslora)


@pytest.mark.parametrize("kind", KINDS)
def test_rank_above_min_dim_warns_and_stays_exact(kind: str) -> None:
    """PEFT accepts r > min(out, in) (and such adapter files exist), so dorakit does too, with a warning;
    the layer still equals its base at init."""
    base, x = make_base(kind, True, F64, 0)
    out, inp = ref_w0_2d(kind, base).shape
    assert min(out, inp) < 8
    with pytest.warns(UserWarning, match="exceeds min"):
        layer = CLS[kind](base, "dora", 8, ALPHA)
    torch.testing.assert_close(layer(x), base(x), **TOL[F64])


@pytest.mark.parametrize("kind", ["linear", "conv2d", "embedding"])
def test_rank_equal_to_min_dim_is_allowed(kind: str) -> None:
    base, x = make_base(kind, True, F64, 0)
    r = min(ref_w0_2d(kind, base).shape)
    layer = CLS[kind](base, "dora", r, ALPHA)
    assert layer.lora_A.flatten(1).shape[0] == r
    torch.testing.assert_close(layer(x), base(x), **TOL[F64])


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_invalid_alpha_raises_value_error(alpha: float, variant: str) -> None:
    base, _ = make_base("linear", True, F64, 0)
    with pytest.raises(ValueError, match="alpha"):
        LinearAdapter(base, variant, RANK, alpha)


@pytest.mark.parametrize("make,match", [
    (lambda: nn.Conv2d(4, 6, 3, groups=2), "groups"),
    (lambda: nn.Conv1d(4, 6, 3, padding=1, padding_mode="reflect"), "padding_mode"),
    (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"), "padding_mode"),
    (lambda: nn.Embedding(13, 7, max_norm=1.0), "max_norm"),
])
def test_unsupported_base_configurations_raise(make: Callable[[], nn.Module], match: str) -> None:
    base = make()
    cls = EmbeddingAdapter if isinstance(base, nn.Embedding) else ConvAdapter
    with pytest.raises(ValueError, match=match):
        cls(base, "dora", 2, ALPHA)


@pytest.mark.parametrize("kwargs,match", [({"variant": "vera"}, "variant"),
                                          ({"norm_grad": "sometimes"}, "norm_grad"),
                                          ({"init": "xavier"}, "init")])
def test_invalid_options_raise(kwargs: dict, match: str) -> None:
    base, _ = make_base("linear", True, F64, 0)
    args = {"variant": "dora", **kwargs}
    with pytest.raises(ValueError, match=match):
        LinearAdapter(base, args.pop("variant"), RANK, ALPHA, **args)


@pytest.mark.parametrize("kind", ["linear", "embedding"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int8])
def test_integer_weight_raises_type_error(kind: str, dtype: torch.dtype) -> None:
    base, _ = make_base(kind, True, F64, 0)
    base.weight = nn.Parameter(torch.ones(base.weight.shape, dtype=dtype), requires_grad=False)
    with pytest.raises(TypeError, match="floating"):
        CLS[kind](base, "dora", RANK, ALPHA)


# ---- the cached ||W0||² ------------------------------------------------------------------------

def _set_weight(base: nn.Module, new: Tensor, how: str) -> None:
    if how == "no_grad_copy":
        with torch.no_grad():
            base.weight.copy_(new)
    elif how == "no_grad_mul_add":                 # an in-place update like an optimizer's
        with torch.no_grad():
            base.weight.mul_(0.0).add_(new)
    elif how == "data_copy":                       # the `.data` idiom of many training scripts
        base.weight.data.copy_(new)
    elif how == "load_state_dict":
        sd = {k: v.clone() for k, v in base.state_dict().items()}
        sd["weight"] = new.clone()
        base.load_state_dict(sd)
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("variant", ["dora", "magnitude"])
@pytest.mark.parametrize("kind,how", [(k, "no_grad_copy") for k in KINDS]
                         + [(k, h) for k in ("linear", "conv2d", "embedding")
                            for h in ("no_grad_mul_add", "data_copy", "load_state_dict")])
def test_output_follows_in_place_change_of_base_weight(kind: str, variant: str, how: str) -> None:
    layer, x = make_layer(kind, variant)
    perturb(layer)
    with torch.no_grad():
        y_old = layer(x)
    base = layer.base_layer
    new = torch.randn(base.weight.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    _set_weight(base, new, how)
    # Nothing is cached outside dk.cached_norms (issue 16), so even a write through `.data`, which
    # bypasses the version counter, is seen without layer.refresh_weight_cache().
    torch.testing.assert_close(base.weight, new, rtol=0, atol=0)
    with torch.no_grad():
        y_new = layer(x)
        y_ref = ref_forward(kind, layer, x, ref_leaves(layer), scaling_of(False), "detach")
    torch.testing.assert_close(y_new, y_ref, **TOL[F64])
    assert (y_new - y_old).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["linear", "conv2d", "embedding"])
@pytest.mark.parametrize("variant", ["dora", "magnitude"])
def test_float32_layer_cast_to_float64_matches_float64_reference(kind: str, variant: str) -> None:
    """After layer.double(), the output is the float64 DoRA of the (now float64) parameters: the
    cached ||W0||² must not keep float32 rounding (~1e-7 relative), which TOL[float64] would see."""
    layer, x = make_layer(kind, variant, True, torch.float32)
    perturb(layer)
    with torch.no_grad():
        layer(x)
    layer.double()
    x = x.double() if x.is_floating_point() else x
    with torch.no_grad():
        y = layer(x)
        y_ref = ref_forward(kind, layer, x, ref_leaves(layer), scaling_of(False), "detach")
    assert y.dtype == F64
    torch.testing.assert_close(y, y_ref, **TOL[F64])


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("norm_grad", ["detach", "exact"])
def test_zero_row_in_base_weight_stays_finite(kind: str, norm_grad: str) -> None:
    """A dead output unit (zero row of W0) gives ||W0||_c = 0; the clamp keeps forward and backward finite."""
    torch.manual_seed(0)
    base, x = make_base(kind, True, F64, 0)
    with torch.no_grad():
        base.weight[0].zero_()
    layer = CLS[kind](base, "dora", RANK, ALPHA, norm_grad=norm_grad)
    assert torch.isfinite(layer.magnitude).all()
    xl = x.clone().requires_grad_(True)
    y = layer(xl)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(xl.grad).all()
    for name, g in adapter_grads(layer).items():
        assert torch.isfinite(g).all(), name
    # At init the dead unit still outputs exactly its bias, as the base layer does.
    torch.testing.assert_close(y.detach(), base(x), **TOL[F64])


def test_deepcopy_and_pickled_module_give_the_same_output() -> None:
    """A wrapped model survives copy.deepcopy and a whole-module torch.save / torch.load round trip
    (the wrapper's attribute fall-through to the base layer must not recurse on a half-built object)."""
    import copy
    import io

    layer, x = make_layer("linear", "dora")
    perturb(layer)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(layer), torch.load(buffer, weights_only=False)):
        torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)
        assert clone.in_features == layer.base_layer.in_features  # read through from the base layer


# ---- regressions from the independent review ------------------------------------------------

def test_norm_stays_float32_after_a_model_wide_cast() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).to(torch.bfloat16)
    dk.apply_adapters(model, dk.AdapterConfig(rank=4, targets=["0"]))
    model.to(torch.bfloat16)  # W0 is already bf16: only the (floating) buffers get cast
    layer = model[0]
    scale = layer.dora_scale()  # (no cached ||W0||² buffer any more for Module.to to cast: issue 16)
    # Module.to also cast m, A, B to bf16 (the user's choice); the norm itself must still be float32:
    # g = m / ||W0||_c to float32 rounding (a bf16 norm would be off by up to 2^-8 relative).
    reference = layer.magnitude.double() / layer.base_layer.weight.double().norm(dim=1)
    assert ((scale.double() - reference).abs() / reference).max().item() < 1e-6


def test_unbatched_conv_input_matches_batched() -> None:
    torch.manual_seed(0)
    layer = ConvAdapter(nn.Conv1d(3, 5, kernel_size=3, padding=1), "dora", 2, 4.0)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.magnitude.mul_(1.5)
    x = torch.randn(3, 5)  # (C, L) with L == out channels: a wrong axis would broadcast silently
    torch.testing.assert_close(layer(x), layer(x.unsqueeze(0)).squeeze(0))
