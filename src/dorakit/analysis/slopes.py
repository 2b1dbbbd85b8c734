"""The ΔD–ΔM slope of the paper's Fig. 2 (Liu et al. 2024, §2.2), in two views, with bootstrap intervals.

* **pooled** (the paper's figure): one least-squares line of ΔM on ΔD per method over every layer
  and every recorded checkpoint. Over a run ΔM and ΔD both grow, so a pooled slope mixes the
  between-layer relation with that common growth. Its interval is a cluster bootstrap over modules
  (a module's checkpoints are one unit: they are not independent draws).
* **per-checkpoint**: one line per (method, step) over the layers at that step: the between-layer
  relation alone, free of the growth over training. Its interval resamples layers.

``normalize`` optionally rescales ΔM and ΔD before fitting: ``"layer"`` divides each by its module's
mean over the steps (removes per-layer scale), ``"step"`` divides each by the mean over the modules
at that step (removes the common growth over training). ``select_steps`` keeps k evenly spaced
checkpoints (the paper shows four intermediate ones).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Literal

from .records import DeltaRecord
from .stats import SlopeCI, bootstrap_slope

View = Literal["pooled", "per-checkpoint"]
Normalize = Literal["none", "layer", "step"]
VIEWS: tuple[str, ...] = ("pooled", "per-checkpoint")
NORMALIZE: tuple[str, ...] = ("none", "layer", "step")


def select_steps(records: Sequence[DeltaRecord], k: int) -> list[DeltaRecord]:
    """The records of ``k`` evenly spaced recorded steps (the last one included); k = 0 keeps all."""
    if k < 0:
        raise ValueError(f"k must be >= 0 (0: every step), got {k}.")
    steps = sorted({r.step for r in records if r.step is not None})
    if k == 0 or k >= len(steps):
        return list(records)
    keep = {steps[round((i + 1) * len(steps) / k) - 1] for i in range(k)}
    return [r for r in records if r.step in keep]


def _role(name: str) -> str:
    """A module's name with its block indices blanked: the same weight in every layer shares it
    (``attention.output.dense`` and ``output.dense`` stay apart, unlike their module type)."""
    return re.sub(r"\.\d+(?=\.|$)", ".#", name)


def normalize(records: Sequence[DeltaRecord], by: Normalize) -> list[DeltaRecord]:
    """ΔM and ΔD divided by their mean within each group: per module over steps (``"layer"``), or per
    step over the layers of each module role (``"step"``); groups are also split by method.
    ``"none"`` returns them as they are."""
    if by not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {by!r}.")
    if by == "none":
        return list(records)

    def key(r: DeltaRecord) -> tuple[object, ...]:
        return (r.method, r.name) if by == "layer" else (r.method, _role(r.name), r.step)

    sums: dict[tuple[object, ...], list[float]] = {}
    for r in records:
        acc = sums.setdefault(key(r), [0.0, 0.0, 0])
        if not (math.isnan(r.delta_m) or math.isnan(r.delta_d)):
            acc[0], acc[1], acc[2] = acc[0] + r.delta_m, acc[1] + r.delta_d, acc[2] + 1

    def scaled(value: float, total: float, count: int) -> float:
        return value * count / total if count and total > 0 else math.nan

    out = []
    for r in records:
        sum_m, sum_d, count = sums[key(r)]
        out.append(dataclasses.replace(r, delta_m=scaled(r.delta_m, sum_m, count),
                                       delta_d=scaled(r.delta_d, sum_d, count)))
    return out


def _fit(points: Sequence[DeltaRecord], grouped: bool, n_boot: int, seed: int) -> dict[str, float]:
    x, y = [p.delta_d for p in points], [p.delta_m for p in points]
    try:
        ci = bootstrap_slope(x, y, groups=[p.name for p in points] if grouped else None,
                             n_boot=max(n_boot, 1), seed=seed)
    except ValueError:                                                   # fewer than 2 points / modules
        ci = SlopeCI(math.nan, math.nan, math.nan, len(points), 0)
    row = {"slope": ci.slope, "n": ci.n}
    if n_boot > 0:
        row.update(low=ci.low, high=ci.high, level=ci.level)
    return row


def slope_table(records: Sequence[DeltaRecord], view: View = "pooled", *, n_boot: int = 1000,
                seed: int = 0) -> list[dict[str, object]]:
    """One row per method (pooled) or per (method, step) (per-checkpoint): slope, n and, if n_boot > 0,
    the bootstrap 95% interval ``low`` / ``high``."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}.")
    rows: list[dict[str, object]] = []
    for method in dict.fromkeys(r.method or "?" for r in records):
        mine = [r for r in records if (r.method or "?") == method]
        if view == "pooled":
            rows.append({"method": method, **_fit(mine, True, n_boot, seed)})
            continue
        for step in sorted({r.step for r in mine}, key=lambda s: (s is None, s or 0)):
            rows.append({"method": method, "step": step,
                         **_fit([r for r in mine if r.step == step], False, n_boot, seed)})
    return rows
