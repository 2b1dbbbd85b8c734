"""Experiment trackers: where a run's metrics go besides ``<out>/metrics.jsonl``.

The training loop writes each metrics record (``{"step": 3, "loss": ..., "lr": ...}``) to
metrics.jsonl and hands the same record to every tracker here: TensorBoard event files through
``torch.utils.tensorboard.SummaryWriter`` in ``<out>/tensorboard``, and Weights & Biases through
``wandb.init`` in ``<out>/wandb`` (mode, project and entity from wandb's own settings: WANDB_MODE,
WANDB_PROJECT, ...). Only the reporting process (rank 0) opens trackers.

A resumed run continues the same tracker run: TensorBoard writes into the same log directory with
``purge_step`` one past the checkpoint's step, so events logged after the checkpoint (those steps run
again) are dropped by readers, as metrics.jsonl drops their lines; wandb resumes the run whose id is
stored in ``<out>/wandb-run-id``.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, Self

REPORT_TO = ("jsonl", "tensorboard", "wandb")
"""What ``--report-to`` takes; metrics.jsonl ("jsonl") is always written (a resume reads it back)."""
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
"""The package each tracker needs (``pip install <name>``)."""
WANDB_ID_FILE = "wandb-run-id"
TENSORBOARD_DIR = "tensorboard"


class TrackerError(ValueError):
    """A tracker that cannot be used (the message names the fix)."""


def check_report_to(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` checked: each one known, and its library installed (found without importing it). Light:
    the CLI's parser calls it (neither torch nor the trackers are imported)."""
    names = names.split(",") if isinstance(names, str) else names
    for name in names:
        if name not in REPORT_TO:
            raise TrackerError(f"--report-to {name!r} is not a tracker; use a comma-separated list of {REPORT_TO}.")
        package = PACKAGES.get(name)
        if package is not None and importlib.util.find_spec(package) is None:
            raise TrackerError(f"--report-to {name} needs the {package} package, which is not installed: "
                               f"pip install {package}")
    return tuple(dict.fromkeys(names))


def tag(key: str) -> str:
    """A metrics.jsonl key as a tracker's tag: ``eval_accuracy`` -> ``eval/accuracy``, ``delta_m_mean`` ->
    ``deltas/m_mean``, anything else under ``train/`` (``train/loss``)."""
    for prefix, group in (("eval_", "eval"), ("delta_", "deltas")):
        if key.startswith(prefix):
            return f"{group}/{key.removeprefix(prefix)}"
    return f"train/{key}"


def scalars(record: Mapping[str, object]) -> dict[str, float]:
    """The record's numbers by tag (``step`` is the x axis, not a scalar)."""
    return {tag(k): float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker(Protocol):
    """A sink for metrics records: ``log`` is called on rank 0 with every record metrics.jsonl gets."""

    def log(self, step: int, values: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """Scalars into ``<out>/tensorboard`` (event files, read by ``tensorboard --logdir``)."""

    def __init__(self, out: Path, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # readers drop events at steps >= purge_step that an earlier file holds: those past the checkpoint
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR), purge_step=purge)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()  # a killed run keeps what it logged

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A wandb run in ``<out>/wandb``; its id is kept in ``<out>/wandb-run-id`` so a resume continues it."""

    def __init__(self, out: Path, resume_step: int | None, config: Mapping[str, object]) -> None:
        import wandb

        from ..formats.io import atomic_write_bytes

        id_file = out / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resume_step is not None and id_file.is_file() else None
        self.run = wandb.init(id=run_id, resume="allow" if run_id else None, dir=str(out), name=out.resolve().name,
                              config=dict(config))
        if run_id is None:  # a new run (or one resumed that had no wandb run): its id for the next resume
            atomic_write_bytes(id_file, self.run.id.encode())

    def log(self, step: int, values: Mapping[str, float]) -> None:
        if step < self.run.step:  # an online run resumed past the checkpoint: those steps are logged already
            return  # (with the same losses: a resume repeats them exactly)
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers of one run, fed together; a context manager that closes them."""

    def __init__(self, names: Sequence[str] = (), main: bool = True, config: Mapping[str, object] | None = None) -> None:
        """``names`` from REPORT_TO (checked now); ``main``: whether this process reports (else none opens);
        ``config``: the run's settings, stored with a wandb run."""
        self.names = check_report_to(names) if main else ()
        self.config = dict(config or {})
        self.open: list[Tracker] = []

    def start(self, out: Path, resume_step: int | None) -> None:
        """Open the trackers once the run's first step is known (``resume_step``: None for a new run)."""
        if "tensorboard" in self.names:
            self.open.append(TensorBoardTracker(out, resume_step))
        if "wandb" in self.names:
            self.open.append(WandbTracker(out, resume_step, self.config))

    def log(self, record: Mapping[str, Any]) -> None:
        values = scalars(record)
        if values:
            for tracker in self.open:
                tracker.log(int(record["step"]), values)

    def close(self) -> None:
        while self.open:
            self.open.pop().close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def delta_summary(records: Sequence[Any]) -> dict[str, float]:
    """One step's ΔM / ΔD records (dorakit.analysis.DeltaRecord) as metrics: their means over the weights
    and the paper's Fig. 2 statistic, the least-squares slope of ΔM on ΔD and Pearson's r (§2.2);
    the slope and r only where they are defined (two weights or more, with spread)."""
    from ..analysis import fit_line

    if not records:
        return {}
    fit = fit_line([r.delta_d for r in records], [r.delta_m for r in records])
    summary = {"delta_m_mean": math.fsum(r.delta_m for r in records) / len(records),
               "delta_d_mean": math.fsum(r.delta_d for r in records) / len(records),
               "delta_slope": fit.slope, "delta_r": fit.r}
    return {k: v for k, v in summary.items() if math.isfinite(v)}
