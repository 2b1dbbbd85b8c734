"""Tests for dorakit.adapters.functional: the pure DoRA / LoRA math against dense float64 references.

Every reference here is written out densely and independently of dorakit: the adapted weight
V = W0 + s·B·A is formed as a matrix and its per-output-row norm taken with plain float64 ops.
No golden numbers: every check is an identity (factored == dense, merge∘unmerge == id, ...).
"""

from __future__ import annotations

import math

import pytest
import torch

from dorakit import functional as fn

# Unit roundoffs (half the gap from 1 to the next float): the per-operation relative error bound.
U_BF16 = 2.0**-8
U_FP32 = 2.0**-24

# Odd, non-square (out, in, r) shapes, incl. out > in, r = 1 and r = min(out, in).
SHAPES = [(7, 13, 3), (13, 7, 3), (5, 29, 5), (1, 6, 1), (11, 4, 4)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _factors(out: int, inp: int, r: int, seed: int = 0, dtype: torch.dtype = torch.float64,
             b_std: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W0 (out, in), A (r, in), B (out, r) with a nonzero B, so that s·B·A is comparable to W0."""
    g = _gen(seed)
    W = torch.randn(out, inp, generator=g, dtype=torch.float64) / math.sqrt(inp)
    A = torch.randn(r, inp, generator=g, dtype=torch.float64) / math.sqrt(inp)
    B = torch.randn(out, r, generator=g, dtype=torch.float64) * b_std
    return W.to(dtype), A.to(dtype), B.to(dtype)


def dense_norm64(W: torch.Tensor, A: torch.Tensor | None, B: torch.Tensor | None, s: float) -> torch.Tensor:
    """||W0 + s·B·A||_c per output row, dense, float64: (out,)."""
    V = W.double()
    if A is not None and B is not None:
        V = V + s * (B.double() @ A.double())
    return V.square().sum(dim=1).sqrt()


# ---- lora_scaling / accumulation_dtype ----------------------------------------------------------

@pytest.mark.parametrize("alpha", [1.0, 5.0, 16.0])
@pytest.mark.parametrize("rank", [1, 3, 8])
def test_lora_scaling(alpha: float, rank: int) -> None:
    assert fn.lora_scaling(alpha, rank) == pytest.approx(alpha / rank, rel=1e-15)
    assert fn.lora_scaling(alpha, rank, use_rslora=False) == pytest.approx(alpha / rank, rel=1e-15)
    assert fn.lora_scaling(alpha, rank, use_rslora=True) == pytest.approx(alpha / math.sqrt(rank), rel=1e-15)
    # rsLoRA grows relative to plain scaling by exactly sqrt(r); equal at r = 1.
    ratio = fn.lora_scaling(alpha, rank, use_rslora=True) / fn.lora_scaling(alpha, rank)
    assert ratio == pytest.approx(math.sqrt(rank), rel=1e-15)


def test_accumulation_dtype() -> None:
    assert fn.accumulation_dtype(torch.zeros(1, dtype=torch.float64)) == torch.float64
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert fn.accumulation_dtype(torch.zeros(1, dtype=dt)) == torch.float32


# ---- row_norm_sq --------------------------------------------------------------------------------

@pytest.mark.parametrize("out,inp,r", SHAPES)
def test_row_norm_sq_float64(out: int, inp: int, r: int) -> None:
    W, _, _ = _factors(out, inp, r)
    got = fn.row_norm_sq(W)
    assert got.shape == (out,) and got.dtype == torch.float64
    torch.testing.assert_close(got, W.square().sum(dim=1), rtol=1e-13, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_row_norm_sq_low_precision_accumulates_in_fp32(dtype: torch.dtype) -> None:
    out, inp = 7, 61
    W = _factors(out, inp, 1)[0].to(dtype)
    got = fn.row_norm_sq(W)
    assert got.dtype == torch.float32 and got.shape == (out,)
    # Reference: the exact sum of squares of the *stored* low-precision values. Summing `inp`
    # nonnegative terms in fp32 has relative error <= gamma_inp ~ inp·u32; the norm->square
    # round trip adds a few u32 more. If the squares were accumulated in the weight's own dtype
    # (bf16/fp16), the error would be ~u_bf16 = 2^-8, far above this bound.
    ref = W.double().square().sum(dim=1)
    rtol = (inp + 4) * U_FP32
    assert ((got.double() - ref).abs() <= rtol * ref).all()


# ---- dora_norm_sq / dora_norm (factored) vs dense -----------------------------------------------

@pytest.mark.parametrize("out,inp,r", SHAPES)
@pytest.mark.parametrize("s", [0.5, 5.0 / 3.0, 5.0 / math.sqrt(3.0)])
def test_dora_norm_factored_matches_dense_float64(out: int, inp: int, r: int, s: float) -> None:
    W, A, B = _factors(out, inp, r, seed=out * 100 + inp)
    ref = dense_norm64(W, A, B, s)
    nsq = fn.dora_norm_sq(W, A, B, s)
    assert nsq.shape == (out,) and nsq.dtype == torch.float64
    torch.testing.assert_close(nsq, ref.square(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fn.dora_norm(W, A, B, s), ref, rtol=1e-12, atol=1e-14)
    # Passing the cached ||W0||² gives the same result as recomputing it.
    torch.testing.assert_close(fn.dora_norm_sq(W, A, B, s, weight_sq=W.square().sum(dim=1)), nsq,
                               rtol=1e-14, atol=0)
    # Negative control: the adapter actually changes the norm here.
    assert (ref - W.norm(dim=1)).abs().max() > 1e-3


@pytest.mark.parametrize("out,inp,r", SHAPES[:3])
def test_dora_norm_gradients_match_dense_float64(out: int, inp: int, r: int) -> None:
    s = 5.0 / 3.0
    W, A0, B0 = _factors(out, inp, r, seed=7)
    w = torch.randn(out, generator=_gen(8), dtype=torch.float64)
    A, B = A0.clone().requires_grad_(), B0.clone().requires_grad_()
    (fn.dora_norm(W, A, B, s) * w).sum().backward()
    Ar, Br = A0.clone().requires_grad_(), B0.clone().requires_grad_()
    (dense_norm64(W, Ar, Br, s) * w).sum().backward()
    torch.testing.assert_close(A.grad, Ar.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(B.grad, Br.grad, rtol=1e-10, atol=1e-12)
    assert A.grad.abs().max() > 1e-3 and B.grad.abs().max() > 1e-3


def test_dora_norm_bf16_weight_fp32_adapters_within_derived_bound() -> None:
    """bf16 W0 with fp32 A, B: the factored norm vs the float64 dense norm of the same stored values.

    Error budget per output row n (W0 is exact in float64; A, B are exact fp32 values):
    * ||w_n||² is accumulated in fp32 (squares of bf16 values are exact in fp32): rel. error ~in·u32.
    * the cross term uses W0Aᵀ computed in bf16: A is rounded to bf16 (one u_bf16 relative per
      element) and the product W0Aᵀ is rounded to bf16 (one more u_bf16), with fp32 accumulation
      inside the matmul (~in·u32 ≪ u_bf16). So |Δ(W0Aᵀ)_nj| <= 3·u_bf16 · Σ_k |W_nk||A_jk| (2 units
      of rounding + 1 unit of slack for the fp32 accumulation), and
      |Δcross_n| <= 3·u_bf16 · C_n with C_n = Σ_j |B_nj| Σ_k |W_nk||A_jk|.
    * quad = B(AAᵀ)Bᵀ is formed in fp32 from fp32 values: rel. error ~(in + r)·u32 of Q_n = |B|(|A||A|ᵀ)|B|ᵀ.
    => |Δ||·||²_n| <= 2s·3·u_bf16·C_n + 64·u32·(||w_n||² + 2s·C_n + s²·Q_n)   (64 >= in + r + a few)
    and, as |√a − √b| = |a − b| / (√a + √b) <= |a − b| / √b, |Δnorm_n| <= that / ref_n.
    """
    out, inp, r = 7, 61, 3
    s = 5.0 / 3.0
    W64, A64, B64 = _factors(out, inp, r, seed=11, b_std=1.0)
    W = W64.to(torch.bfloat16)
    A, B = A64.float(), B64.float()
    Wd, Ad, Bd = W.double(), A.double(), B.double()     # the exact stored values
    ref = dense_norm64(Wd, Ad, Bd, s)

    got = fn.dora_norm(W, A, B, s)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()

    C = ((Wd.abs() @ Ad.abs().T) * Bd.abs()).sum(dim=1)                  # (out,)
    Q = ((Bd.abs() @ (Ad.abs() @ Ad.abs().T)) * Bd.abs()).sum(dim=1)      # (out,)
    tol_sq = 2 * s * 3 * U_BF16 * C + 64 * U_FP32 * (Wd.square().sum(dim=1) + 2 * s * C + s * s * Q)
    tol = tol_sq / ref
    # The bound is not vacuous: it is a few percent of the norm at most.
    assert (tol / ref).max() < 0.05
    # The cross term matters here (the adapter moves the norm by much more than the bound).
    assert ((ref - Wd.norm(dim=1)).abs() > 4 * tol).any()
    err = (got.double() - ref).abs()
    assert (err <= tol).all(), f"max err/tol = {(err / tol).max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_dora_norm_clamp_zero_row_and_cancellation(dtype: torch.dtype) -> None:
    out, inp, r = 5, 9, 2
    s = 1.5
    W64, A64, B64 = _factors(out, inp, r, seed=3)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    A, B = A64.to(acc), B64.to(acc)
    # Row 0: W0 row and B row are zero -> ||·||² = 0 exactly.
    W64[0] = 0.0
    B[0] = 0.0
    # Row 1: W0 row = −s·(BA) row -> cancellation, the true norm is (nearly) zero and the
    # factored squared norm may come out slightly negative in floating point.
    W64[1] = -s * (B[1].double() @ A.double())
    W = W64.to(dtype)
    norm = fn.dora_norm(W, A, B, s)
    assert torch.isfinite(norm).all() and (norm > 0).all()
    assert norm[0] <= math.sqrt(torch.finfo(acc).tiny) * (1 + 1e-6)
    # Gradients through the clamped norm stay finite too (norm_grad="exact" relies on this).
    Ag, Bg = A.clone().requires_grad_(), B.clone().requires_grad_()
    fn.dora_norm(W, Ag, Bg, s).sum().backward()
    assert torch.isfinite(Ag.grad).all() and torch.isfinite(Bg.grad).all()
    # safe_sqrt on its own: zero and negative inputs are clamped.
    t = torch.tensor([0.0, -1e-30, 4.0], dtype=acc)
    out_t = fn.safe_sqrt(t)
    assert torch.isfinite(out_t).all() and (out_t > 0).all()
    assert out_t[2] == 2.0


# ---- merge / unmerge ----------------------------------------------------------------------------

def _magnitude(out: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A positive magnitude away from any norm: m ∈ [0.5, 2)."""
    return (0.5 + 1.5 * torch.rand(out, generator=_gen(seed), dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("out,inp,r", SHAPES)
@pytest.mark.parametrize("variant", ["dora", "magnitude"])
def test_dora_merged_weight_matches_dense_and_round_trips_float64(out: int, inp: int, r: int,
                                                                   variant: str) -> None:
    s = 5.0 / 3.0
    W, A, B = _factors(out, inp, r, seed=21)
    m = _magnitude(out, 22)
    if variant == "magnitude":
        A = B = None
    merged, norm = fn.dora_merged_weight(W, A, B, m, s)
    V = W if A is None else W + s * (B @ A)
    ref_norm = V.square().sum(dim=1).sqrt()
    ref = m[:, None] * V / ref_norm[:, None]
    assert merged.dtype == torch.float64 and merged.shape == (out, inp)
    torch.testing.assert_close(norm, ref_norm, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(merged, ref, rtol=1e-12, atol=1e-14)
    # W' = m ⊙ direction: its row norms are m (paper Eq. 5).
    torch.testing.assert_close(merged.norm(dim=1), m, rtol=1e-12, atol=0)
    # Negative control: the merged weight is not the base weight.
    assert (merged - W).abs().max() > 1e-2
    restored = fn.dora_unmerged_weight(merged, A, B, m, norm, s)
    torch.testing.assert_close(restored, W, rtol=0, atol=1e-12 * W.abs().max().item())


@pytest.mark.parametrize("out,inp,r", SHAPES[:3])
def test_dora_merge_round_trip_float32(out: int, inp: int, r: int) -> None:
    s = 5.0 / 3.0
    W, A, B = _factors(out, inp, r, seed=31, dtype=torch.float32)
    m = _magnitude(out, 32, torch.float32)
    merged, norm = fn.dora_merged_weight(W, A, B, m, s)
    assert merged.dtype == torch.float32 and norm.dtype == torch.float32
    ref = (m.double()[:, None] * (W.double() + s * B.double() @ A.double())
           / dense_norm64(W, A, B, s)[:, None])
    # A handful of fp32 roundings on values of size |V| ~ |W0| + |sBA|: ~1e-6 of the largest entry.
    scale = (W.double().abs() + s * B.double().abs() @ A.double().abs()).max().item()
    torch.testing.assert_close(merged.double(), ref, rtol=0, atol=1e-6 * scale)
    restored = fn.dora_unmerged_weight(merged, A, B, m, norm, s)
    assert restored.dtype == torch.float32
    torch.testing.assert_close(restored.double(), W.double(), rtol=0, atol=1e-6 * scale)


# ---- small building blocks ----------------------------------------------------------------------

def test_lora_delta_matches_dense() -> None:
    W, A, B = _factors(7, 13, 3, seed=41)
    s = 2.5
    torch.testing.assert_close(fn.lora_delta(A, B, s), s * (B @ A), rtol=1e-14, atol=0)
    d32 = fn.lora_delta(A, B, s, dtype=torch.float32)
    assert d32.dtype == torch.float32 and d32.shape == (7, 13)


def test_dora_combine_and_dropout_form_agree_without_dropout() -> None:
    g = _gen(51)
    base = torch.randn(4, 6, 7, generator=g, dtype=torch.float64)
    lora = torch.randn(4, 6, 7, generator=g, dtype=torch.float64)
    scale = 0.5 + torch.rand(7, generator=g, dtype=torch.float64)
    s = 1.7
    y = fn.dora_combine(base, lora, scale, s)
    torch.testing.assert_close(y, scale * (base + s * lora), rtol=1e-14, atol=0)
    # x̃ = x: PEFT's dropout form reduces to the plain form.
    torch.testing.assert_close(fn.dora_combine_dropout(base, base, lora, scale, s), y, rtol=1e-13, atol=1e-14)
    # magnitude-only: no LoRA term.
    torch.testing.assert_close(fn.dora_combine(base, None, scale, 0.0), scale * base, rtol=1e-14, atol=0)
    # Channel-first layout (convolutions): the per-channel vector broadcasts over dim 1.
    base_c, lora_c = base.transpose(1, 2), lora.transpose(1, 2)                  # (4, 7, 6)
    yc = fn.dora_combine(base_c, lora_c, scale, s, channel_dim=1)
    torch.testing.assert_close(yc, y.transpose(1, 2), rtol=1e-14, atol=0)


def test_add_bias_channel_dims() -> None:
    g = _gen(61)
    y = torch.randn(2, 7, 5, generator=g, dtype=torch.float64)
    b = torch.randn(7, generator=g, dtype=torch.float64)
    assert fn.add_bias(y, None) is y
    torch.testing.assert_close(fn.add_bias(y, b, channel_dim=1), y + b[None, :, None], rtol=0, atol=0)
    yl = y.transpose(1, 2)
    torch.testing.assert_close(fn.add_bias(yl, b), yl + b, rtol=0, atol=0)
