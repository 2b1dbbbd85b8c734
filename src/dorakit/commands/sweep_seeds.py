"""``dorakit sweep --seeds``: accuracy vs rank over several seeds, mean ± 95% interval, DoRA − LoRA paired.

Each seed's sweep lives in ``<output-dir>/seed<S>/`` (its own sweep.json); this module reads them and
writes ``<output-dir>/sweep_seeds.{md,json,png}``:

* per (method, rank): mean accuracy over the seeds with its Student-t 95% interval;
* DoRA − LoRA at the same rank and DoRA† (DoRA at half LoRA's rank, the paper's Table 1) − LoRA,
  paired by seed (the same seed gives both the same data order and split): mean difference, its t
  interval and the two-sided paired t-test p-value. An interval that excludes 0 is a significant
  difference at the 5% level; with 5 seeds only large, consistent differences qualify.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..analysis.stats import paired_t, t_interval
from ..formats.io import atomic_write_bytes
from .report import markdown_table

Rows = Sequence[Mapping[str, object]]


def read_seed_sweeps(out: Path) -> dict[int, list[dict[str, object]]]:
    """{seed: rows of <out>/seed<seed>/sweep.json} for every seed folder that holds one."""
    found = {}
    for path in sorted(out.glob("seed*/sweep.json")):
        suffix = path.parent.name.removeprefix("seed")
        if suffix.isdigit():
            found[int(suffix)] = json.loads(path.read_text())
    return found


def _accuracies(by_seed: Mapping[int, Rows], method: str, rank: int) -> dict[int, float]:
    return {seed: float(r["accuracy"]) for seed, rows in by_seed.items() for r in rows  # type: ignore[arg-type]
            if r["method"] == method and r["rank"] == rank}


def seed_summary(by_seed: Mapping[int, Rows]) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """(per (method, rank) mean and interval, paired DoRA − LoRA comparisons) over the seeds."""
    keys = list(dict.fromkeys((str(r["method"]), int(r["rank"])) for rows in by_seed.values()  # type: ignore
                              for r in rows))
    summary = []
    for method, rank in keys:
        acc = list(_accuracies(by_seed, method, rank).values())
        ci = t_interval(acc) if len(acc) > 1 else None
        summary.append({"method": method, "rank": rank, "seeds": len(acc), "mean": math.fsum(acc) / len(acc),
                        "low": ci.low if ci else math.nan, "high": ci.high if ci else math.nan})
    comparisons = []
    for rank in sorted({k for m, k in keys if m == "lora"}):
        lora = _accuracies(by_seed, "lora", rank)
        for label, dora_rank in (("DoRA", rank), ("DoRA†", rank // 2)):
            dora = _accuracies(by_seed, "dora", dora_rank)
            seeds = sorted(set(lora) & set(dora))
            if dora_rank < 1 or len(seeds) < 2:
                continue
            diff = paired_t([dora[s] for s in seeds], [lora[s] for s in seeds])
            comparisons.append({"comparison": f"{label} r={dora_rank} − LoRA r={rank}", "seeds": len(seeds),
                                "diff": diff.mean, "low": diff.low, "high": diff.high, "p": diff.p_value,
                                "significant": diff.low > 0 or diff.high < 0})
    return summary, comparisons


def write_seed_summary(out: Path, by_seed: Mapping[int, Rows]) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """Write sweep_seeds.md / .json (and .png with matplotlib); return (summary, comparisons)."""
    summary, comparisons = seed_summary(by_seed)
    text = (markdown_table(summary, [("method", "method"), ("rank", "rank"), ("seeds", "seeds"),
                                     ("mean", "accuracy % (mean)"), ("low", "95% low"), ("high", "95% high")])
            + "\n\n" + markdown_table(comparisons, [("comparison", "paired by seed"), ("seeds", "seeds"),
                                                    ("diff", "mean diff (points)"), ("low", "95% low"),
                                                    ("high", "95% high"), ("p", "p (paired t)"),
                                                    ("significant", "CI excludes 0")]) + "\n")
    atomic_write_bytes(out / "sweep_seeds.md", text.encode())
    atomic_write_bytes(out / "sweep_seeds.json", json.dumps({"summary": summary, "comparisons": comparisons},
                                                            indent=2).encode())
    _plot(out / "sweep_seeds.png", summary)
    return summary, comparisons


def _plot(path: Path, summary: Rows) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return
    fig = Figure(figsize=(5, 3.5), layout="constrained")
    ax = fig.subplots()
    for i, method in enumerate(dict.fromkeys(str(r["method"]) for r in summary)):
        pts = [r for r in summary if r["method"] == method]
        ranks = [float(r["rank"]) * (1.04 if i else 0.96) for r in pts]   # offset so the bars don't overlap
        means = [float(r["mean"]) for r in pts]                           # type: ignore[arg-type]
        err = [[m - float(r["low"]) for m, r in zip(means, pts)],         # type: ignore[arg-type]
               [float(r["high"]) - m for m, r in zip(means, pts)]]        # type: ignore[arg-type]
        ax.errorbar(ranks, means, yerr=err, marker="o", capsize=3, label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank r (alpha = 2r)")
    ax.set_ylabel("accuracy % (mean, 95% CI)")
    ax.legend()
    fig.savefig(path, dpi=120)
