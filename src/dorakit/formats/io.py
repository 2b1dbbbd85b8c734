"""Adapters on disk: PEFT's format both ways (adapter_config.json + adapter_model.safetensors).

``save_adapter`` writes what peft's ``save_pretrained`` writes, so ``PeftModel.from_pretrained``,
transformers' ``load_adapter`` and servers that read PEFT adapters load it; ``load_adapter`` reads
a PEFT LoRA / DoRA adapter onto a plain model (building the adapters from the file) or onto a model
whose adapters already match. Safetensors only: nothing is ever unpickled. Every check runs before
the model is touched, so a failed load leaves it as it was; every file is written to a temporary
name and renamed into place, so an interrupted save never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor, nn

from ..adapters.config import AdapterConfig
from ..adapters.layers import AdapterLayer
from ..adapters.inject import (
    adapter_config,
    adapter_layers,
    pattern_matches,
)
from .peft_format import (
    PREFIX,
    AdapterFileError,
    PeftFields,
    adapter_keys,
    is_embedding_name,
    peft_config_dict,
    peft_magnitude_shape,
    read_peft_fields,
    strip_prefix,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
# adapter_config.json fields that the weights depend on; a copy rides in the safetensors metadata
# so that a config from another save (e.g. an interrupted overwrite) is caught on load.
BOUND_FIELDS = ("r", "lora_alpha", "use_dora", "use_rslora", "target_modules", "rank_pattern", "alpha_pattern",
                "bias", "modules_to_save")


def _umask() -> int:
    """The process's file-creation mask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and an atomic rename."""
    atomic_write_files({path: data})


def atomic_write_files(files: Mapping[Path, bytes]) -> None:
    """Write several files so that an error while writing leaves every old file as it was.

    All data first goes to temporary files beside their targets (flushed to disk); only then is each
    renamed over its target, in the given order. Temporary files never outlive an exception.
    """
    temps: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            temps.append((_write_temp(path, data), path))
        for tmp, path in temps:
            os.replace(tmp, path)
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)  # renamed ones are gone already; the rest are a failure's leftovers


def _write_temp(path: Path, data: bytes) -> Path:
    """``data`` in a new temporary file in ``path``'s directory, flushed to disk."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the renamed file gets open()'s usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


# ---- save ----------------------------------------------------------------------------------------

def peft_state_dict(model: nn.Module, *, save_embedding_layers: bool | Literal["auto"] = "auto",
                    base_model_name_or_path: str | None = None) -> dict[str, Tensor]:
    """The tensors of ``model``'s adapters under PEFT's key names (prefix ``base_model.model.``).

    ``save_embedding_layers`` as in PEFT's get_peft_model_state_dict: see save_adapter.
    """
    cfg = adapter_config(model)
    if cfg.method in ("vera", "dvora"):
        raise AdapterFileError(f"method={cfg.method!r} adapters have no LoRA tensors; dk.save_adapter writes them "
                               "(see dorakit.formats.vera_io).")
    layers = dict(adapter_layers(model))
    out: dict[str, Tensor] = {}
    for name, layer in layers.items():
        a_key, b_key, m_key = adapter_keys(name, layer)
        if layer.variant == "magnitude":  # written as rank-1 DoRA with B = 0: exactly m ⊙ W0 / ||W0||_c
            kw = {"dtype": layer.magnitude.dtype, "device": layer.magnitude.device}
            out[a_key], out[b_key] = torch.zeros(layer._lora_A_shape(1), **kw), torch.zeros(layer._lora_B_shape(1), **kw)
        else:
            out[a_key], out[b_key] = layer.lora_A, layer.lora_B
        if layer.variant != "lora":
            out[m_key] = layer.magnitude.reshape(peft_magnitude_shape(layer))
    out.update(extra_state_dict(model, cfg, layers))
    if wants_embedding_layers(model, layers, save_embedding_layers, base_model_name_or_path):
        out.update(embedding_state_dict(model, layers, explicit=save_embedding_layers is True))
    return {PREFIX + k: v.detach().to("cpu", copy=True).contiguous() for k, v in out.items()}


def embedding_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's input and output embeddings by name, as PEFT finds them (transformers'
    get_input_embeddings / get_output_embeddings); {} for a model without those methods."""
    found: dict[str, nn.Module] = {}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            layer = getattr(model, getter)()
        except (AttributeError, NotImplementedError, TypeError):
            continue
        name = next((n for n, m in model.named_modules() if n and m is layer), None) if layer is not None else None
        if name is not None:
            found[name] = layer
    return found


