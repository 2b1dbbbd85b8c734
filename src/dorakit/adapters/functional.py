"""The DoRA / LoRA math, once. Every layer, merge and unmerge calls these pure functions.

Shapes use the (out, in) view of a weight: an ``nn.Linear`` weight as it is, a conv weight
flattened to (out, in * kernel), an embedding table transposed to (dim, vocab), a transformers
``Conv1D`` weight transposed. The paper's column norm ``||.||_c`` (Liu et al. 2024, Eq. 2) is,
in this layout, the L2 norm of each *output row*: a vector of shape (out,).

Precision: norms are accumulated in float32 (float64 when the weight is float64). The one
product with the dense weight, W0 @ Aᵀ (out, r), is taken in W0's dtype (on a GPU a bf16/fp16
matmul accumulates in fp32) and then upcast; every other term of the factored norm is formed
from A and B upcast to the accumulation dtype, and the squared norm is clamped at the smallest
positive normal before the square root, so cancellation can never produce a NaN.
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


def dora_norm_sq(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                 weight_sq: Tensor | None = None) -> Tensor:
    """||W0 + s·B·A||² per output row, without forming the dense (out, in) matrix.

    ||w_n + s·(BA)_n||² = ||w_n||² + 2s·((W0 Aᵀ) ⊙ B)_n·1 + s²·((B·AAᵀ) ⊙ B)_n·1

    Args:
        weight: W0, (out, in).
        lora_A: A, (r, in).
        lora_B: B, (out, r).
        scaling: s.
        weight_sq: ||w_n||² (out,) if already known (it is cached by the layers).

    Returns:
        (out,) in the accumulation dtype. Differentiable in A and B (used by norm_grad="exact").
    """
    if weight_sq is None:
        weight_sq = row_norm_sq(weight)
    acc = weight_sq.dtype
    A = lora_A.to(acc)                                            # (r, in)
    B = lora_B.to(acc)                                            # (out, r)
    WAt = (weight @ lora_A.to(weight.dtype).T).to(acc)            # (out, r), the only pass over W0
    cross = (WAt * B).sum(dim=1)                                  # (out,)
    quad = ((B @ (A @ A.T)) * B).sum(dim=1)                       # (out,)
    return weight_sq + (2.0 * scaling) * cross + (scaling * scaling) * quad


def safe_sqrt(norm_sq: Tensor) -> Tensor:
    """sqrt of a squared norm, clamped at the dtype's smallest normal so it is never 0 or NaN."""
    return norm_sq.clamp_min(torch.finfo(norm_sq.dtype).tiny).sqrt()


def dora_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
              weight_sq: Tensor | None = None) -> Tensor:
    """||W0 + s·B·A||_c: the per-output-row norm, (out,), factored (see dora_norm_sq)."""
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
