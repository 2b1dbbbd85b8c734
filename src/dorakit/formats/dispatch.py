"""save_adapter / load_adapter: the one place that picks the VeRA / DVoRA or the LoRA / DoRA files.

Both formats build on the shared readers and writers (``io``, ``loading``); this module sits above
them, so neither format module imports the other.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from torch import nn

from collections.abc import Sequence

from ..adapters.inject import InjectionReport, adapter_config
from ..adapters.multi import DEFAULT, list_adapters
from .io import save_lora_adapter
from .loading import load_lora_adapter
from .multi_io import load_named, save_named
from .peft_format import AdapterFileError
from .vera_io import is_vera_adapter, load_vera_adapter, save_vera_adapter


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                 task_type: str | None = None, save_embedding_layers: bool | Literal["auto"] = "auto",
                 name: str | Sequence[str] | None = None) -> Path:
    """Write ``model``'s adapters to ``directory`` in PEFT's format; returns the directory.

    LoRA / DoRA adapters go through ``io.save_lora_adapter``, VeRA / DVoRA through
    ``vera_io.save_vera_adapter``; see those for the files, ``save_embedding_layers`` and the errors.

    Named adapters (``name``: one name, a list, or None for all): PEFT's layout, the adapter "default" in
    ``directory`` itself and every other one in ``directory/<name>`` (as peft's save_pretrained). A model
    with the single adapter "default" writes exactly what it always did.
    """
    if name is not None or list_adapters(model) not in ([], [DEFAULT]):
        kw = {"base_model_name_or_path": base_model_name_or_path, "task_type": task_type,
              "save_embedding_layers": save_embedding_layers}
        return save_named(model, directory, name, lambda m, d: _save_one(m, d, **kw))
    return _save_one(model, directory, base_model_name_or_path=base_model_name_or_path, task_type=task_type,
                     save_embedding_layers=save_embedding_layers)


def _save_one(model: nn.Module, directory: str | os.PathLike, *, base_model_name_or_path: str | None,
              task_type: str | None, save_embedding_layers: bool | Literal["auto"]) -> Path:
    """The files of the model's one adapter (or the one only_adapter shows)."""
    if adapter_config(model).method in ("vera", "dvora"):
        if save_embedding_layers is True:
            raise ValueError("save_embedding_layers=True is not supported for VeRA / DVoRA adapters; "
                             "leave it at 'auto' or False.")
        return save_vera_adapter(model, directory, base_model_name_or_path=base_model_name_or_path,
                                 task_type=task_type)
    return save_lora_adapter(model, directory, base_model_name_or_path=base_model_name_or_path,
                             task_type=task_type, save_embedding_layers=save_embedding_layers)


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> InjectionReport | None:
    """Load a PEFT adapter (or one dorakit saved) onto ``model``, all-or-nothing.

    With ``name`` the file becomes the named adapter ``name`` beside the model's others (see
    dk.add_adapter; for PEFT's layout pass ``directory/<name>``); without, as always: onto a plain model,
    or into the model's existing, matching adapters.

    A VeRA / DVoRA file, or a model that already holds VeRA / DVoRA adapters, goes through
    ``vera_io.load_vera_adapter``; anything else through ``loading.load_lora_adapter``. Returns the
    InjectionReport when the adapters were built from the file, None when existing ones were filled.
    """
    if name is not None:
        if list_adapters(model) and is_vera_adapter(model, directory):
            raise AdapterFileError(f"{directory}: a VeRA / DVoRA adapter cannot be a second, named adapter yet; "
                                   "load it onto a model without adapters.")
        return load_named(model, directory, name, lambda m, d: load_adapter(m, d))
    if is_vera_adapter(model, directory):
        return load_vera_adapter(model, directory)
    return load_lora_adapter(model, directory)
