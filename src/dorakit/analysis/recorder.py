"""A training callback that records the paper's ΔM / ΔD (Liu et al. 2024, §2.2, Fig. 2) every N steps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from ..adapters.layers import AdapterLayer
from .metrics import adapter_magnitude_direction, is_hf_conv1d, magnitude_direction, module_weight_2d
from .records import DeltaRecord, make_record, write_json


def _default_include(module: nn.Module) -> bool:
    """nn.Linear and transformers Conv1D: the projections the paper analyses."""
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


class DeltaRecorder:
    """``recorder(step, model)`` after each optimizer step; every ``every`` steps it appends DeltaRecords.

    Adapters (LoRA, DoRA, magnitude-only) are read from their factors, never forming W0 + sBA: per
    record, one float64 pass over each adapted W0 (its row norms and W0 Aᵀ, in chunks) and O(out·r²).

    Full fine-tuning has no W0 left in the model, so the recorder keeps a copy: pass the model before
    training as ``reference`` (or call ``snapshot(model)`` before the first step). It copies the weight
    of every selected plain module (not the frozen bases inside adapters): one extra copy of those
    weights in their own dtype, on their device (on the CPU with ``offload=True``; each record then
    moves them back, so it is slower).

    Args:
        every: record on steps that are multiples of ``every``.
        method: label stored in each record (default: the adapter's variant; "ft" for snapshotted weights).
        reference: the model before fine-tuning, to snapshot now (full fine-tuning).
        include: ``include(name, module)`` selects the plain modules to snapshot (default: every
            nn.Linear and transformers Conv1D; conv and embedding modules can be selected too).
        offload: keep the snapshot on the CPU.
    """

    def __init__(self, every: int, *, method: str | None = None, reference: nn.Module | None = None,
                 include: Callable[[str, nn.Module], bool] | None = None, offload: bool = False) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}.")
        self.every = every
        self.method = method
        self.include = include
        self.offload = offload
        self.records: list[DeltaRecord] = []
        self._w0: dict[str, Tensor] = {}   # module name -> W0 as (out, in), for full fine-tuning
        if reference is not None:
            self.snapshot(reference)

    @torch.no_grad()
    def snapshot(self, model: nn.Module) -> None:
        """Copy W0 of the selected plain modules of ``model`` (call before training)."""
        inside = {id(m.base_layer) for m in model.modules() if isinstance(m, AdapterLayer)}
        self._w0 = {}
        for name, module in model.named_modules():
            weight = module_weight_2d(module)
            if weight is None or isinstance(module, AdapterLayer) or id(module) in inside:
                continue
            if not (self.include(name, module) if self.include is not None else _default_include(module)):
                continue
            self._w0[name] = weight.detach().to("cpu" if self.offload else weight.device, copy=True)
        if not self._w0:
            raise ValueError("snapshot selected no module: no plain nn.Linear / Conv1D (or none that include "
                             "accepts) outside the adapters.")

    def __call__(self, step: int, model: nn.Module) -> None:
        """Record ΔM / ΔD of ``model`` if ``step`` is a multiple of ``every``."""
        if step % self.every == 0:
            self.records.extend(self.measure(model, step))

    def measure(self, model: nn.Module, step: int | None = None) -> list[DeltaRecord]:
        """ΔM / ΔD of every adapter and every snapshotted weight of ``model`` now (not stored)."""
        records = [make_record(name, adapter_magnitude_direction(module), step, self.method or module.variant)
                   for name, module in model.named_modules() if isinstance(module, AdapterLayer)]
        modules = dict(model.named_modules())
        for name, w0 in self._w0.items():
            if name not in modules:
                raise KeyError(f"the snapshot has {name!r}, which this model lacks; snapshot the model you train.")
            wt = module_weight_2d(modules[name])
            stats = magnitude_direction(w0.to(wt.device), wt)
            records.append(make_record(name, stats, step, self.method or "ft"))
        if not records:
            raise ValueError("nothing to record: the model has no dorakit adapters and no snapshot; for full "
                             "fine-tuning construct DeltaRecorder(every, reference=model) before training.")
        return records

    def save(self, path: str | Path) -> Path:
        """Write the records so far as JSON (read back with ``dorakit.analysis.read_json``)."""
        return write_json(self.records, path)
