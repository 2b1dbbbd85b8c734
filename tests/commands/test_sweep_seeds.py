"""dorakit sweep --seeds: per-rank intervals and DoRA − LoRA paired comparisons over seeds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from fixtures_text import boolq_llama, shared_task_file

from dorakit.analysis.stats import t_quantile
from dorakit.commands.cli import main
from dorakit.commands.sweep_seeds import read_seed_sweeps, seed_summary, write_seed_summary


def _by_seed(shift: float, seeds: int = 5) -> dict[int, list[dict[str, object]]]:
    rng = np.random.default_rng(0)
    out = {}
    for seed in range(seeds):
        base = {r: 70 + r / 4 + rng.normal() for r in (2, 4, 8)}   # a seed effect shared by both methods
        out[seed] = ([{"method": "lora", "rank": r, "accuracy": base[r]} for r in (2, 4, 8)]
                     + [{"method": "dora", "rank": r, "accuracy": base[r] + shift + 0.1 * rng.normal()}
                        for r in (2, 4, 8)])
    return out


def test_summary_intervals_match_numpy() -> None:
    by_seed = _by_seed(0.0)
    summary, _ = seed_summary(by_seed)
    row = next(r for r in summary if r["method"] == "lora" and r["rank"] == 4)
    acc = np.array([next(x["accuracy"] for x in rows if x["method"] == "lora" and x["rank"] == 4)
                    for rows in by_seed.values()], np.float64)
    half = t_quantile(0.975, 4) * acc.std(ddof=1) / math.sqrt(5)
    np.testing.assert_allclose([row["mean"], row["low"], row["high"]], [acc.mean(), acc.mean() - half,
                                                                         acc.mean() + half])
    assert row["seeds"] == 5


def test_paired_comparisons_detect_a_shift_and_not_its_absence() -> None:
    _, shifted = seed_summary(_by_seed(1.0))
    names = [c["comparison"] for c in shifted]
    assert names == ["DoRA r=2 − LoRA r=2", "DoRA r=4 − LoRA r=4", "DoRA† r=2 − LoRA r=4",
                     "DoRA r=8 − LoRA r=8", "DoRA† r=4 − LoRA r=8"]
    same_rank = [c for c in shifted if c["comparison"].startswith("DoRA r")]
    assert all(c["significant"] and c["low"] > 0 for c in same_rank)
    _, null = seed_summary(_by_seed(0.0))                     # negative control: no shift
    assert sum(c["significant"] for c in null if c["comparison"].startswith("DoRA r")) <= 1


def test_write_and_read_back(tmp_path: Path) -> None:
    for seed, rows in _by_seed(0.5, seeds=3).items():
        (tmp_path / f"seed{seed}").mkdir()
        (tmp_path / f"seed{seed}" / "sweep.json").write_text(json.dumps(rows))
    (tmp_path / "seedx").mkdir()
    assert sorted(read_seed_sweeps(tmp_path)) == [0, 1, 2]
    summary, comparisons = write_seed_summary(tmp_path, read_seed_sweeps(tmp_path))
    assert "DoRA† r=4 − LoRA r=8" in (tmp_path / "sweep_seeds.md").read_text()
    assert json.loads((tmp_path / "sweep_seeds.json").read_text())["summary"][0]["seeds"] == 3


def test_sweep_cli_with_seeds(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model_dir, _ = boolq_llama(tmp_path)
    out = tmp_path / "sweep"
    assert main(["sweep", "--model", str(model_dir), "--data", str(tmp_path / "train.json"), "--eval-data",
                 str(shared_task_file("boolq")), "--eval-limit", "4", "--ranks", "2", "4", "--max-steps", "1",
                 "--batch-size", "2", "--output-dir", str(out), "--device", "cpu", "--seeds", "3", "5"]) == 0
    assert sorted(read_seed_sweeps(out)) == [3, 5]
    assert json.loads((out / "seed5" / "dora-r2" / "run.json").read_text())["train"]["seed"] == 5
    assert "DoRA† r=2 − LoRA r=4" in capsys.readouterr().out


ROOT = Path(__file__).resolve().parents[2]


def test_shipped_paper_claims_config_parses() -> None:
    """examples/paper_claims_sweep.yaml: every key is a sweep flag and its values parse."""
    from dorakit.commands.parser import parse_args

    args = parse_args(["sweep", "--config", str(ROOT / "examples" / "paper_claims_sweep.yaml"), "--model", "m",
                       "--data", "d", "--eval-data", "e", "--output-dir", "o"])
    assert (args.methods, args.ranks, args.seeds, args.alpha_per_rank) == (["lora", "dora"], [2, 4, 8, 16, 32],
                                                                           [0, 1, 2, 3, 4], 2.0)
    assert (args.task, args.max_steps, args.lr, args.device) == ("classify", 60, 2e-3, "cpu")


def test_paper_claims_report_runs_on_recorded_deltas(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """examples/paper_claims_report.py over synthetic runs: one table row per (setting, view), the sweep summary."""
    import runpy

    from dorakit.analysis import DeltaRecord, write_json

    for folder, label in (("full", "ft"), ("lora", "lora"), ("dora", "dora")):
        records = [DeltaRecord(f"encoder.layer.{layer}.attention.self.{kind}", layer, kind,
                               step * (1 + 0.1 * layer + 0.01 * (kind == "key")), step * (2 - 0.1 * layer), step,
                               label) for step in (10, 20, 30, 40) for layer in range(3) for kind in ("query", "key")]
        (tmp_path / "dd" / f"base-{folder}").mkdir(parents=True)
        write_json(records, tmp_path / "dd" / f"base-{folder}" / "deltas.json")
    for seed, rows in _by_seed(0.5, seeds=2).items():
        (tmp_path / "sweep" / f"seed{seed}").mkdir(parents=True)
        (tmp_path / "sweep" / f"seed{seed}" / "sweep.json").write_text(json.dumps(rows))
    module = runpy.run_path(str(ROOT / "examples" / "paper_claims_report.py"))
    assert module["main"]([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("| base:") == 6 and "DoRA† r=2 − LoRA r=4" in out
