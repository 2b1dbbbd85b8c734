"""The DoRA / LoRA math, once. Every layer, merge and unmerge calls these pure functions.

Shapes use the (out, in) view of a weight: an ``nn.Linear`` weight as it is, a conv weight
flattened to (out, in * kernel), an embedding table transposed to (dim, vocab), a transformers
``Conv1D`` weight transposed. The paper's column norm ``||.||_c`` (Liu et al. 2024, Eq. 2) is,
in this layout, the L2 norm of each *output row*: a vector of shape (out,).

Precision: norms are accumulated in float32 (float64 when the weight is float64). The DoRA norm
||W0 + sBA||_c is summed directly over blocks of rows of W0 + sBA (W0 upcast exactly, B·A formed
from A and B in the accumulation dtype), so it is as accurate as a dense norm where the update
nearly cancels a row, without ever holding the dense (out, in) matrix; the squared norm is clamped
at the smallest positive normal before the square root, so it can never produce a NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """s = alpha / r (Hu et al. 2021), or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def accumulation_dtype(t: Tensor) -> torch.dtype:
    """float64 for float64 tensors, float32 for everything else."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def row_norm_sq(weight: Tensor) -> Tensor:
    """||w_n||² for each output row n of an (out, in) weight, in the accumulation dtype: (out,).

    Accumulates in float32 without materialising a float32 copy of the weight.
    """
    acc = accumulation_dtype(weight)
    return torch.linalg.vector_norm(weight, dim=1, dtype=acc).square()


NORM_CHUNK_BYTES = 4 * 2**20
"""Largest temporary of the direct norm: rows of W0 + sBA are formed this many bytes at a time."""


def _chunk_rows(weight: Tensor, acc: torch.dtype) -> int:
    """Rows per block so that one (rows, in) block in ``acc`` stays within NORM_CHUNK_BYTES."""
    row_bytes = max(1, weight.shape[1]) * torch.finfo(acc).bits // 8
    return max(1, min(weight.shape[0], NORM_CHUNK_BYTES // row_bytes))


def _direction_rows(weight: Tensor, A: Tensor, B: Tensor, scaling: float, start: int, stop: int) -> Tensor:
    """V = W0[rows] + s·B[rows]·A in A's (the accumulation) dtype: (rows, in), a new tensor (one
    temporary of the block's size: the upcast copy takes the product in place)."""
    return weight[start:stop].to(A.dtype, copy=True).addmm_(B[start:stop], A, alpha=scaling)


def direct_norm_sq(weight: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """||W0 + s·B·A||² per row without a graph, A and B already in the accumulation dtype: (out,).

    One addmm + square + sum where the rows fit one block of NORM_CHUNK_BYTES (a few launches: the
    fused kernels' path calls this under no_grad), else the same block by block.
    """
    n = weight.shape[0]
    step = _chunk_rows(weight, A.dtype)
    if step >= n:
        return _direction_rows(weight, A, B, scaling, 0, n).square_().sum(dim=1)
    out = A.new_empty(n)                                                  # (out,)
    for start in range(0, n, step):
        stop = min(start + step, n)
        out[start:stop] = _direction_rows(weight, A, B, scaling, start, stop).square_().sum(dim=1)
    return out


class _DirectNormSq(torch.autograd.Function):
    """||W0 + s·B·A||² per row, summed block by block over rows; backward recomputes each block.

    d||v_n||²/dV = 2v_n, so with G = 2·dL/dn ⊙ V per block: dW0 = G, dB = s·G·Aᵀ, dA = s·Bᵀ·G.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:  # noqa: ANN001
        out = direct_norm_sq(weight, A, B, scaling)                       # (out,)
        ctx.save_for_backward(weight, A, B)
        ctx.scaling = scaling
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        weight, A, B = ctx.saved_tensors
        s = ctx.scaling
        need_w, need_A, need_B = ctx.needs_input_grad[:3]
        grad_w = torch.empty_like(weight) if need_w else None
        grad_A = torch.zeros_like(A) if need_A else None
        grad_B = torch.empty_like(B) if need_B else None
        step = _chunk_rows(weight, A.dtype)
        for start in range(0, weight.shape[0], step):
            stop = min(start + step, weight.shape[0])
            G = _direction_rows(weight, A, B, s, start, stop).mul_(2.0 * grad[start:stop, None])  # (rows, in)
            if need_w:
                grad_w[start:stop] = G
            if need_A:
                grad_A.addmm_(B[start:stop].T, G, alpha=s)                # (r, rows) @ (rows, in)
            if need_B:
                grad_B[start:stop] = torch.mm(G, A.T).mul_(s)             # (rows, in) @ (in, r)
        return grad_w, grad_A, grad_B, None


def dora_norm_sq(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                 weight_sq: Tensor | None = None) -> Tensor:
    """||W0 + s·B·A||² per output row, summed directly, never holding the dense (out, in) matrix.

    Rows of V = W0 + s·B·A are formed NORM_CHUNK_BYTES at a time in the accumulation dtype (W0
    upcast exactly, B·A a float32 product), squared and summed, so the result is as accurate as a
    dense norm even where W0 + sBA nearly cancels a row. (The factored expansion
    ||w_n||² + 2s·((W0 Aᵀ) ⊙ B)_n·1 + s²·((B·AAᵀ) ⊙ B)_n·1 loses all digits there: a row shrunk to
    1e-3 of ||w_n|| has float32 error ~1e-1.) Backward (norm_grad="exact") recomputes each block.
    Cost: one (out, r) x (r, in) product and one pass over W0, as the factored form's W0·Aᵀ.

    Args:
        weight: W0, (out, in).
        lora_A: A, (r, in).
        lora_B: B, (out, r).
        scaling: s.
        weight_sq: not read (the factored form took the cached ||w_n||² here); accepted so existing
            callers keep working.

    Returns:
        (out,) in the accumulation dtype. Differentiable in W0, A and B.
    """
    del weight_sq
    acc = accumulation_dtype(weight)
    return _DirectNormSq.apply(weight, lora_A.to(acc), lora_B.to(acc), float(scaling))


def safe_sqrt(norm_sq: Tensor) -> Tensor:
    """sqrt of a squared norm, clamped at the dtype's smallest normal so it is never 0 or NaN."""
    return norm_sq.clamp_min(torch.finfo(norm_sq.dtype).tiny).sqrt()


def dora_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
              weight_sq: Tensor | None = None) -> Tensor:
    """||W0 + s·B·A||_c: the per-output-row norm, (out,), summed directly (see dora_norm_sq)."""
    return safe_sqrt(dora_norm_sq(weight, lora_A, lora_B, scaling, weight_sq))


