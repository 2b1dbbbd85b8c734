"""Named adapters on disk, in PEFT's layout for several adapters, and hot-swapping an adapter's weights.

PEFT's ``save_pretrained(dir, selected_adapters=...)`` writes the adapter named "default" to ``dir``
itself and every other adapter ``n`` to ``dir/n``; dorakit writes the same. Each adapter is written and
read by the single-adapter code (``io`` / ``loading``) on a view of the model holding it alone
(``adapters.multi.only_adapter``), so the files are exactly what one adapter's files are.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..adapters.functional import lora_scaling
from ..adapters.inject import adapter_layers
from ..adapters.multi import DEFAULT, active_adapter, attach_named, check_known, list_adapters, only_adapter
from .io import read_adapter
from .loading import _adapter_copies, _file_rank_alpha, _split_keys, _variants, check_same_modules
from .peft_format import AdapterFileError


def adapter_dir(directory: str | os.PathLike, name: str) -> Path:
    """Where adapter ``name`` lives under ``directory`` in PEFT's layout: the root for "default", else ``name/``."""
    return Path(directory) if name == DEFAULT else Path(directory) / name


def save_named(model: nn.Module, directory: str | os.PathLike, names: str | Sequence[str] | None,
               save_one: Callable[[nn.Module, Path], Path]) -> Path:
    """Write the adapters ``names`` (None: all) with ``save_one`` each, in PEFT's layout; returns ``directory``."""
    known = list_adapters(model)
    if not known:
        raise RuntimeError("the model has no dorakit adapters; call dk.add_adapter or dk.apply_adapters first.")
    selected = known if names is None else [names] if isinstance(names, str) else list(names)
    for name in selected:
        check_known(model, name)
    for name in selected:
        with only_adapter(model, name):
            save_one(model, adapter_dir(directory, name))
    return Path(directory)


def load_named(model: nn.Module, directory: str | os.PathLike, name: str,
               load_one: Callable[[nn.Module, str | os.PathLike], object]) -> object:
    """Load the adapter at ``directory`` as adapter ``name`` (see adapters.multi.attach_named)."""
    if list_adapters(model):
        fields = read_adapter(directory).fields
        if fields.modules_to_save or fields.bias != "none":
            raise AdapterFileError(f"{directory}: this adapter trains modules_to_save / biases, which a second, "
                                   "named adapter cannot (they would change the base for every adapter); load it "
                                   "onto a model without adapters.")
    return attach_named(model, name, lambda m: load_one(m, directory))


def _pad_rank(t: Tensor, dim: int, rank: int) -> Tensor:
    """``t`` with zeros appended along ``dim`` up to ``rank`` (zero rows of A / columns of B leave BA unchanged)."""
    missing = rank - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, missing]   # F.pad counts dimensions from the last
    return F.pad(t, pad)


def hot_swap_adapter(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> None:
    """Overwrite adapter ``name``'s tensors (default: the active one) in place with the file's.

    Nothing is re-wrapped or re-allocated, so a ``torch.compile``d model does not recompile. The file must
    hold the same modules and variants; its rank may be lower than the model's (A and B are zero-padded: B·A
    is unchanged, so LoRA and DoRA, norm included, compute exactly the file's adapter). Where the file's
    scale s = alpha / r differs from the model's, B is multiplied by s_file / s_model (one rounding).
    All checks run before anything is written.
    """
    name = active_adapter(model) if name is None else check_known(model, name)
    files, where = read_adapter(directory), str(directory)
    groups, _rest = _split_keys(files.tensors, where)
    with only_adapter(model, name):
        layers = dict(adapter_layers(model))
        check_same_modules(layers, groups, where)
        variants = _variants(files, groups, where)
        copies: list[tuple[Tensor, Tensor]] = []
        for module_name, layer in layers.items():
            if layer.variant != variants[module_name]:
                raise AdapterFileError(f"{where}: module {module_name!r} is {layer.variant} in the model but "
                                       f"{variants[module_name]} in the file; hot-swap needs the same variant.")
            group = dict(groups[module_name])
            if layer.variant != "magnitude":
                rank, alpha = _file_rank_alpha(files.fields, module_name, where)
                if rank > layer.rank or group["A"].shape[0] > layer.rank:
                    raise AdapterFileError(f"{where}: module {module_name!r} has rank {rank} in the file but "
                                           f"{layer.rank} in the model; hot-swap pads up to the model's rank, never "
                                           "down. Build the adapter with the largest rank you will swap in.")
                factor = lora_scaling(alpha, rank, files.fields.use_rslora) / layer.scaling
                group["A"] = _pad_rank(group["A"], 0, layer.rank)
                group["B"] = _pad_rank(group["B"] if factor == 1.0 else group["B"] * factor, 1, layer.rank)
            copies += _adapter_copies(module_name, layer, group, where)
        with torch.no_grad():
            for dst, src in copies:
                dst.copy_(src)
