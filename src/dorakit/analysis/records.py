"""ΔM / ΔD per module (Liu et al. 2024, §2.2): from live adapters, from state dicts, over checkpoints.

Every entry point returns a flat list of ``DeltaRecord`` (one per weight, optionally per step), which
``to_rows`` turns into plain dicts for CSV / JSON and ``plot.plot_deltas`` draws as the paper's Fig. 2.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from torch import Tensor, nn

from ..adapters.layers import AdapterLayer, AdapterStateError
from .metrics import (
    RowStats,
    adapter_magnitude_direction,
    adapter_tensor_stats,
    is_transposed,
    magnitude_direction,
)

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?=\.|$)")
_ADAPTER_KEYS = ("lora_A", "lora_B", "magnitude")


@dataclass(frozen=True)
class DeltaRecord:
    """ΔM and ΔD of one weight (at one step)."""

    name: str
    """Dotted module name, e.g. ``model.layers.3.self_attn.q_proj``."""
    layer: int | None
    """Block index parsed from the name (``layers.3.``, ``layer.3.``, ``h.3.``, ``blocks.3.``), or None."""
    module_type: str
    """Last name component, e.g. ``q_proj``."""
    delta_m: float
    delta_d: float
    step: int | None = None
    method: str | None = None
    """A label such as "ft", "lora", "dora", "magnitude"."""
    rows: int = 0
    zero_rows: int = 0
    """Rows left out of ΔD because they are zero in W0 or Wt."""


def layer_index(name: str) -> int | None:
    """The block index in a dotted module name (the innermost one), or None."""
    found = _LAYER.findall(name)
    return int(found[-1]) if found else None


def make_record(name: str, stats: RowStats, step: int | None = None, method: str | None = None) -> DeltaRecord:
    """A DeltaRecord from a module name and its RowStats."""
    return DeltaRecord(name, layer_index(name), name.rpartition(".")[2], stats.delta_m, stats.delta_d, step,
                       method, stats.rows, stats.zero_rows)


def model_deltas(model: nn.Module, step: int | None = None, method: str | None = None) -> list[DeltaRecord]:
    """ΔM / ΔD of every dorakit adapter in ``model``, from the factors (no dense W0 + sBA is formed).

    ``method`` defaults to each adapter's variant. Raises AdapterStateError if an adapter is merged.
    """
    records = [make_record(name, adapter_magnitude_direction(module), step, method or module.variant)
               for name, module in model.named_modules() if isinstance(module, AdapterLayer)]
    if not records:
        raise ValueError("the model has no dorakit adapters; for full fine-tuning or merged models compare "
                         "state dicts (compare_state_dicts) or use DeltaRecorder(every, reference=model).")
    return records


def transposed_keys(model: nn.Module) -> frozenset[str]:
    """State-dict keys whose weight is stored (in, out): transformers Conv1D and nn.Embedding tables.

    Pass it to ``compare_state_dicts`` so their rows are the output features, as in the adapters.
    Keys are given without any ``.base_layer`` segment (see ``compare_state_dicts``).
    """
    return frozenset(_plain_key(f"{name}.weight") for name, module in model.named_modules()
                     if is_transposed(module))


def _plain_key(key: str) -> str:
    """``a.q_proj.base_layer.weight`` -> ``a.q_proj.weight``: a wrapped (merged) model's keys as the base's."""
    return key.replace(".base_layer.", ".")


def compare_state_dicts(base: Mapping[str, Tensor], tuned: Mapping[str, Tensor], *,
                        transposed: Iterable[str] = (), include: Callable[[str], bool] | None = None,
                        step: int | None = None, method: str | None = None) -> list[DeltaRecord]:
    """ΔM / ΔD of every weight that two state dicts share: a merged or fully fine-tuned model vs its base.

    Compares each floating-point ``*.weight`` of two or more dims present in both with the same shape
    (conv kernels flattened to (out, in·k)). ``.base_layer`` segments are dropped from keys, so a
    model merged in place (``dk.merge_adapters``) compares against its plain base; adapter tensors
    (lora_A, lora_B, magnitude) are ignored. A merged half-precision model holds W' rounded to its dtype
    (about 2⁻⁹ relative in bfloat16), which adds to ΔM and ΔD; for small updates prefer the live adapters
    (``model_deltas``), whose numbers are the float64 values of the exact W'.

    Args:
        base: state dict before fine-tuning.
        tuned: state dict after (merged, or fully fine-tuned).
        transposed: keys stored (in, out) (``transposed_keys(model)``); compared transposed.
        include: keeps a module when ``include(module_name)`` is true (default: every weight).
    """
    plain_base = {_plain_key(k): v for k, v in base.items()}
    flip = {_plain_key(k) for k in transposed}
    records = []
    for key, wt in tuned.items():
        key = _plain_key(key)
        w0 = plain_base.get(key)
        name = key.removesuffix(".weight")
        if (not key.endswith(".weight") or w0 is None or w0.shape != wt.shape or w0.dim() < 2
                or not w0.is_floating_point() or (include is not None and not include(name))):
            continue
        if key in flip:
            w0, wt = w0.T, wt.T
        records.append(make_record(name, magnitude_direction(w0, wt), step, method))
    if not records:
        raise ValueError("the two state dicts share no weight of matching shape (after include).")
    return records


def checkpoint_series(base: Mapping[str, Tensor], checkpoints: Mapping[int, Mapping[str, Tensor]], *,
                      transposed: Iterable[str] = (), include: Callable[[str], bool] | None = None,
                      method: str | None = None) -> list[DeltaRecord]:
    """compare_state_dicts for each (step -> full state dict) checkpoint: the points of the paper's Fig. 2."""
    transposed = frozenset(transposed)
    return [record for step in sorted(checkpoints)
            for record in compare_state_dicts(base, checkpoints[step], transposed=transposed, include=include,
                                              step=step, method=method)]