def wants_embedding_layers(model: nn.Module, layers: Mapping[str, nn.Module], mode: bool | str,
                           base_model_name_or_path: str | None) -> bool:
    """PEFT's save_embedding_layers rule: True / False as given; "auto" saves them when an adapted
    module is named ``embed_tokens`` / ``lm_head`` (a dotted suffix), or when the model's
    config.vocab_size differs from that in ``<base_model_name_or_path>/config.json`` (a local
    directory; PEFT also asks the Hub, dorakit never does)."""
    if mode not in (True, False, "auto"):
        raise ValueError(f"save_embedding_layers must be True, False or 'auto', got {mode!r}.")
    if mode != "auto":
        return bool(mode)
    if any(is_embedding_name(n) for n in layers):
        return True
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    config = Path(base_model_name_or_path) / "config.json" if base_model_name_or_path else None
    if not vocab or config is None or not config.is_file():
        return False
    try:
        base_vocab = json.loads(config.read_text()).get("vocab_size")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False
    return base_vocab is not None and base_vocab != vocab


def embedding_state_dict(model: nn.Module, layers: Mapping[str, nn.Module], *, explicit: bool) -> dict[str, Tensor]:
    """The base weights of the model's input / output embeddings under PEFT's keys (no prefix):
    ``<e>.base_layer.<t>`` for an adapted one, ``<e>.<t>`` for a plain one (written only when no
    embed_tokens / lm_head module is adapted: PEFT's "the vocabulary was resized" case)."""
    found = embedding_modules(model)
    if not found and explicit:
        raise AdapterFileError("save_embedding_layers=True needs a model with get_input_embeddings() (a "
                               "transformers model); this one has none. Save without it.")
    targeted = any(is_embedding_name(n) for n in layers)
    out: dict[str, Tensor] = {}
    for name, module in found.items():
        if isinstance(module, AdapterLayer):
            if isinstance(module.base_layer, (nn.Linear, nn.Embedding)):
                out.update({f"{name}.base_layer.{k}": v for k, v in module.base_layer.state_dict().items()})
        elif not targeted:
            out.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    return out


def extra_state_dict(model: nn.Module, cfg: AdapterConfig, layers: Mapping[str, nn.Module]) -> dict[str, Tensor]:
    """The biases that ``cfg.bias`` trains and the state of ``cfg.modules_to_save``, under PEFT's keys (no prefix)."""
    out: dict[str, Tensor] = {}
    if cfg.bias != "none":
        for name, layer in layers.items():
            if getattr(layer.base_layer, "bias", None) is not None:
                out[f"{name}.base_layer.bias"] = layer.base_layer.bias
    if cfg.bias == "all":
        for key, param in model.named_parameters():
            if key.rpartition(".")[2] == "bias":
                out.setdefault(key, param)
    for name in _modules_to_save(model, cfg):
        for key, tensor in model.get_submodule(name).state_dict().items():
            out[f"{name}.{key}"] = tensor
    return out


