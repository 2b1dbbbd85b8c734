"""Bootstrap slopes and t intervals against float64 numpy references, plus negative controls."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dorakit.analysis.stats import (
    bootstrap_slope,
    paired_t,
    resample_counts,
    t_cdf,
    t_interval,
    t_quantile,
)


def _numpy_bootstrap(x, y, groups, n_boot, seed, level):
    """The reference: for each resample, repeat the drawn groups' points and np.polyfit them."""
    labels = list(dict.fromkeys(groups))
    counts = resample_counts(len(labels), n_boot, seed).numpy()
    slopes = []
    for row in counts:
        reps = np.array([row[labels.index(g)] for g in groups]).astype(int)
        xs, ys = np.repeat(np.asarray(x, np.float64), reps), np.repeat(np.asarray(y, np.float64), reps)
        if np.ptp(xs) > 0:
            slopes.append(np.polyfit(xs, ys, 1)[0])
    tail = (1 - level) / 2
    return np.polyfit(x, y, 1)[0], np.quantile(slopes, [tail, 1 - tail]), len(slopes)


@pytest.mark.parametrize("grouped", [False, True])
def test_bootstrap_matches_numpy_reference(grouped: bool) -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1e-3, 24)
    y = -3.0 * x + rng.normal(0, 2e-4, 24)
    groups = [i % 6 for i in range(24)] if grouped else list(range(24))
    ci = bootstrap_slope(x.tolist(), y.tolist(), groups=groups if grouped else None, n_boot=300, seed=7, level=0.9)
    slope, (low, high), used = _numpy_bootstrap(x, y, groups, 300, 7, 0.9)
    assert ci.n == 24 and ci.n_boot == used
    np.testing.assert_allclose([ci.slope, ci.low, ci.high], [slope, low, high], rtol=1e-9)


def test_bootstrap_resolves_a_real_slope_and_is_seeded() -> None:
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1, 40)
    y = 2.0 * x + rng.normal(0, 0.1, 40)
    ci = bootstrap_slope(x.tolist(), y.tolist(), n_boot=500, seed=3)
    assert ci.low < 2.0 < ci.high and ci.excludes_zero
    assert bootstrap_slope(x.tolist(), y.tolist(), n_boot=500, seed=3) == ci


def test_negative_control_independent_points_mostly_cover_zero() -> None:
    """x and y independent: the true slope is 0, so about 95% of the intervals must contain it."""
    rng = np.random.default_rng(4)
    covered = 0
    for _ in range(60):
        x, y = rng.normal(size=30), rng.normal(size=30)
        ci = bootstrap_slope(x.tolist(), y.tolist(), n_boot=400, seed=int(rng.integers(1 << 30)))
        covered += ci.low <= 0 <= ci.high
    assert covered >= 51  # P(Binomial(60, 0.95) < 51) < 1%; a biased or degenerate interval fails


def test_nan_points_dropped_and_bad_inputs_refused() -> None:
    ci = bootstrap_slope([0.0, 1.0, math.nan, 2.0], [0.0, 2.0, 5.0, 4.0], n_boot=50)
    assert ci.n == 3 and ci.slope == pytest.approx(2.0)
    with pytest.raises(ValueError, match="at least 2"):
        bootstrap_slope([1.0, 2.0], [1.0, 2.0], groups=["a", "a"])
    with pytest.raises(ValueError, match="level"):
        bootstrap_slope([1.0, 2.0], [1.0, 2.0], level=1.0)
    with pytest.raises(ValueError, match="length"):
        bootstrap_slope([1.0, 2.0], [1.0])


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995])
def test_t_quantile_against_closed_forms(p: float) -> None:
    """df=1 is the Cauchy law, tan(π(p − ½)); df=2 has t = (2p − 1) / √(2p(1 − p))."""
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-6)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-6)
    assert t_cdf(-t_quantile(p, 4), 4) == pytest.approx(1 - p, abs=1e-9)


def test_t_interval_matches_numpy_and_large_df_tends_to_normal() -> None:
    vals = [71.2, 73.0, 72.4, 70.8, 74.1]
    ci = t_interval(vals)
    arr = np.asarray(vals, np.float64)
    half = t_quantile(0.975, 4) * arr.std(ddof=1) / math.sqrt(5)
    np.testing.assert_allclose([ci.mean, ci.low, ci.high], [arr.mean(), arr.mean() - half, arr.mean() + half])
    normal = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.975, dtype=torch.float64)).item()
    assert t_quantile(0.975, 10**6) == pytest.approx(normal, rel=1e-5)


def test_paired_t_negative_control_and_signal() -> None:
    same = paired_t([70.0, 71.0, 72.0, 73.0], [70.0, 71.0, 72.0, 73.0])
    assert same.mean == 0 and same.p_value == 1.0
    shifted = paired_t([71.0, 72.2, 72.9, 74.1, 75.0], [70.0, 71.0, 72.0, 73.0, 74.0])
    assert shifted.low > 0 and shifted.p_value < 0.01
    with pytest.raises(ValueError, match="length"):
        paired_t([1.0], [1.0, 2.0])
