"""One Triton kernel for an adapter layer's call on a few rows (decoding): y = g ⊙ (x W0ᵀ + (x (s·A)ᵀ) Bᵀ) + b.

An eager decode step is bound by the host's launches, not by the GPU: the unmerged layer's call is
otherwise three (x W0ᵀ, h = x (s·A)ᵀ, and the epilogue or B's product), the base layer's one. Here every
program reads a tile of W0's rows and all of s·A (a few KB, from L2) once over K, so x W0ᵀ and h come out
of the same loop, then adds h Bᵀ, scales by g (DoRA: m / ||W0 + sBA||_c, float32; LoRA: none) and adds
the bias: one launch. For M <= DECODE_MAX_ROWS rows and ranks <= DECODE_MAX_RANK (one rank tile).

Precision as the unfused path: float32 accumulation; h rounded to x's dtype before B's product (as
F.linear returns it); float32 operands use IEEE dots. Shapes: x (M, K), W0 (N, K), s·A (R, K), B (N, R),
y (M, N). Importing this module needs triton; on a CPU it runs under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import DECODE_MAX_RANK, DECODE_MAX_ROWS


@triton.jit
def _decode_kernel(X, W, A, B, G, BIAS, Y, M, N, K, R, HAS_G: tl.constexpr, HAS_BIAS: tl.constexpr,
                   IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_R: tl.constexpr):
    """Columns [pid·BLOCK_N, +BLOCK_N) of y for all M rows; grid (cdiv(N, BLOCK_N),)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    h = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk[None, :] < K
        x = tl.load(X + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & kmask, other=0.0)
        w = tl.load(W + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & kmask, other=0.0)
        a = tl.load(A + rr[:, None] * K + rk[None, :], mask=(rr[:, None] < R) & kmask, other=0.0)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            h += tl.dot(x, tl.trans(a), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
            h += tl.dot(x, tl.trans(a))
    b = tl.load(B + rn[None, :] * R + rr[:, None], mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
    if IEEE:
        acc += tl.dot(h.to(b.dtype), b, input_precision="ieee")
    else:
        acc += tl.dot(h.to(b.dtype), b)
    if HAS_G:
        acc *= tl.load(G + rn, mask=rn < N, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None] * N + rn[None, :], acc.to(Y.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def decode_linear(x: Tensor, weight: Tensor, a_s: Tensor, b_c: Tensor, g: Tensor | None, bias: Tensor | None) -> Tensor:
    """y (M, N) in x's dtype for x (M, K), M <= DECODE_MAX_ROWS: W0 (N, K), s·A (R, K) and B (N, R) in x's
    dtype, contiguous; g (N,) float32 or None (LoRA); bias (N,) or None."""
    M, K = x.shape
    N, R = b_c.shape
    if M > DECODE_MAX_ROWS or R > DECODE_MAX_RANK:
        raise ValueError(f"decode_linear takes at most {DECODE_MAX_ROWS} rows and rank {DECODE_MAX_RANK}, "
                         f"got {M} rows, rank {R}.")
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    block_n, block_k = 32, 128
    _decode_kernel[(triton.cdiv(N, block_n),)](
        x, weight, a_s, b_c, g if g is not None else y, bias if bias is not None else y, y, M, N, K, R,
        HAS_G=g is not None, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, BLOCK_M=16,
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=max(16, triton.next_power_of_2(R)), num_warps=4, num_stages=3)
    return y
