"""Training checkpoints: trainable tensors and optimizer state, RNG states, data position.

One format for one process and for many. The trainable tensors and AdamW's state are written with
``torch.distributed.checkpoint`` (DCP) under the model's own parameter names (no DDP / FSDP
prefixes), each process writing its FSDP shards, so a checkpoint saved by N processes resumes on
M (DCP reshards on load) and under another strategy. Frozen weights are not written: they come
from the base model. Every process's RNG state is kept (``rng-<rank>.pt``) for an exact resume on
the same number of processes.

Layout of ``<out>/checkpoints/step-XXXXXXX``: ``.metadata`` + ``*.distcp`` (DCP), ``state.json``
(step, world size, data position, loss scale), ``rng-<rank>.pt``. A checkpoint is written into a
temporary directory and renamed into place; ``latest`` then names it.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from .distributed import ONE_PROCESS, Dist, barrier, unwrap
from ..formats.io import atomic_write_bytes

LATEST = "latest"
"""File in ``<out>/checkpoints`` naming the newest complete checkpoint."""
MODEL, OPTIM = "model", "optim"


class CheckpointError(ValueError):
    """A checkpoint that does not belong to this run (other model or adapters) or is damaged."""


def rng_state() -> dict[str, object]:
    state: dict[str, object] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, object]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    """{"model": trainable tensors by name, "optim": AdamW state by name}, as DCP saves and loads them
    (collective under FSDP; for a fresh optimizer, its state is first created with a zero step)."""
    with _one_process_is_fine(), _no_quant_state(model):
        model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {MODEL: model_sd, OPTIM: optim_sd}


def _quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every bitsandbytes Linear4bit / Linear8bitLt of the model."""
    from ..adapters.quant import is_linear4bit, is_linear8bit

    return [(n, m) for n, m in unwrap(model).named_modules() if is_linear4bit(m) or is_linear8bit(m)]


@contextmanager
def _no_quant_state(model: nn.Module) -> Iterator[None]:
    """Within the block, bitsandbytes' layers give state_dict() their parameters only.

    They add their frozen quant state as extra entries (Linear4bit: "<name>.weight.absmax", ...;
    Linear8bitLt: "<name>.SCB", "<name>.weight_format"), which ignore_frozen_params keeps (they are not
    parameters) and DCP cannot resolve to a module attribute (the 8-bit ones). It is base data, like the
    packed weight: a checkpoint holds trainable tensors only, so one process and FSDP2 (whose sharded
    4-bit weight carries no quant state) write the same keys."""
    def parameters_only(module: nn.Module, state_dict: dict, prefix: str, _: object) -> None:
        keep = {prefix + name for name, _ in module.named_parameters(recurse=False)}
        for key in [k for k in state_dict if k.startswith(prefix) and k not in keep]:
            del state_dict[key]

    handles = [m.register_state_dict_post_hook(parameters_only) for _, m in _quantized_modules(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _one_process_is_fine() -> Iterator[None]:
    """DCP warns that it runs 'in a single process' whenever no process group exists: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


@contextmanager
def _plain_errors() -> Iterator[None]:
    """DCP wraps a writer's error (a full disk) in CheckpointException, a BaseException: raise the original."""
    try:
        yield
    except dcp.CheckpointException as e:
        original = next(iter(e.failures.values()), (None, None))[0]  # rank -> (exception, traceback)
        if isinstance(original, Exception):
            raise original from e
        raise


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    batches: Mapping[str, int | bool], rng: Mapping[str, object], extra: Mapping[str, object],
                    d: Dist = ONE_PROCESS) -> Path:
    """Collective: write ``<out>/checkpoints/step-XXXXXXX`` (see the module docstring) and point
    ``latest`` at it. ``rng`` is this process's RNG state at the step boundary."""
    root = out_dir / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f".{final.name}.partial"
    if d.main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        tmp.mkdir()
    barrier(d)
    try:
        with _one_process_is_fine(), _plain_errors():
            dcp.save(_state_dicts(model, optimizer), checkpoint_id=tmp)
        buffer = io.BytesIO()  # written by Python, so a full disk is an OSError (ENOSPC), not torch's RuntimeError
        torch.save(dict(rng), buffer)
        (tmp / f"rng-{d.rank}.pt").write_bytes(buffer.getvalue())
        if d.main:
            state = {"step": step, "world_size": d.world_size, "batches": dict(batches), **extra}
            (tmp / "state.json").write_text(json.dumps(state, indent=2))
        barrier(d)
        if d.main:
            if final.exists():  # the same step written again (a resumed run's Ctrl-C): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_bytes(root / LATEST, final.name.encode())
    except BaseException:
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier(d)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    pointer = out_dir / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = out_dir / "checkpoints" / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is missing or incomplete; the run directory "
                                "was edited. Point 'latest' at a complete step-* directory.")
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path} is not in this dorakit's checkpoint format (no DCP .metadata; an older "
                              "dorakit wrote trainable.safetensors). Resume it with that version, or start a new run.")
    return path


