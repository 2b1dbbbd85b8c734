"""Experiment trackers (dorakit.training.trackers): `dorakit finetune --report-to tensorboard,wandb` writes the
same numbers as metrics.jsonl, read back from TensorBoard's event files and wandb's offline run files, step
by step, across a killed run and its resume; a missing library is a flag error naming `pip install`.

Everything runs on CPU with a tiny Llama and a word tokenizer built here; wandb runs offline
(WANDB_MODE=offline) with its files in tmp_path, so nothing touches the network.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fixtures_text import prompt_words, save_word_llama, write_json

import dorakit.training.train as train_mod
from dorakit.commands.cli import main
from dorakit.training import trackers
from dorakit.training.data import load_records

pytestmark = pytest.mark.filterwarnings("ignore:the tokenizer has no pad token")
RECORDS = [{"instruction": f"is the sky {c} today", "output": f"the answer is {a}"}
           for c, a in [("blue", "true"), ("green", "false"), ("grey", "true"), ("red", "false"), ("dark", "true")]]
needs_tb = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs tensorboard")
needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="needs wandb")


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny causal Llama + word tokenizer saved like a user's model directory, 5 training records."""

    root = tmp_path_factory.mktemp("trackers")
    train = write_json(root / "train.json", RECORDS)
    (root / "boolq").mkdir()  # the eval task is named by the folder
    evals = write_json(root / "boolq" / "test.json", [{"instruction": r["instruction"], "answer": r["output"].split()[-1]}
                                                      for r in RECORDS])
    model_dir = root / "tiny-llama"
    save_word_llama(model_dir, prompt_words(load_records(train)))
    return SimpleNamespace(root=root, dir=model_dir, train=train, evals=evals)


@pytest.fixture(autouse=True)
def wandb_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """wandb offline and quiet, its settings and cache in tmp_path: never the network or the user's files."""
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path),
                       "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-cfg"),
                       "WANDB_DATA_DIR": str(tmp_path / "wandb-data"), "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(key, value)


