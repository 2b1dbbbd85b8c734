"""Triton kernels for a mixed-adapter batch on one linear layer: the gathered low-rank product (the
Punica / S-LoRA BGMV idea, segmented by batch row) with DoRA's per-row scale in the same epilogue.

Shapes: x as (Bt, T, K) (batch row b, its T tokens); base = x W0ᵀ (Bt·T, N), computed once for every row
by the caller (cuBLAS); the pack of the layer's adapters, slot n being "no adapter" (zeros, g = 1):
``a_pack`` (n + 1, R, K) = s_i·A_i, ``b_pack`` (n + 1, N, R) = B_i, both zero-padded to the largest
rank R and in x's dtype, ``g_pack`` (n + 1, N) float32 = m_i / ||W0 + s_i B_i A_i||_c (DoRA), m_i / ||W0||_c
(magnitude-only) or 1 (LoRA); ``seg`` (Bt,) int32: the pack slot of each batch row.

Two launches: ``_shrink_kernel`` h = x (s_i A_i)ᵀ per batch row, split over K into (S, Bt·T, R) float32
partial sums (deterministic, no atomics); ``_expand_kernel`` finishes h, rounds it to x's dtype (as the
torch path's h) and writes y = g_i ⊙ (base + h B_iᵀ) + bias. Every tile of rows lies in one batch row, so
each program reads one adapter's A and B and the products are tensor-core dots. Float32 runs IEEE
dots. Importing this module needs triton; on a CPU the kernels run under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

GATHER_MAX_RANK = 128
"""The largest (padded) rank the gathered kernels take: one rank tile of at most 128 columns."""

SHRINK_PROGRAMS = 256
"""About this many shrink programs: K is split (at most MAX_SPLIT ways) until batch rows × slices reach it."""
MAX_SPLIT = 32


def _block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


@triton.jit
def _shrink_kernel(X, APACK, SEG, HP, T, K, R, MT, SPLIT, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """HP[j, rows] = x[rows] · (s_i A_i)ᵀ over the K tiles t ≡ j (mod SPLIT); grid (Bt, row tiles, SPLIT)."""
    b = tl.program_id(0)
    rt = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)        # token rows of batch row b
    j = tl.program_id(2)
    seg = tl.load(SEG + b).to(tl.int64)
    rm = b * T + rt                                                   # rows of x / h
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for k0 in range(j * BLOCK_K, K, SPLIT * BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rm[:, None] * K + rk[None, :], mask=(rt[:, None] < T) & (rk[None, :] < K), other=0.0)
        a = tl.load(APACK + seg * R * K + rr[:, None] * K + rk[None, :],
                    mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0)  # (BR, BK)
        if IEEE:
            acc += tl.dot(x, tl.trans(a), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(a))
    tl.store(HP + j * MT * R + rm[:, None] * R + rr[None, :], acc, mask=(rt[:, None] < T) & (rr[None, :] < R))


@triton.jit
def _expand_kernel(BASE, HP, BPACK, GPACK, SEG, BIAS, Y, T, N, R, MT, SPLIT, HAS_BIAS: tl.constexpr,
                   IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """y = g_i ⊙ (base + h B_iᵀ) + bias on one (BLOCK_M, BLOCK_N) tile of batch row b; grid (Bt, ·, ·)."""
    b = tl.program_id(0)
    rt = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    seg = tl.load(SEG + b).to(tl.int64)
    rm = b * T + rt
    rr = tl.arange(0, BLOCK_R)
    h_mask = (rt[:, None] < T) & (rr[None, :] < R)
    h = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for j in range(SPLIT):                                            # slice order: deterministic
        h += tl.load(HP + j * MT * R + rm[:, None] * R + rr[None, :], mask=h_mask, other=0.0)
    bt = tl.load(BPACK + seg * N * R + rn[:, None] * R + rr[None, :],
                 mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0)                                           # (BN, BR)
    h = h.to(bt.dtype)                                                # rounded as the torch path's h
    if IEEE:
        lora = tl.dot(h, tl.trans(bt), input_precision="ieee")
    else:
        lora = tl.dot(h, tl.trans(bt))
    mask = (rt[:, None] < T) & (rn[None, :] < N)
    base = tl.load(BASE + rm[:, None] * N + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GPACK + seg * N + rn, mask=rn < N, other=0.0)
    y = g[None, :] * (base + lora)
    if HAS_BIAS:
        y += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None] * N + rn[None, :], y.to(Y.dtype.element_ty), mask=mask)


def gathered_linear(x: Tensor, base: Tensor, a_pack: Tensor, b_pack: Tensor, g_pack: Tensor, seg: Tensor,
                    bias: Tensor | None) -> Tensor:
    """y (Bt, T, N) in x's dtype for x (Bt, T, K) and base = x W0ᵀ (Bt, T, N), from the pack (module doc)."""
    Bt, T, K = x.shape
    N = base.shape[-1]
    R = a_pack.shape[1]
    if R > GATHER_MAX_RANK:
        raise ValueError(f"the gathered kernel takes ranks up to {GATHER_MAX_RANK}, got {R}.")
    x, base = x.contiguous(), base.contiguous()
    block_m, block_k, block_n = min(64, max(16, triton.next_power_of_2(T))), 64, 64
    mt = triton.cdiv(T, block_m)
    split = max(1, min(triton.cdiv(K, block_k), triton.cdiv(SHRINK_PROGRAMS, Bt * mt), MAX_SPLIT))
    partials = torch.empty((split, Bt * T, R), device=x.device, dtype=torch.float32)
    ieee = x.dtype == torch.float32
    _shrink_kernel[(Bt, mt, split)](x, a_pack, seg, partials, T, K, R, Bt * T, split, IEEE=ieee,
                                    BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=_block_r(R), num_warps=4)
    y = torch.empty_like(base)
    _expand_kernel[(Bt, mt, triton.cdiv(N, block_n))](
        base, partials, b_pack, g_pack, seg, bias if bias is not None else base, y, T, N, R, Bt * T, split,
        HAS_BIAS=bias is not None, IEEE=ieee, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=_block_r(R),
        num_warps=4)
    return y
