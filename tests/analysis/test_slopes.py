"""Pooled vs per-checkpoint ΔD–ΔM slopes, normalisation and step selection."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dorakit.analysis import DeltaRecord, write_json
from dorakit.analysis.slopes import normalize, select_steps, slope_table
from dorakit.commands.cli import main


def _growth_records(method: str = "dora") -> list[DeltaRecord]:
    """Within each step ΔM falls with ΔD across layers (slope −1 before scaling); both grow with the step.

    Pooled over steps the common growth dominates (positive slope); per checkpoint the slope is negative:
    the situation the per-checkpoint view and the "step" normalisation exist for.
    """
    records = []
    for step in (10, 20, 30, 40):
        g = step / 10
        for layer in range(6):
            dd = g * (1.0 + 0.1 * layer)
            dm = g * (2.0 - 0.1 * layer)
            records.append(DeltaRecord(f"encoder.layer.{layer}.attention.self.query", layer, "query", dm, dd,
                                       step, method))
    return records


def test_pooled_positive_but_every_checkpoint_negative() -> None:
    records = _growth_records()
    pooled = slope_table(records, "pooled", n_boot=200)
    assert pooled[0]["slope"] > 0 and pooled[0]["n"] == 24
    per_step = slope_table(records, "per-checkpoint", n_boot=200)
    assert [row["step"] for row in per_step] == [10, 20, 30, 40]
    for row in per_step:
        assert row["slope"] == pytest.approx(-1.0) and row["low"] == pytest.approx(-1.0)


def test_step_normalisation_removes_common_growth() -> None:
    records = normalize(_growth_records(), "step")
    for step in (10, 20, 30, 40):
        mine = [r for r in records if r.step == step]
        assert math.fsum(r.delta_m for r in mine) / len(mine) == pytest.approx(1.0)
        assert math.fsum(r.delta_d for r in mine) / len(mine) == pytest.approx(1.0)
    assert slope_table(records, "pooled", n_boot=0)[0]["slope"] < 0


def test_layer_normalisation_means_one_per_module() -> None:
    records = normalize(_growth_records(), "layer")
    for layer in range(6):
        mine = [r for r in records if r.layer == layer]
        assert math.fsum(r.delta_d for r in mine) / 4 == pytest.approx(1.0)
    assert normalize(_growth_records(), "none") == _growth_records()
    with pytest.raises(ValueError, match="normalize"):
        normalize(_growth_records(), "global")  # type: ignore[arg-type]


def test_select_steps_evenly_spaced_and_last_kept() -> None:
    records = _growth_records()
    assert sorted({r.step for r in select_steps(records, 2)}) == [20, 40]
    assert select_steps(records, 0) == records and select_steps(records, 9) == records
    with pytest.raises(ValueError, match=">= 0"):
        select_steps(records, -1)


def test_analyze_cli_per_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_json(_growth_records("dora") + _growth_records("lora"), tmp_path / "deltas.json")
    code = main(["analyze", "--runs", str(tmp_path / "deltas.json"), "--output-dir", str(tmp_path / "a"),
                 "--view", "per-checkpoint", "--checkpoints", "2", "--bootstrap", "100"])
    assert code == 0
    table = json.loads((tmp_path / "a" / "checkpoint_fits.json").read_text())
    assert {(row["method"], row["step"]) for row in table} == {(m, s) for m in ("dora", "lora") for s in (20, 40)}
    fits = json.loads((tmp_path / "a" / "fits.json").read_text())
    assert fits["dora"]["low"] <= fits["dora"]["slope"] <= fits["dora"]["high"]
    assert "dora step 40: slope -1" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [["--view", "layers"], ["--normalize", "x"], ["--bootstrap", "-1"]])
def test_analyze_bad_flags_exit_2(tmp_path: Path, flags: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--runs", str(tmp_path), "--output-dir", str(tmp_path / "a"), *flags])
    assert e.value.code == 2