def lora_delta(lora_A: Tensor, lora_B: Tensor, scaling: float, dtype: torch.dtype | None = None) -> Tensor:
    """ΔW = s·B·A, (out, in), in ``dtype`` (default: A's dtype)."""
    dtype = dtype or lora_A.dtype
    return scaling * (lora_B.to(dtype) @ lora_A.to(dtype))


def dora_merged_weight(weight: Tensor, lora_A: Tensor | None, lora_B: Tensor | None,
                       magnitude: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """W' = m ⊙ (W0 + sBA) / ||W0 + sBA||_c (paper Eq. 5), dense, for merging.

    With lora_A = lora_B = None this is the magnitude-only W' = m ⊙ W0 / ||W0||_c.

    Returns:
        (W' in W0's dtype (out, in), the norm ||W0 + sBA||_c (out,) that unmerge needs).
    """
    acc = accumulation_dtype(weight)
    direction = weight.to(acc)
    if lora_A is not None and lora_B is not None:
        direction = direction + lora_delta(lora_A, lora_B, scaling, acc)
    norm = safe_sqrt(direction.square().sum(dim=1))                 # (out,)
    merged = direction * (magnitude.to(acc) / norm).unsqueeze(1)     # (out, in)
    return merged.to(weight.dtype), norm


def dora_unmerged_weight(merged: Tensor, lora_A: Tensor | None, lora_B: Tensor | None,
                         magnitude: Tensor, norm: Tensor, scaling: float) -> Tensor:
    """Invert dora_merged_weight: W0 = W' ⊙ ||W0 + sBA||_c / m − sBA, in W'’s dtype."""
    acc = accumulation_dtype(merged)
    weight = merged.to(acc) * (norm.to(acc) / magnitude.to(acc)).unsqueeze(1)
    if lora_A is not None and lora_B is not None:
        weight = weight - lora_delta(lora_A, lora_B, scaling, acc)
    return weight.to(merged.dtype)


def channel_view(v: Tensor, ndim: int, channel_dim: int) -> Tensor:
    """Reshape a per-channel vector (out,) to broadcast against a tensor of ``ndim`` dims."""
    if channel_dim in (-1, ndim - 1):
        return v
    shape = [1] * ndim  # e.g. (1, out, 1, 1) for a conv2d output (N, out, H, W) with channel_dim = -3
    shape[channel_dim] = -1
    return v.view(shape)


def dora_combine(base: Tensor, lora: Tensor | None, scale: Tensor, scaling: float,
                 channel_dim: int = -1) -> Tensor:
    """y = g ⊙ (x W0ᵀ + s·x Aᵀ Bᵀ), with g = m / ||W0 + sBA||_c; bias not included.

    Args:
        base: x W0ᵀ without bias, (..., out) (channel on ``channel_dim``).
        lora: x Aᵀ Bᵀ (unscaled), same shape as base, or None (magnitude-only).
        scale: g, (out,).
        scaling: s.
    """
    g = channel_view(scale, base.ndim, channel_dim)
    direction = base if lora is None else base + scaling * lora
    return g * direction


def dora_combine_dropout(base_clean: Tensor, base_dropped: Tensor, lora_dropped: Tensor, scale: Tensor,
                         scaling: float, channel_dim: int = -1) -> Tensor:
    """DoRA with dropout on the adapter input, exactly as PEFT computes it; bias not included.

    y = x W0ᵀ + (g − 1) ⊙ (x̃ W0ᵀ) + g ⊙ s·x̃ Aᵀ Bᵀ,  x̃ = dropout(x).

    Without dropout (x̃ = x) this is dora_combine. The clean base output x W0ᵀ is kept as it is;
    only the adapter's correction sees the dropped input.
    """
    g = channel_view(scale, base_clean.ndim, channel_dim)
    return base_clean + (g - 1) * base_dropped + g * (scaling * lora_dropped)


def add_bias(y: Tensor, bias: Tensor | None, channel_dim: int = -1) -> Tensor:
    """y + b: the bias is added after the DoRA scaling and never rescaled."""
    if bias is None:
        return y
    return y + channel_view(bias, y.ndim, channel_dim)