def _modules_to_save(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Full names of the outermost modules that cfg.modules_to_save selects."""
    names = [n for n, _ in model.named_modules() if n and any(pattern_matches(n, p) for p in cfg.modules_to_save)]
    return [n for n in names if not any(n.startswith(o + ".") for o in names)]


def save_lora_adapter(model: nn.Module, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                      task_type: str | None = None, save_embedding_layers: bool | Literal["auto"] = "auto") -> Path:
    """Write ``model``'s LoRA / DoRA adapters to ``directory`` in PEFT's format; returns the directory.

    ``base_model_name_or_path`` defaults to the model's ``config._name_or_path`` when it has one;
    ``task_type`` (e.g. "CAUSAL_LM") is written for PEFT's task-specific model classes. Existing
    adapter files in ``directory`` are replaced atomically; other files are left alone.

    ``save_embedding_layers`` is PEFT's option of that name: with True the full base weights of the
    model's input and output embeddings are written too (``…embed_tokens.base_layer.weight``); with
    "auto" (PEFT's default) that happens when an ``embed_tokens`` / ``lm_head`` module is adapted, or
    when the vocabulary differs from ``base_model_name_or_path``'s local config.json (a resize).

    Raises:
        RuntimeError: the model has no dorakit adapters.
        AdapterFileError: the adapters cannot be expressed in PEFT's format (LoRA modules together
            with magnitude-only modules: PEFT's use_dora is one switch for the whole adapter).
    """
    cfg = adapter_config(model)
    layers = dict(adapter_layers(model))
    if cfg.method == "lora" and any(layer.variant == "magnitude" for layer in layers.values()):
        raise AdapterFileError("method='lora' with magnitude_only modules cannot be written in PEFT's format "
                               "(use_dora is one switch for the whole adapter); train with method='dora' (the "
                               "paper's §5 setup: DoRA on some modules, magnitude only on others).")
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    all_names = [n for n, _ in model.named_modules() if n]
    config = peft_config_dict(cfg, layers, all_names, _modules_to_save(model, cfg), base_model_name_or_path,
                              task_type)
    metadata = {
        "format": "pt",
        "dorakit_config": json.dumps(cfg.to_dict()),
        "dorakit_variants": json.dumps({name: layer.variant for name, layer in layers.items()}),
        "dorakit_peft_fields": json.dumps({k: config[k] for k in BOUND_FIELDS}),
    }
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    # Both files are written in full before either is renamed into place, so a failure while writing
    # leaves the old adapter intact. The weights are renamed first: if the process dies between the two
    # renames, their metadata (dorakit_peft_fields) no longer matches the old config and loading says so.
    atomic_write_files({
        path / WEIGHTS_NAME: save_safetensors_bytes(peft_state_dict(
            model, save_embedding_layers=save_embedding_layers, base_model_name_or_path=base_model_name_or_path),
            metadata),
        path / CONFIG_NAME: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
    })
    return path


# ---- read ----------------------------------------------------------------------------------------

@dataclass
class AdapterFiles:
    """An adapter directory, read and checked at the file level (nothing about a model yet)."""

    fields: PeftFields
    tensors: dict[str, Tensor]
    """Keys without the ``base_model.model.`` prefix."""
    variants: dict[str, str] | None
    """dorakit's per-module variants, when dorakit wrote the file."""
    dorakit_config: dict[str, object] | None


def read_adapter_files(directory: str | os.PathLike) -> tuple[dict[str, object], dict[str, Tensor], dict[str, str]]:
    """(config JSON, tensors, safetensors metadata) of an adapter directory, after the file-level checks
    every adapter type shares: both files present (a pickled .bin is refused), valid JSON, a readable
    safetensors file, finite tensors. The caller checks its fields, then check_same_save."""
    path = Path(directory)
    if not path.is_dir():
        raise AdapterFileError(f"{path}: no such adapter directory (expected {CONFIG_NAME} and {WEIGHTS_NAME}).")
    cfg_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not weights_path.is_file():
        if (path / PICKLE_NAME).is_file():
            raise AdapterFileError(f"{path / PICKLE_NAME}: dorakit never unpickles adapter files. Convert it once "
                                   f"with dk.convert_bin_adapter({str(path)!r}), which reads it with "
                                   f"torch.load(weights_only=True) and writes {WEIGHTS_NAME}.")
        raise AdapterFileError(f"{weights_path}: missing; an adapter directory needs {CONFIG_NAME} and {WEIGHTS_NAME}.")
    if not cfg_path.is_file():
        raise AdapterFileError(f"{cfg_path}: missing; an adapter directory needs {CONFIG_NAME} and {WEIGHTS_NAME}.")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{cfg_path}: not valid JSON ({e}); the file is truncated or corrupt.") from None
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{cfg_path}: expected a JSON object, got {type(raw).__name__}.")
    data = weights_path.read_bytes()
    try:
        tensors = load_safetensors_bytes(data)
        metadata = _safetensors_metadata(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise AdapterFileError(f"{weights_path}: not a readable safetensors file ({e}); it is truncated or corrupt. "
                               "Save or download it again.") from None
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise AdapterFileError(f"{weights_path}: tensor {key!r} holds NaN or Inf; the adapter is corrupt.")
    return raw, tensors, metadata


def check_same_save(directory: str | os.PathLike, raw: Mapping[str, object], metadata: Mapping[str, str]) -> None:
    """The config fields the weights depend on (copied into the safetensors metadata by save_adapter)
    must be unchanged: otherwise the two files come from different saves."""
    path = Path(directory)
    for key, value in json.loads(metadata.get("dorakit_peft_fields", "{}")).items():
        if raw.get(key) != value:
            raise AdapterFileError(f"{path / CONFIG_NAME} and {path / WEIGHTS_NAME} come from different saves: "
                                   f"{key} is {raw.get(key)!r} in the config but {value!r} when the weights were "
                                   "written (an interrupted save, or files mixed by hand). Save the adapter again.")


def read_adapter(directory: str | os.PathLike) -> AdapterFiles:
    """Read and check ``directory``'s adapter_config.json and adapter_model.safetensors (LoRA / DoRA)."""
    raw, tensors, metadata = read_adapter_files(directory)
    where = str(Path(directory) / CONFIG_NAME)
    fields = read_peft_fields(raw, where)
    check_same_save(directory, raw, metadata)
    variants = json.loads(metadata["dorakit_variants"]) if "dorakit_variants" in metadata else None
    dk_cfg = json.loads(metadata["dorakit_config"]) if "dorakit_config" in metadata else None
    return AdapterFiles(fields, strip_prefix(tensors, str(Path(directory) / WEIGHTS_NAME)), variants, dk_cfg)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (its JSON header)."""
    if len(data) < 8:
        raise ValueError("file shorter than the 8-byte header length")
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    return dict(header.get("__metadata__") or {})


def convert_bin_adapter(directory: str | os.PathLike) -> Path:
    """Convert a legacy ``adapter_model.bin`` to ``adapter_model.safetensors`` beside it.

    Reads with ``torch.load(weights_only=True)``, which loads tensors and plain containers only and
    refuses arbitrary pickled objects. An existing safetensors file is never overwritten.
    """
    path = Path(directory)
    src, dst = path / PICKLE_NAME, path / WEIGHTS_NAME
    if dst.exists():
        raise FileExistsError(f"{dst} already exists; delete it first if you mean to replace it with {src.name}.")
    if not src.is_file():
        raise AdapterFileError(f"{src}: missing; nothing to convert.")
    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        detail = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), type(e).__name__)
        raise AdapterFileError(f"{src}: refused: torch.load(weights_only=True) cannot read it ({detail}); it holds "
                               "pickled objects other than tensors, or is corrupt. dorakit never unpickles those: "
                               f"re-save the adapter as {WEIGHTS_NAME} with the tool that wrote it.") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise AdapterFileError(f"{src}: expected a flat dict of tensors, got {type(state).__name__}.")
    atomic_write_bytes(dst, save_safetensors_bytes({k: v.contiguous() for k, v in state.items()}, {"format": "pt"}))
    return dst