def _tensor_meta(path: Path) -> dict[str, TensorStorageMetadata]:
    meta = dcp.FileSystemReader(path).read_metadata()
    return {k: v for k, v in meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def _check_model_tensors(path: Path, saved: Mapping[str, torch.Size], model_sd: Mapping[str, Tensor]) -> None:
    """The checkpoint holds exactly the model's trainable tensors, each of its (global) shape."""
    stored = {k[len(MODEL) + 1:]: size for k, size in saved.items() if k.startswith(MODEL + ".")}
    if set(stored) != set(model_sd):
        only_ckpt, only_model = sorted(set(stored) - set(model_sd)), sorted(set(model_sd) - set(stored))
        raise CheckpointError(f"{path}: the checkpoint's trainable tensors differ from the model's (only in the "
                              f"checkpoint: {only_ckpt[:3]}, only in the model: {only_model[:3]}); it is from "
                              "another model or adapter config. Resume with the run's settings, or start a new run.")
    for name, tensor in model_sd.items():
        if tuple(stored[name]) != tuple(tensor.shape):
            raise CheckpointError(f"{path}: {name} is {tuple(stored[name])} in the checkpoint but "
                                  f"{tuple(tensor.shape)} in the model; it is from another model or adapter config.")


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, d: Dist = ONE_PROCESS) -> dict:
    """Collective: restore trainable tensors and the optimizer from ``path`` (resharded to this run's
    processes); returns state.json, with "rng" = this process's saved RNG state when the checkpoint
    was written by as many processes as this run has, else None. Checks everything before loading."""
    quant = tuple(f"{MODEL}.{name}.weight." for name, _ in _quantized_modules(model))  # a 4-bit quant state that
    saved = {k: m.size for k, m in _tensor_meta(path).items() if not k.startswith(quant)}  # older runs wrote
    states = _state_dicts(model, optimizer)
    _check_model_tensors(path, saved, states[MODEL])
    with _one_process_is_fine():
        dcp.load(states, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=states[MODEL], optim_state_dict=states[OPTIM],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    state = json.loads((path / "state.json").read_text())
    same = int(state.get("world_size", 1)) == d.world_size
    state["rng"] = torch.load(path / f"rng-{d.rank}.pt", weights_only=True) if same else None
    return state


def read_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor of a checkpoint, whole and on the CPU, under DCP's flat names ("model.<param>",
    "optim.state.<param>.exp_avg", ...), in one process whatever number of processes wrote it."""
    tensors = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in _tensor_meta(Path(path)).items()}
    with _one_process_is_fine():
        dcp.load(tensors, checkpoint_id=path)
    return tensors


# ---- the run directory: one writer, bounded checkpoints, no stale temporaries ----------------------

LOCK_NAME = ".dorakit.lock"
"""File in a run directory that the writing process holds an exclusive flock on (and names its PID in)."""
_STEP_DIR = re.compile(r"step-(\d{7})")
_PARTIAL_DIR = re.compile(r"\.step-\d{7}\.partial")
_TEMP_FILE = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")  # io._write_temp: mkstemp(prefix=".<name>.", suffix=".tmp")
_HELD: dict[str, tuple[int, int]] = {}  # real path of a run directory -> (lock fd, nesting depth), this process


class RunDirBusyError(RuntimeError):
    """Another process is writing to the run directory (it holds the directory's lock)."""


def _holder(lock: Path) -> str:
    try:
        pid = lock.read_text().strip()
    except OSError:
        pid = ""
    return f"PID {pid}" if pid.isdigit() else "a process that has not written its PID yet"


def _lock(out_dir: Path) -> int:
    """An open fd of ``<out>/.dorakit.lock`` holding an exclusive flock, with this PID written in it."""
    lock = out_dir / LOCK_NAME
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirBusyError(f"{out_dir} is in use by another dorakit process ({_holder(lock)}): one run "
                                  "directory has one writer. Wait for it to finish (or stop it), then --resume; or "
                                  "choose another --output-dir.") from None
        try:  # the holder before us may have deleted the file on release: then lock the new one
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


@contextmanager
def hold_run_dir(out_dir: str | os.PathLike, d: Dist = ONE_PROCESS) -> Iterator[None]:
    """Hold the run directory's exclusive lock (rank 0 only: it is the process that writes files) for
    the block; re-entrant within a process. ``out_dir`` must exist. On first entry, stale temporaries of
    dorakit's own atomic writes (left by a killed run) are removed. The lock file is deleted on release."""
    if not d.main:
        yield
        return
    key = os.path.realpath(out_dir)
    if key in _HELD:
        fd, depth = _HELD[key]
        _HELD[key] = (fd, depth + 1)
    else:
        fd = _lock(Path(out_dir))
        _HELD[key] = (fd, 1)
        remove_stale_temporaries(Path(out_dir))
    try:
        yield
    finally:
        fd, depth = _HELD[key]
        if depth > 1:
            _HELD[key] = (fd, depth - 1)
        else:
            del _HELD[key]
            Path(out_dir, LOCK_NAME).unlink(missing_ok=True)  # before unlocking: a waiter re-checks the inode
            os.close(fd)


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Delete what an interrupted dorakit write leaves behind, and nothing else: ``checkpoints/.step-*.partial``
    directories and ``.<name>.XXXXXXXX.tmp`` files (io.atomic_write_bytes) in the run, checkpoint and final
    directories. Call it only while holding the run directory's lock."""
    removed = []
    for folder in (out_dir, out_dir / "checkpoints", out_dir / "final"):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.is_dir() and not entry.is_symlink() and folder.name == "checkpoints" \
                    and _PARTIAL_DIR.fullmatch(entry.name):
                shutil.rmtree(entry)
                removed.append(entry)
            elif entry.is_file() and not entry.is_symlink() and _TEMP_FILE.fullmatch(entry.name):
                entry.unlink()
                removed.append(entry)
    return removed


def prune_checkpoints(out_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints at or before the one ``latest`` names (that one
    is always kept); checkpoints after it (from a run resumed at an earlier step) are left for the run to
    rewrite. Returns what was deleted."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1 (the checkpoint `latest` names), got {keep}.")
    latest = latest_checkpoint(out_dir)
    if latest is None:
        return []
    newest = int(_STEP_DIR.fullmatch(latest.name).group(1)) if _STEP_DIR.fullmatch(latest.name) else None
    if newest is None:
        return []
    steps = sorted((int(m.group(1)), p) for p in (out_dir / "checkpoints").iterdir()
                   if p.is_dir() and not p.is_symlink() and (m := _STEP_DIR.fullmatch(p.name)))
    older = [p for s, p in steps if s < newest]
    doomed = older[:max(0, len(older) - (keep - 1))]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


@contextmanager
def claim_run_dir(out_dir: str | os.PathLike, resume: bool, d: Dist = ONE_PROCESS) -> Iterator[None]:
    """hold_run_dir around a run: a new run (``resume=False``) creates ``out_dir`` and removes it again if
    it is left empty; a resumed run locks an existing directory (a missing one is left missing, for the
    caller's "no run to resume" error). Re-entrant, so the recipe and train() may both claim."""
    out = Path(out_dir)
    if not d.main or (resume and not out.is_dir()):
        yield
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with hold_run_dir(out, d):
            yield
    finally:
        if created:
            with suppress(OSError):
                out.rmdir()  # only if empty: a run that failed before writing anything leaves nothing