def adapter_checkpoint_series(model: nn.Module, checkpoints: Mapping[int, Mapping[str, Tensor]],
                              method: str | None = None) -> list[DeltaRecord]:
    """ΔM / ΔD of adapter checkpoints (step -> ``dk.adapter_state_dict``-style tensors), factored.

    W0, the scaling and the variant come from ``model``'s (unmerged) adapters; A, B and m from each
    checkpoint (keys ``<module>.lora_A`` / ``.lora_B`` / ``.magnitude``, as in a model's state dict).
    The model is not changed.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, AdapterLayer)]
    if not layers:
        raise ValueError("the model has no dorakit adapters to read W0 and the scaling from.")
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise AdapterStateError(f"{len(merged)} adapters are merged (e.g. {merged[0]!r}), so W0 is gone; call "
                                "dk.unmerge_adapters(model) first.")
    records = []
    for step in sorted(checkpoints):
        state = checkpoints[step]
        for name, layer in layers:
            tensors = {k: state.get(f"{name}.{k}") for k in _ADAPTER_KEYS if getattr(layer, k, None) is not None}
            missing = [k for k, v in tensors.items() if v is None]
            if missing:
                raise KeyError(f"checkpoint of step {step} lacks {name}.{missing[0]}.")
            stats = _checkpoint_stats(layer, tensors)
            records.append(make_record(name, stats, step, method or layer.variant))
    return records


def _checkpoint_stats(layer: AdapterLayer, tensors: dict[str, Tensor]) -> RowStats:
    A, B = tensors.get("lora_A"), tensors.get("lora_B")
    return adapter_tensor_stats(layer.weight_2d().detach(), None if A is None else A.flatten(1),
                                None if B is None else B.flatten(1), layer.scaling, tensors.get("magnitude"))


def summarize(records: Iterable[DeltaRecord], by: str = "module_type") -> dict[object, tuple[float, float]]:
    """Mean (ΔM, ΔD) of the records grouped by one DeltaRecord field ("module_type", "layer", "step", ...)."""
    groups: dict[object, list[DeltaRecord]] = {}
    for record in records:
        groups.setdefault(getattr(record, by), []).append(record)
    return {key: (math.fsum(r.delta_m for r in rs) / len(rs), math.fsum(r.delta_d for r in rs) / len(rs))
            for key, rs in groups.items()}


def to_rows(records: Iterable[DeltaRecord]) -> list[dict[str, object]]:
    """Plain dicts, one per record, for csv.DictWriter or json."""
    return [asdict(r) for r in records]


def write_csv(records: Iterable[DeltaRecord], path: str | Path) -> Path:
    """Write the records as CSV (one row per record, a header of DeltaRecord's fields)."""
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[fld.name for fld in fields(DeltaRecord)])
        writer.writeheader()
        writer.writerows(to_rows(records))
    return path


def records_json(records: Iterable[DeltaRecord]) -> str:
    """The records as a JSON list of objects (NaN is written as null): what write_json writes."""
    rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in to_rows(records)]
    return json.dumps(rows, indent=1)


def write_json(records: Iterable[DeltaRecord], path: str | Path) -> Path:
    """Write the records as a JSON list of objects (NaN is written as null)."""
    path = Path(path)
    path.write_text(records_json(records))
    return path


def read_json(path: str | Path) -> list[DeltaRecord]:
    """Records written by write_json (or DeltaRecorder.save)."""
    rows = json.loads(Path(path).read_text())
    return [DeltaRecord(**{**row, "delta_d": math.nan if row["delta_d"] is None else row["delta_d"],
                           "delta_m": math.nan if row["delta_m"] is None else row["delta_m"]}) for row in rows]
