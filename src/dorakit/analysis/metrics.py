"""The paper's weight-decomposition diagnostic (Liu et al. 2024, §2.2, Eq. 3-4), as pure math.

A weight W (out, in) is split per output row n (the paper's column, ``||.||_c``) into a magnitude
m_n = ||W_n|| and a direction W_n / ||W_n||. Between a base weight W0 and a tuned weight Wt:

    ΔM = mean_n |m_t,n − m_0,n|,        ΔD = mean_n (1 − cos(W_t,n, W_0,n)).

Everything is computed in float64, since 1 − cos of a small update cancels to nothing in float32.
Dense weights are read in row chunks, so the transient float64 copy is ``chunk_rows × in``, never the
whole matrix. For a live adapter nothing of size (out, in) is formed beyond that (see
``adapter_tensor_stats``).

Zero rows: a row whose norm is 0 in W0 or in Wt has no direction. Such rows count in ΔM, are left out
of ΔD (whose mean is over the remaining rows), and are counted in ``RowStats.zero_rows``. If every row
is zero, ΔD is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..adapters.layers import AdapterLayer, AdapterStateError

ANALYSIS_DTYPE = torch.float64
CHUNK_ROWS = 1024
"""Rows of a dense weight upcast to float64 at a time."""


@dataclass(frozen=True)
class RowStats:
    """Per-output-row magnitudes and cosines of one (W0, Wt) pair, float64, each (out,)."""

    magnitude_0: Tensor
    """m_0,n = ||W_0,n||."""
    magnitude: Tensor
    """m_t,n = ||W_t,n|| (for DoRA, |m_n|)."""
    cos: Tensor
    """cos(W_t,n, W_0,n) in [-1, 1]; NaN where either row is zero."""

    @property
    def rows(self) -> int:
        return self.magnitude.numel()

    @property
    def zero_rows(self) -> int:
        """Rows left out of ΔD because W0 or Wt is zero there."""
        return int(self.cos.isnan().sum())

    @property
    def delta_m(self) -> float:
        """ΔM = mean_n |m_t,n − m_0,n| (paper Eq. 3)."""
        return (self.magnitude - self.magnitude_0).abs().mean().item()

    @property
    def delta_d(self) -> float:
        """ΔD = mean_n (1 − cos(W_t,n, W_0,n)) over the non-zero rows (paper Eq. 4)."""
        return torch.nanmean(1.0 - self.cos).item()


def _cosine(dot: Tensor, norm_0: Tensor, norm_t: Tensor) -> Tensor:
    """dot / (norm_0 · norm_t), clamped to [-1, 1]; NaN where a norm is zero."""
    cos = (dot / (norm_0 * norm_t)).clamp(-1.0, 1.0)
    return cos.masked_fill((norm_0 == 0) | (norm_t == 0), math.nan)


def as_2d(weight: Tensor) -> Tensor:
    """A weight as (out, rest): (out, in) as it is, a conv kernel (out, in, *k) flattened."""
    if weight.dim() < 2:
        raise ValueError(f"a weight of shape {tuple(weight.shape)} has no rows to decompose; the analysis takes "
                         "matrices (out, in) or conv kernels (out, in, *k).")
    return weight.flatten(1)


@torch.no_grad()
def magnitude_direction(w0: Tensor, wt: Tensor, chunk_rows: int = CHUNK_ROWS) -> RowStats:
    """Row magnitudes and cosines between any two weights of one shape, in the (out, in) layout.

    Args:
        w0: the base weight W0, (out, in) or (out, in, *k). Transpose it first if it is stored (in, out)
            (transformers ``Conv1D``) or is an embedding table (vocab, dim).
        wt: the tuned weight, same shape.
        chunk_rows: rows upcast to float64 at a time.

    Returns:
        RowStats; ``.delta_m`` and ``.delta_d`` are the paper's ΔM and ΔD (§2.2, Eq. 3-4).
    """
    if w0.shape != wt.shape:
        raise ValueError(f"W0 {tuple(w0.shape)} and Wt {tuple(wt.shape)} differ in shape.")
    w0, wt = as_2d(w0), as_2d(wt)
    sq0, sqt, dot = [], [], []
    for r0, rt in zip(w0.split(chunk_rows), wt.split(chunk_rows)):
        r0, rt = r0.to(ANALYSIS_DTYPE), rt.to(ANALYSIS_DTYPE)          # (chunk, in)
        sq0.append(r0.square().sum(1))
        sqt.append(rt.square().sum(1))
        dot.append((r0 * rt).sum(1))
    norm_0, norm_t = torch.cat(sq0).sqrt(), torch.cat(sqt).sqrt()
    return RowStats(norm_0, norm_t, _cosine(torch.cat(dot), norm_0, norm_t))


def _factored_terms(w0: Tensor, lora_A: Tensor, lora_B: Tensor,
                    chunk_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """(||w_n||², ((W0 Aᵀ) ⊙ B)_n·1, ((B·AAᵀ) ⊙ B)_n·1), float64, each (out,).

    The expansion of functional.dora_norm_sq, taken apart because the cosine needs the cross term
    too; computing it here keeps one float64 pass over W0 for both.
    """
    A = lora_A.to(w0.device, ANALYSIS_DTYPE)                            # (r, in)
    B = lora_B.to(w0.device, ANALYSIS_DTYPE)                            # (out, r)
    quad = ((B @ (A @ A.T)) * B).sum(1)                                 # (out,)
    w_sq, cross = [], []
    for rows, b in zip(w0.split(chunk_rows), B.split(chunk_rows)):
        rows = rows.to(ANALYSIS_DTYPE)                                  # (chunk, in)
        w_sq.append(rows.square().sum(1))
        cross.append(((rows @ A.T) * b).sum(1))                         # (chunk, r) ⊙ (chunk, r) -> (chunk,)
    return torch.cat(w_sq), torch.cat(cross), quad


@torch.no_grad()
def adapter_tensor_stats(w0: Tensor, lora_A: Tensor | None, lora_B: Tensor | None, scaling: float,
                         magnitude: Tensor | None, chunk_rows: int = CHUNK_ROWS) -> RowStats:
    """RowStats of an adapter from its factors, without the dense W0 + sBA.

    With V' = W0 + s·B·A (V' = W0 for magnitude-only), per row n:

        ||V'_n||² = ||w_n||² + 2s·((W0 Aᵀ) ⊙ B)_n·1 + s²·((B·AAᵀ) ⊙ B)_n·1
        <V'_n, w_n> = ||w_n||² + s·((W0 Aᵀ) ⊙ B)_n·1

    LoRA (``magnitude`` None): Wt = V', so m_t = ||V'_n|| and cos = <V'_n, w_n> / (||V'_n|| ||w_n||).
    DoRA and magnitude-only: Wt = m ⊙ V' / ||V'||_c (paper Eq. 5), so m_t = |m_n| and the factor
    |m_n| / ||V'_n|| > 0 cancels in the cosine, leaving sign(m_n)·cos(V'_n, w_n). Magnitude-only has
    cos = sign(m_n) exactly (ΔD = 0 for a positive magnitude).

    Args:
        w0: W0 as (out, in) (``AdapterLayer.weight_2d()``).
        lora_A: A as (r, in), or None (magnitude-only).
        lora_B: B as (out, r), or None.
        scaling: s.
        magnitude: m (out,) for DoRA / magnitude-only; None for LoRA.

    A, B and m may live on another device than W0 (a checkpoint on the CPU); they are moved to W0's.
    """
    w0 = as_2d(w0)
    if lora_A is None or lora_B is None:
        if magnitude is None:
            raise ValueError("an adapter needs lora_A and lora_B, a magnitude, or both.")
        w_sq = torch.cat([r.to(ANALYSIS_DTYPE).square().sum(1) for r in w0.split(chunk_rows)])
        v_sq = dot = w_sq
    else:
        w_sq, cross, quad = _factored_terms(w0, lora_A.flatten(1), lora_B.flatten(1), chunk_rows)
        dot = w_sq + scaling * cross
        v_sq = (w_sq + (2.0 * scaling) * cross + (scaling * scaling) * quad).clamp_min(0.0)
    norm_0, norm_v = w_sq.sqrt(), v_sq.sqrt()
    if magnitude is None:                                               # LoRA: Wt = V'
        return RowStats(norm_0, norm_v, _cosine(dot, norm_0, norm_v))
    cos_v = torch.ones_like(w_sq) if v_sq is w_sq else dot / (norm_v * norm_0)   # cos(V'_n, w_n)
    m = magnitude.detach().to(w_sq.device, ANALYSIS_DTYPE)              # (out,)
    cos = (torch.sign(m) * cos_v).clamp(-1.0, 1.0)
    cos = cos.masked_fill((norm_0 == 0) | (m == 0) | (norm_v == 0), math.nan)
    return RowStats(norm_0, m.abs(), cos)


def adapter_magnitude_direction(layer: AdapterLayer, chunk_rows: int = CHUNK_ROWS) -> RowStats:
    """RowStats of a live adapter, W0 against its adapted weight W', from the factors (no dense W').

    Raises AdapterStateError for a merged adapter: its base weight then holds W', not W0. Unmerge
    it first, or compare the merged model with its base model with ``compare_state_dicts``. A
    disabled adapter (``adapters_disabled``) is analysed as if enabled: the update is still there.
    """
    if layer.merged:
        raise AdapterStateError("this adapter is merged, so its base weight holds W' and W0 is gone; call "
                                "dk.unmerge_adapters(model) first, or compare the merged model with its base "
                                "model (dorakit.analysis.compare_state_dicts).")
    magnitude = None if layer.variant == "lora" else layer.magnitude
    return adapter_tensor_stats(layer.weight_2d().detach(), layer.lora_A_2d(), layer.lora_B_2d(), layer.scaling,
                                magnitude, chunk_rows)


@dataclass(frozen=True)
class LineFit:
    """Least-squares line y = slope·x + intercept and Pearson's r of the points."""

    slope: float
    intercept: float
    r: float
    n: int


