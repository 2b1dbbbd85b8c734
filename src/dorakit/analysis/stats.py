"""Confidence intervals for the paper's two claims: bootstrap slopes (Fig. 2) and seed intervals (Fig. 5).

``bootstrap_slope`` resamples the (ΔD, ΔM) points, or whole groups of them (e.g. every point of one
layer, since a layer's checkpoints are not independent), refits the least-squares slope of y on x
per resample and returns the percentile interval. ``t_interval`` and ``paired_t`` give Student-t
intervals over seeds (mean ± t·s/√n), for accuracy vs rank and DoRA − LoRA differences.

Pure functions of plain sequences, float64 throughout; no dorakit state is touched.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

_F64 = torch.float64


@dataclass(frozen=True)
class SlopeCI:
    """Least-squares slope of y on x with a bootstrap percentile interval."""

    slope: float
    """The slope fitted to all points."""
    low: float
    """Lower end of the interval (NaN when no resample had spread in x)."""
    high: float
    """Upper end of the interval."""
    n: int
    """Points used (NaN points dropped)."""
    n_boot: int
    """Resamples that had spread in x (those without are left out of the interval)."""
    level: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        """True if the whole interval lies on one side of 0: the slope's sign is resolved."""
        return self.low > 0 or self.high < 0


def resample_counts(units: int, n_boot: int, seed: int) -> Tensor:
    """How often each of ``units`` is drawn in each of ``n_boot`` resamples with replacement: (n_boot, units)."""
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(units, (n_boot, units), generator=gen)                 # (B, U)
    counts = torch.zeros(n_boot, units, dtype=_F64)
    return counts.scatter_add_(1, draws, torch.ones(n_boot, units, dtype=_F64))


def weighted_slopes(x: Tensor, y: Tensor, w: Tensor) -> Tensor:
    """Least-squares slope of y on x for each row of weights w (B, n); NaN where x has no weighted spread.

    slope_b = Σ w(x − x̄_w)(y − ȳ_w) / Σ w(x − x̄_w)², x̄_w = Σ w x / Σ w: a resample with point i drawn
    w_i times is the unweighted fit of the repeated points.
    """
    total = w.sum(1, keepdim=True)                                             # (B, 1)
    dx = x - (w * x).sum(1, keepdim=True) / total                              # (B, n)
    dy = y - (w * y).sum(1, keepdim=True) / total
    sxx = (w * dx * dx).sum(1)
    sxy = (w * dx * dy).sum(1)
    scale = (w * x * x).sum(1) / total.squeeze(1)                              # a spread this small is rounding
    return torch.where(sxx > 1e-12 * scale.clamp_min(1e-300), sxy / sxx, torch.full_like(sxx, math.nan))


def bootstrap_slope(x: Sequence[float], y: Sequence[float], *, groups: Sequence[Hashable] | None = None,
                    n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> SlopeCI:
    """Slope of y on x with a bootstrap percentile ``level`` interval.

    Args:
        x, y: the points (e.g. ΔD and ΔM); pairs with a NaN are dropped.
        groups: one label per point; if given, whole groups are resampled (a cluster bootstrap), so
            points that share a label (one layer's checkpoints) count as one unit.
        n_boot: resamples.
        level: coverage of the interval, in (0, 1).
        seed: seeds the resampling (the same seed gives the same interval).

    Raises:
        ValueError: mismatched lengths, a bad level or n_boot, or fewer than 2 points / groups.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}; e.g. 0.95.")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}; e.g. 2000.")
    labels = list(range(len(x))) if groups is None else list(groups)
    if not len(x) == len(y) == len(labels):
        raise ValueError(f"x, y and groups differ in length ({len(x)}, {len(y)}, {len(labels)}).")
    keep = [i for i in range(len(x)) if not (math.isnan(x[i]) or math.isnan(y[i]))]
    xs = torch.tensor([float(x[i]) for i in keep], dtype=_F64)
    ys = torch.tensor([float(y[i]) for i in keep], dtype=_F64)
    unit_of = {label: k for k, label in enumerate(dict.fromkeys(labels[i] for i in keep))}
    if len(unit_of) < 2:
        raise ValueError(f"a bootstrap needs at least 2 points (or groups) without NaN, got {len(unit_of)}.")
    point_unit = torch.tensor([unit_of[labels[i]] for i in keep])
    slope = weighted_slopes(xs, ys, torch.ones(1, len(keep), dtype=_F64))[0].item()
    w = resample_counts(len(unit_of), n_boot, seed)[:, point_unit]             # (B, n): each point's group count
    slopes = weighted_slopes(xs, ys, w)
    slopes = slopes[~slopes.isnan()]
    if slopes.numel() == 0:
        return SlopeCI(slope, math.nan, math.nan, len(keep), 0, level)
    tail = (1 - level) / 2
    low, high = torch.quantile(slopes, torch.tensor([tail, 1 - tail], dtype=_F64)).tolist()
    return SlopeCI(slope, low, high, len(keep), slopes.numel(), level)


# ---- Student t, for intervals over a handful of seeds ------------------------------------------------

def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom (Simpson's rule on the density, float64)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}.")
    # substitute t = tan(θ): the density over θ in (-π/2, atan t] is smooth and bounded
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def f(theta: float) -> float:
        c = math.cos(theta)
        if c <= 0.0:
            return 0.0
        u = math.tan(theta)
        return math.exp(log_c - (df + 1) / 2 * math.log1p(u * u / df)) / (c * c)

    a, b, n = -math.pi / 2, math.atan(t), 2000
    h = (b - a) / n
    total = f(a) + f(b) + sum((4 if i % 2 else 2) * f(a + i * h) for i in range(1, n))
    return min(1.0, max(0.0, total * h / 3))


def t_quantile(p: float, df: int) -> float:
    """The t value with P(T <= t) = p (bisection on t_cdf)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}.")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > p:
        lo *= 2
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class MeanCI:
    """Mean of a few values with its Student-t interval (and, for differences, the two-sided p of mean 0)."""

    mean: float
    low: float
    high: float
    n: int
    p_value: float = math.nan


def t_interval(values: Sequence[float], level: float = 0.95) -> MeanCI:
    """mean ± t_{(1+level)/2, n−1} · s / √n, and the two-sided one-sample t-test p-value against 0."""
    n = len(values)
    if n < 2:
        raise ValueError(f"an interval needs at least 2 values, got {n}.")
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    if sd == 0:
        return MeanCI(mean, mean, mean, n, 0.0 if mean != 0 else 1.0)
    half = t_quantile((1 + level) / 2, n - 1) * sd / math.sqrt(n)
    t = mean / (sd / math.sqrt(n))
    return MeanCI(mean, mean - half, mean + half, n, 2 * (1 - t_cdf(abs(t), n - 1)))


def paired_t(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> MeanCI:
    """Interval and p-value of the mean of a − b over pairs (e.g. DoRA − LoRA at the same seed)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length ({len(a)} vs {len(b)}).")
    return t_interval([u - v for u, v in zip(a, b)], level)
