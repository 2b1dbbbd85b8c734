"""A run directory's records: ``run.json`` (the settings a resume must match) and ``metrics.jsonl``
(one JSON line per logged step, trimmed back to the checkpoint on resume)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from .distributed import Dist, barrier
from ..formats.io import atomic_write_bytes


def check_identity(out_dir: Path, identity: Mapping[str, object], resume: bool, d: Dist) -> None:
    """A new run needs a fresh directory; a resumed run needs the same settings as the saved one.
    Every process checks; rank 0 writes run.json once all have."""
    run_file = out_dir / "run.json"
    if not resume:
        if run_file.exists():
            raise FileExistsError(f"{out_dir} already holds a run ({run_file.name}); pass --resume to continue it, "
                                  "or choose another output directory (nothing there is overwritten).")
        barrier(d)
        if d.main:
            out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(run_file, json.dumps(identity, indent=2, sort_keys=True, default=str).encode())
        barrier(d)
        return
    if not run_file.is_file():
        raise FileNotFoundError(f"{out_dir} holds no run to resume (no {run_file.name}); start it without --resume.")
    saved = flatten(json.loads(run_file.read_text()))
    current = flatten(json.loads(json.dumps(identity, sort_keys=True, default=str)))
    differ = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if differ:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differ[:4])
        hint = (" The global batch is batch size × grad accumulation × processes: with another number of processes, "
                "change --batch-size or --grad-accum to keep it." if "global_batch" in differ else "")
        raise ValueError(f"{out_dir} is a different run: {detail}.{hint} Resume with the saved settings, or start a "
                         "new run in another directory.")


def flatten(record: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    """Nested settings as one level with dotted keys ("train.lr"), so a mismatch names the setting."""
    flat: dict[str, object] = {}
    for key, value in record.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def logged_records(path: Path, step: int) -> list[dict[str, object]]:
    """The metrics.jsonl records of one step, in order."""
    if not path.is_file():
        return []
    records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return [r for r in records if r.get("step") == step]


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint's step (those steps run again) and, of lines for
    the same step and the same fields (left by two processes that once wrote one directory), keep the
    last. Rewritten atomically; a file that needs no change is not rewritten."""
    if not path.is_file():
        return
    text = path.read_text()
    kept: dict[tuple[object, ...], str] = {}
    for line in text.splitlines():
        if line.strip() and json.loads(line)["step"] <= step:
            record = json.loads(line)
            kept[(record["step"], *sorted(record.keys() - _VARYING))] = line  # the first one's place, the last text
    new = "".join(line + "\n" for line in kept.values())
    if new != text:
        atomic_write_bytes(path, new.encode())


_VARYING = {"tokens_per_s", "elapsed_s"}
"""Fields of a metrics line that are not part of what the line is (a loss line has them, an eval line not)."""
