"""Tables and figures of docs/paper-claims.md from the runs that examples/paper_claims.sh makes.

    python examples/paper_claims_report.py RUNS_DIR [FIGURE_DIR]

RUNS_DIR holds dd/<setting>-<method>/deltas.json (finetune --record-deltas) and sweep/ (sweep --seeds).
Prints markdown: the ΔD–ΔM slopes with cluster-bootstrap 95% intervals per setting and view, then the
accuracy-vs-rank summary; with FIGURE_DIR also writes small PNGs there.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dorakit.analysis import DeltaRecord, plot_deltas, read_json
from dorakit.analysis.slopes import normalize, select_steps, slope_table
from dorakit.commands.sweep_seeds import read_seed_sweeps, write_seed_summary

METHODS = {"full": "ft", "lora": "lora", "dora": "dora"}
SETTINGS = {"base": "lr 1e-4 (FT) / 2e-3, 120 steps, all linear", "lowlr": "lr 2e-5 / 5e-4, 120 steps",
            "qv": "adapters on query + value only, 120 steps", "long": "lr 1e-4 / 2e-3, 200 steps"}
VIEWS = [("pooled, all steps", "pooled", "none", 0, True), ("pooled, 4 ckpts (paper)", "pooled", "none", 4, True),
         ("pooled, 4 ckpts, per-layer norm.", "pooled", "layer", 4, True),
         ("pooled, 4 ckpts, per-step norm.", "pooled", "step", 4, True),
         ("per-checkpoint, last ckpt", "per-checkpoint", "none", 4, True),
         ("per-step norm., all 6 module types", "pooled", "step", 4, False)]


def load(runs: Path, setting: str) -> list[DeltaRecord]:
    records = []
    for folder, label in METHODS.items():
        path = runs / "dd" / f"{setting}-{folder}" / "deltas.json"
        if path.is_file():
            records += read_json(path)
    return records


def cell(row: dict[str, object] | None) -> str:
    if row is None:
        return "–"
    mark = "**" if row["low"] > 0 or row["high"] < 0 else ""          # type: ignore[operator]
    return f"{mark}{row['slope']:+.3g}{mark} [{row['low']:+.2g}, {row['high']:+.2g}]"


def delta_tables(runs: Path) -> None:
    print("| setting | view | FT | LoRA | DoRA |\n|---|---|---|---|---|")
    for setting, label in SETTINGS.items():
        records = load(runs, setting)
        if not records:
            continue
        for name, view, norm, k, query_only in VIEWS:
            mine = [r for r in records if (r.module_type == "query" if query_only else r.layer is not None)]
            mine = normalize(select_steps(mine, k), norm)              # type: ignore[arg-type]
            table = slope_table(mine, view, n_boot=2000)
            if view == "per-checkpoint":
                last = max(r["step"] for r in table)                   # type: ignore[type-var]
                table = [r for r in table if r["step"] == last]
                name = f"{name} (step {last})"
            by = {r["method"]: r for r in table}
            print(f"| {setting}: {label} | {name} | " + " | ".join(cell(by.get(m)) for m in METHODS.values()) + " |")


def figures(runs: Path, figs: Path) -> None:
    for setting in ("base", "long"):
        records = [r for r in load(runs, setting) if r.module_type == "query"]
        plot_deltas(select_steps(records, 4), figs / f"paper-claims-{setting}.png", dpi=60,
                    title=f"query, 4 checkpoints, {SETTINGS[setting]}")
        plot_deltas(normalize(select_steps(records, 4), "step"), figs / f"paper-claims-{setting}-stepnorm.png",
                    dpi=60, title=f"query, 4 checkpoints, {SETTINGS[setting]}; ΔM, ΔD ÷ their mean over layers per step")


def main(argv: list[str]) -> int:
    runs = Path(argv[0])
    delta_tables(runs)
    sweeps = read_seed_sweeps(runs / "sweep")
    if sweeps:
        write_seed_summary(runs / "sweep", sweeps)
        print("\n" + (runs / "sweep" / "sweep_seeds.md").read_text())
    if len(argv) > 1:
        figures(runs, Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