def fit_line(x: Sequence[float], y: Sequence[float]) -> LineFit:
    """Fit ΔM (y) against ΔD (x) as the paper's Fig. 2 does: least-squares slope and Pearson r.

    NaN points are dropped. With fewer than two points, or no spread in x, slope and r are NaN;
    with no spread in y, r is NaN.
    """
    pts = [(float(a), float(b)) for a, b in zip(x, y, strict=True) if not (math.isnan(a) or math.isnan(b))]
    n = len(pts)
    if n < 2:
        return LineFit(math.nan, math.nan, math.nan, n)
    mx = math.fsum(a for a, _ in pts) / n
    my = math.fsum(b for _, b in pts) / n
    sxx = math.fsum((a - mx) ** 2 for a, _ in pts)
    syy = math.fsum((b - my) ** 2 for _, b in pts)
    sxy = math.fsum((a - mx) * (b - my) for a, b in pts)
    if sxx == 0:
        return LineFit(math.nan, math.nan, math.nan, n)
    slope = sxy / sxx
    r = sxy / math.sqrt(sxx * syy) if syy > 0 else math.nan
    return LineFit(slope, my - slope * mx, max(-1.0, min(1.0, r)), n)


def module_weight_2d(module: nn.Module) -> Tensor | None:
    """A plain module's weight in the (out, in) layout, or None if it has none.

    nn.Linear as it is, transformers ``Conv1D`` (stored (in, out)) and nn.Embedding (vocab, dim)
    transposed, conv kernels flattened to (out, in·k): the same rows an AdapterLayer decomposes.
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() < 2 or not weight.is_floating_point():
        return None
    if is_transposed(module):
        return weight.T
    return weight.flatten(1)


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2), a linear layer whose weight is stored (in, out)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def is_transposed(module: nn.Module) -> bool:
    """True for modules whose weight is stored (in, out): transformers Conv1D and nn.Embedding."""
    return isinstance(module, nn.Embedding) or is_hf_conv1d(module)