def _argv(lm: SimpleNamespace, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(lm.dir), "--data", str(lm.train), "--output-dir", str(out), "--method", "dora",
            "--rank", "2", "--max-steps", "4", "--batch-size", "2", "--lr", "1e-2", "--save-every", "2",
            "--record-deltas", "1", "--eval-data", str(lm.evals), "--eval-every", "2", "--eval-limit", "2",
            "--device", "cpu", *extra]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _expected(out: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as tag -> {step: value}, the tags the trackers use."""
    table: dict[str, dict[int, float]] = {}
    for record in _metrics(out):
        for name, value in trackers.scalars(record).items():
            table.setdefault(name, {})[record["step"]] = value
    return table


def _tensorboard(out: Path) -> dict[str, dict[int, float]]:
    """Every scalar of <out>/tensorboard as tag -> {step: value}, read by TensorBoard's own reader (which
    applies purge_step: events past a resumed checkpoint are dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    table = {name: {e.step: e.value for e in acc.Scalars(name)} for name in acc.Tags()["scalars"]}
    assert all(len(acc.Scalars(name)) == len(steps) for name, steps in table.items())  # one value per step
    return table


def _as_float32(table: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    """Event files store float32: the values metrics.jsonl holds, rounded to float32 (exact, no tolerance)."""
    return {name: {s: float(torch.tensor(v, dtype=torch.float32)) for s, v in steps.items()}
            for name, steps in table.items()}


def _wandb_records(path: Path):  # noqa: ANN202
    """The protobuf records of a wandb run file (LevelDB log format: 32 KiB blocks, a 7-byte header per chunk)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunk = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def _wandb_history(out: Path) -> tuple[set[str], dict[str, dict[int, float]]]:
    """(run ids, tag -> {step: value}) of every offline wandb run in <out>/wandb, in run order (a later
    run's value for a step replaces an earlier one's, as a resumed run's rewrite does)."""
    ids, table = set(), {}
    for run_file in sorted((out / "wandb").glob("offline-run-*/run-*.wandb"), key=lambda p: p.parent.name):
        for record in _wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                for name, value in items.items():
                    if not name.startswith("_"):
                        table.setdefault(name, {})[items["_step"]] = value
    return ids, table


@needs_tb
@needs_wandb
def test_trackers_hold_the_numbers_of_metrics_jsonl(lm: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(_argv(lm, out, "--report-to", "jsonl,tensorboard,wandb")) == 0
    expected = _expected(out)
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/accuracy", "deltas/m_mean",
            "deltas/d_mean", "deltas/slope", "deltas/r"} <= expected.keys()
    assert expected["train/loss"].keys() == {1, 2, 3, 4} and expected["eval/accuracy"].keys() == {2, 4}
    assert expected["deltas/m_mean"].keys() == {1, 2, 3, 4}
    assert all(v > 0 for v in expected["train/grad_norm"].values())
    assert _tensorboard(out) == _as_float32(expected)
    ids, history = _wandb_history(out)
    assert ids == {(out / trackers.WANDB_ID_FILE).read_text()} and history == expected


@needs_tb
@needs_wandb
def test_resume_continues_the_same_tracker_runs_without_the_repeated_steps(lm: SimpleNamespace, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    out, argv = tmp_path / "run", [*_argv(lm, tmp_path / "run"), "--report-to", "tensorboard", "wandb"]
    real = train_mod._log

    def log_then_kill(path: Path, record: dict) -> None:
        real(path, record)
        if record.get("step") == 3 and "delta_m_mean" in record:  # after step 3's loss line reached the trackers
            raise RuntimeError("killed after logging step 3")  # past the checkpoint of step 2
    monkeypatch.setattr(train_mod, "_log", log_then_kill)
    with pytest.raises(RuntimeError, match="killed"):
        main(argv)
    monkeypatch.undo()
    assert max(_tensorboard(out)["train/loss"]) == 3  # step 3 reached the event file before the kill
    run_id = (out / trackers.WANDB_ID_FILE).read_text()
    assert main([*argv, "--resume"]) == 0
    expected = _expected(out)
    assert expected["train/loss"].keys() == {1, 2, 3, 4}  # metrics.jsonl: step 3 once (its rerun)
    assert _tensorboard(out) == _as_float32(expected)  # purge_step dropped the killed run's step 3
    ids, history = _wandb_history(out)
    assert ids == {run_id} and history == expected
    assert len(list((out / "wandb").glob("offline-run-*"))) == 2  # two offline pieces of one run id


def test_report_to_defaults_to_jsonl_only(lm: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main([*_argv(lm, out), "--max-steps", "1"]) == 0
    assert (out / "metrics.jsonl").is_file() and not (out / "tensorboard").exists() and not (out / "wandb").exists()
    assert "train/grad_norm" in _expected(out)


@pytest.mark.parametrize("value, needle", [("tensorbored", "'tensorbored' is not a tracker"),
                                           ("jsonl,mlflow", "'mlflow' is not a tracker")])
def test_unknown_tracker_is_a_flag_error(lm: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture,
                                         value: str, needle: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*_argv(lm, tmp_path / "run"), "--report-to", value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_missing_library_names_pip_install_at_parse_time(lm: SimpleNamespace, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda pkg, *a: None if pkg == name else real(pkg, *a))
    with pytest.raises(SystemExit) as exit_info:
        main([*_argv(lm, tmp_path / "run"), "--report-to", f"jsonl,{name}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"pip install {name}" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_tags_and_delta_summary() -> None:
    from dorakit.analysis import DeltaRecord, fit_line

    assert [trackers.tag(k) for k in ("loss", "eval_accuracy", "delta_m_mean")] == \
        ["train/loss", "eval/accuracy", "deltas/m_mean"]
    assert trackers.scalars({"step": 3, "loss": 1.5, "flag": True, "name": "x"}) == {"train/loss": 1.5}
    records = [DeltaRecord(f"layers.{i}.q_proj", i, "q_proj", m, d) for i, (m, d) in
               enumerate([(0.1, 0.3), (0.2, 0.1), (0.4, 0.05)])]
    fit = fit_line([r.delta_d for r in records], [r.delta_m for r in records])
    summary = trackers.delta_summary(records)
    assert summary["delta_slope"] == fit.slope < 0 and summary["delta_r"] == fit.r
    assert summary["delta_m_mean"] == pytest.approx(0.7 / 3, rel=1e-15)
    assert trackers.delta_summary(records[:1]).keys() == {"delta_m_mean", "delta_d_mean"}  # no line through 1 point
