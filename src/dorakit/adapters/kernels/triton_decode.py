"""One Triton kernel for an adapter layer's call on a few rows (decoding), each row through its own adapter:
y[i] = g_{seg i} ⊙ (x[i] W0ᵀ + (x[i] (s·A_{seg i})ᵀ) B_{seg i}ᵀ) + b.

An eager decode step is bound by the host's launches, not by the GPU: an unmerged layer's call is
otherwise three launches or more (x W0ᵀ, h = x (s·A)ᵀ, then the epilogue or B's product), the base
layer's one. Here every program takes a tile of BLOCK_N output columns for all rows: one pass over K
gives x W0ᵀ and h = x (s·A_j)ᵀ for every adapter j of the pack at once (the pack's A are a few KB to a
few hundred KB, read from L2), the columns of h that do not belong to a row's adapter are zeroed,
then h Bᵀ, the row's scale g and the bias: one launch. With one adapter (no ``seg``) it is the plain
single-adapter call. For M <= DECODE_MAX_ROWS rows (rows beyond take the other paths).

Precision as the unfused paths: float32 accumulation; h rounded to x's dtype before B's product (as
F.linear returns it); float32 operands use IEEE dots. Shapes: x (M, K), W0 (N, K); the pack
``a`` (S, R, K) = s_j·A_j, ``b`` (S, N, R) = B_j (zero-padded to the largest rank R), ``g`` (S, N)
float32 or None (no scale: LoRA); ``seg`` (M,) int32, each row's slot, or None (slot 0). Importing this
module needs triton; on a CPU it runs under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import DECODE_MAX_RANK, DECODE_MAX_ROWS

MAX_BLOCK_SR = 128
"""The widest tile of the pack's stacked ranks (S·R) one pass over K computes; more take further passes."""


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b in float32: IEEE float32 for float32 operands, tensor cores for half ones."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _h_pass(X, A, rm, rj, M, K, SR, acc_h, IEEE: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc_h + x (A rows rj)ᵀ over all of K: (BLOCK_M, BLOCK_SR) float32."""
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk[None, :] < K
        x = tl.load(X + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & kmask, other=0.0)
        a = tl.load(A + rj[:, None] * K + rk[None, :], mask=(rj[:, None] < SR) & kmask, other=0.0)
        acc_h += _dot(x, tl.trans(a), IEEE)
    return acc_h


@triton.jit
def _lora_pass(acc, acc_h, B, slot_of_row, rj, rn, N, R, SR, IEEE: tl.constexpr):
    """acc + (h restricted to each row's adapter) Bᵀ for the stacked-rank columns rj."""
    own = (rj[None, :] // R == slot_of_row[:, None]) & (rj[None, :] < SR)
    b = tl.load(B + (rj[:, None] // R) * N * R + rn[None, :] * R + rj[:, None] % R,
                mask=(rj[:, None] < SR) & (rn[None, :] < N), other=0.0)          # (BLOCK_SR, BLOCK_N)
    return acc + _dot(tl.where(own, acc_h, 0.0).to(b.dtype), b, IEEE)


@triton.jit
def _decode_kernel(X, W, A, B, G, SEG, BIAS, Y, M, N, K, R, SR, HAS_G: tl.constexpr, HAS_SEG: tl.constexpr,
                   HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_SR: tl.constexpr):
    """Columns [pid·BLOCK_N, +BLOCK_N) of y for all M rows; grid (cdiv(N, BLOCK_N),)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rj = tl.arange(0, BLOCK_SR)
    if HAS_SEG:
        slot_of_row = tl.load(SEG + rm, mask=rm < M, other=0)
    else:
        slot_of_row = tl.zeros((BLOCK_M,), tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_h = tl.zeros((BLOCK_M, BLOCK_SR), tl.float32)
    for k0 in range(0, K, BLOCK_K):  # the first pass: x W0ᵀ and h for the first BLOCK_SR stacked ranks
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk[None, :] < K
        x = tl.load(X + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & kmask, other=0.0)
        w = tl.load(W + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & kmask, other=0.0)
        a = tl.load(A + rj[:, None] * K + rk[None, :], mask=(rj[:, None] < SR) & kmask, other=0.0)
        acc += _dot(x, tl.trans(w), IEEE)
        acc_h += _dot(x, tl.trans(a), IEEE)
    acc = _lora_pass(acc, acc_h, B, slot_of_row, rj, rn, N, R, SR, IEEE)
    for j0 in range(BLOCK_SR, SR, BLOCK_SR):  # further stacked ranks (many adapters): h only
        rj2 = j0 + tl.arange(0, BLOCK_SR)
        acc_h2 = _h_pass(X, A, rm, rj2, M, K, SR, tl.zeros((BLOCK_M, BLOCK_SR), tl.float32), IEEE, BLOCK_K)
        acc = _lora_pass(acc, acc_h2, B, slot_of_row, rj2, rn, N, R, SR, IEEE)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if HAS_G:
        acc *= tl.load(G + slot_of_row[:, None] * N + rn[None, :], mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None] * N + rn[None, :], acc.to(Y.dtype.element_ty), mask=mask)


def decode_linear(x: Tensor, weight: Tensor, a: Tensor, b: Tensor, g: Tensor | None, bias: Tensor | None,
                  seg: Tensor | None = None) -> Tensor:
    """y (M, N) in x's dtype for x (M, K), M <= DECODE_MAX_ROWS (module doc). ``a`` (R, K) and ``b`` (N, R)
    for one adapter, or packs (S, R, K) and (S, N, R) with ``seg``; ``g`` (N,) or (S, N) float32 or None."""
    M, K = x.shape
    a3, b3 = (a[None], b[None]) if a.dim() == 2 else (a, b)
    S, R, N = a3.shape[0], a3.shape[1], b3.shape[1]
    if M > DECODE_MAX_ROWS or R > DECODE_MAX_RANK:
        raise ValueError(f"decode_linear takes at most {DECODE_MAX_ROWS} rows and rank {DECODE_MAX_RANK}, "
                         f"got {M} rows, rank {R}.")
    if (S > 1) != (seg is not None):
        raise ValueError("decode_linear needs seg (each row's slot) exactly when the pack holds several adapters.")
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    block_sr = min(MAX_BLOCK_SR, max(16, triton.next_power_of_2(S * R)))
    block_m = max(16, triton.next_power_of_2(M))
    _decode_kernel[(triton.cdiv(N, 32),)](
        x, weight, a3, b3, g if g is not None else y, seg if seg is not None else y,
        bias if bias is not None else y, y, M, N, K, R, S * R, HAS_G=g is not None, HAS_SEG=seg is not None,
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=32,
        BLOCK_K=128 if block_sr * block_m <= 1024 else 64, BLOCK_SR=block_sr, num_warps=4)
    return y
