"""Reports over finished runs: the ΔM / ΔD figure and fits (``dorakit analyze``) and the method table."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..analysis import DeltaRecord, fit_line, plot_deltas, read_json, write_csv, write_json
from ..analysis.slopes import normalize as normalize_records
from ..analysis.slopes import select_steps, slope_table
from ..formats.io import atomic_write_bytes


def _deltas_file(run: str | Path) -> Path:
    path = Path(run)
    path = path / "deltas.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ΔM / ΔD records; run dorakit finetune with --record-deltas N first.")
    return path


def method_fits(records: Sequence[DeltaRecord]) -> dict[str, dict[str, float]]:
    """Per method, the least-squares line ΔM = slope·ΔD + b and Pearson r over all its points
    (every layer and recorded step), as the paper reports for Fig. 2."""
    fits: dict[str, dict[str, float]] = {}
    for method in dict.fromkeys(r.method or "?" for r in records):
        points = [r for r in records if (r.method or "?") == method]
        fit = fit_line([r.delta_d for r in points], [r.delta_m for r in points])
        fits[method] = {"slope": fit.slope, "intercept": fit.intercept, "r": fit.r, "n": fit.n}
    return fits


def analyze_runs(runs: Sequence[str | Path], output_dir: str | Path, *, module_type: str | None = None,
                 view: str = "pooled", normalize: str = "none", checkpoints: int = 0,
                 n_boot: int = 1000) -> dict[str, dict[str, float]]:
    """Read each run's deltas.json; write deltas.csv, deltas.json, fits.json and deltas.png to ``output_dir``.

    ``checkpoints`` keeps that many evenly spaced recorded steps (0: all; the paper shows 4) and
    ``normalize`` ("none", "layer", "step") rescales ΔM / ΔD before fitting and plotting (see
    dorakit.analysis.slopes). fits.json holds the pooled fit per method (slope, intercept, Pearson r,
    n and, with ``n_boot`` > 0, the cluster-bootstrap 95% interval low / high); with ``view``
    "per-checkpoint" checkpoint_fits.json also holds one slope per (method, step) over the layers.
    The PNG needs matplotlib (``pip install 'dorakit[plot]'``); without it the numbers are still
    written and a warning says so. Returns the pooled per-method fits.
    """
    records = [r for run in runs for r in read_json(_deltas_file(run))]
    if module_type is not None:
        records = [r for r in records if r.module_type == module_type]
        if not records:
            raise ValueError(f"no records of module type {module_type!r}; pick one the runs adapted "
                             "(e.g. q_proj for LLaMA, query for BERT).")
    records = normalize_records(select_steps(records, checkpoints), normalize)  # type: ignore[arg-type]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(records, out / "deltas.csv")
    write_json(records, out / "deltas.json")
    fits = method_fits(records)
    for row in slope_table(records, "pooled", n_boot=n_boot):
        fits[str(row["method"])].update({k: v for k, v in row.items() if k in ("low", "high", "level")})
    atomic_write_bytes(out / "fits.json", json.dumps(fits, indent=2).encode())
    if view == "per-checkpoint":
        table = slope_table(records, "per-checkpoint", n_boot=n_boot)
        atomic_write_bytes(out / "checkpoint_fits.json", json.dumps(table, indent=2).encode())
    try:
        plot_deltas(records, out / "deltas.png", module_type=None)
    except ImportError as e:
        warnings.warn(f"{e} The figure was skipped; the numbers are in {out}.", stacklevel=2)
    return fits


def markdown_table(rows: Sequence[Mapping[str, object]], columns: Sequence[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` with (key, header) ``columns``; floats get 4 significant digits."""
    def cell(value: object) -> str:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return str(value)
        return f"{value:,d}" if isinstance(value, int) else f"{value:.4g}"

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(k, "")) for k, _ in columns) + " |" for row in rows]
    return "\n".join(lines)
