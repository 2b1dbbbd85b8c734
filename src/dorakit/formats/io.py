"""Adapters on disk: PEFT's format both ways (adapter_config.json + adapter_model.safetensors).

``save_adapter`` writes what peft's ``save_pretrained`` writes, so ``PeftModel.from_pretrained``,
transformers' ``load_adapter`` and servers that read PEFT adapters load it; ``load_adapter`` reads
a PEFT LoRA / DoRA adapter onto a plain model (building the adapters from the file) or onto a model
whose adapters already match. Safetensors only: nothing is ever unpickled. Every check runs before
the model is touched, so a failed load leaves it as it was; every file is written to a temporary
name and renamed into place, so an interrupted save never leaves a half-written file.
"""

from __future__ import annotations

import io
import json
import os
import stat
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
    load_json,
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


CONFIG_MAX_BYTES = 16 * 2**20
"""adapter_config.json's size limit: a full-name target_modules of a 50k-module model is ~3 MB."""
SAFETENSORS_HEADER_MAX = 100_000_000
"""The safetensors library's own limit on a file's JSON header."""
FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
"""The dtypes adapter tensors are made of (safetensors' names)."""
BUFFER_DTYPES = {"I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
"""Allowed too, for buffers of modules_to_save (e.g. BatchNorm's num_batches_tracked); loading checks each
against the model's tensor."""


class FileReadError(ValueError):
    """A file that dorakit will not read: missing, not a regular file, or over its size limit."""


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character "
             "device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def read_regular_file(path: str | os.PathLike, max_bytes: int | None, what: str, *,
                      error: type[Exception] = FileReadError) -> bytes:
    """The bytes of ``path``, which must be a regular file (after symlinks) of at most ``max_bytes``
    (None: any size; the read still stops at the size the file had when opened).

    The file is opened with O_NONBLOCK and checked with fstat on the open descriptor, so a FIFO,
    device or directory in its place is refused without blocking, and cannot be swapped in between
    the check and the read. Raises ``error`` (a subclass of Exception taking one message) naming
    the path and ``what`` (e.g. "adapter_config.json", "--data file").
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"{path}: {what} is missing (no such file).") from None
    except OSError as e:
        raise error(f"{path}: cannot open {what} ({e.strerror}).") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            link = f" (a symlink to {os.path.realpath(path)})" if os.path.islink(path) else ""
            raise error(f"{path}{link}: {what} is {_kind(info.st_mode)}, not a regular file; dorakit reads only "
                        "regular files.")
        if max_bytes is not None and info.st_size > max_bytes:
            raise error(f"{path}: {what} is {info.st_size:,} bytes, over its {max_bytes:,}-byte limit; it is not "
                        f"a {what} or is corrupt.")
        size = info.st_size
        chunks, got = [], 0
        while got <= size:  # one byte past the size tells whether the file grew while being read
            chunk = os.read(fd, min(size + 1 - got, 1 << 26))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got != size:
            raise error(f"{path}: {what} changed size while being read ({size:,} bytes, then {got:,}{'+' * (got > size)}"
                        "); read it when nothing is writing it.")
        return b"".join(chunks)
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror}).") from None
    finally:
        os.close(fd)


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
    every adapter type shares: both files regular files (a pickled .bin is refused), the config valid
    JSON under CONFIG_MAX_BYTES, a consistent safetensors file of floating tensors (BUFFER_DTYPES
    aside), all finite. The caller checks its fields, then check_same_save."""
    path = Path(directory)
    if not path.is_dir():
        raise AdapterFileError(f"{path}: no such adapter directory (expected {CONFIG_NAME} and {WEIGHTS_NAME}).")
    cfg_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not os.path.lexists(weights_path):
        if os.path.lexists(path / PICKLE_NAME):
            raise AdapterFileError(f"{path / PICKLE_NAME}: dorakit never unpickles adapter files. Convert it once "
                                   f"with dk.convert_bin_adapter({str(path)!r}), which reads it with "
                                   f"torch.load(weights_only=True) and writes {WEIGHTS_NAME}.")
        raise AdapterFileError(f"{weights_path}: missing; an adapter directory needs {CONFIG_NAME} and {WEIGHTS_NAME}.")
    if not os.path.lexists(cfg_path):
        raise AdapterFileError(f"{cfg_path}: missing; an adapter directory needs {CONFIG_NAME} and {WEIGHTS_NAME}.")
    raw = read_config_json(cfg_path)
    tensors, metadata = read_safetensors(weights_path)
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise AdapterFileError(f"{weights_path}: tensor {key!r} holds NaN or Inf; the adapter is corrupt.")
    return raw, tensors, metadata


def read_config_json(path: Path) -> dict[str, object]:
    """adapter_config.json, read as a bounded regular file; a JSON object or AdapterFileError."""
    raw = load_json(read_regular_file(path, CONFIG_MAX_BYTES, CONFIG_NAME, error=AdapterFileError), str(path))
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{path}: expected a JSON object, got {type(raw).__name__}.")
    return raw


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, its header checked before any tensor is built:
    bounded, a JSON object, every tensor's dtype in FLOAT_DTYPES or BUFFER_DTYPES (named if not)."""
    data = read_regular_file(path, None, WEIGHTS_NAME, error=AdapterFileError)
    corrupt = "it is truncated or corrupt. Save or download it again."
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 < size <= min(SAFETENSORS_HEADER_MAX, len(data) - 8):
        raise AdapterFileError(f"{path}: not a readable safetensors file (header length {size} for a file of "
                               f"{len(data)} bytes); {corrupt}")
    header = load_json(data[8:8 + size], str(path), "safetensors header")
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path}: not a readable safetensors file (the header is not a JSON object); {corrupt}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFileError(f"{path}: the safetensors __metadata__ must map names to strings; {corrupt}")
    for key, entry in header.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if dtype not in FLOAT_DTYPES and dtype not in BUFFER_DTYPES:
            allowed = ", ".join(FLOAT_DTYPES.values())
            raise AdapterFileError(f"{path}: tensor {key!r} has dtype {dtype!r}; adapter tensors must be {allowed} "
                                   "(integer and bool only for buffers of modules_to_save). Nothing is cast silently: "
                                   "re-save the adapter in a floating dtype.")
    try:
        tensors = load_safetensors_bytes(data)
    except (SafetensorError, ValueError, RuntimeError, TypeError, OverflowError) as e:
        raise AdapterFileError(f"{path}: not a readable safetensors file ({e}); {corrupt}") from None
    return tensors, metadata


def metadata_json(metadata: Mapping[str, str], key: str, where: str, kind: type = dict) -> object | None:
    """One of dorakit's JSON entries in the safetensors metadata, parsed and of type ``kind``; None if absent."""
    if key not in metadata:
        return None
    value = load_json(metadata[key], where, f"metadata {key!r}")
    if not isinstance(value, kind):
        raise AdapterFileError(f"{where}: metadata {key!r} must be a JSON {kind.__name__}, got "
                               f"{type(value).__name__}; the file is corrupt or was edited by hand.")
    return value


def check_same_save(directory: str | os.PathLike, raw: Mapping[str, object], metadata: Mapping[str, str]) -> None:
    """The config fields the weights depend on (copied into the safetensors metadata by save_adapter)
    must be unchanged: otherwise the two files come from different saves."""
    path = Path(directory)
    bound = metadata_json(metadata, "dorakit_peft_fields", str(path / WEIGHTS_NAME)) or {}
    for key, value in bound.items():  # type: ignore[attr-defined]
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
    weights = str(Path(directory) / WEIGHTS_NAME)
    variants = metadata_json(metadata, "dorakit_variants", weights)
    if variants is not None and not all(isinstance(v, str) for v in variants.values()):  # type: ignore[attr-defined]
        raise AdapterFileError(f"{weights}: metadata 'dorakit_variants' must map module names to variant names.")
    dk_cfg = metadata_json(metadata, "dorakit_config", weights)
    return AdapterFiles(fields, strip_prefix(tensors, weights), variants, dk_cfg)  # type: ignore[arg-type]


def convert_bin_adapter(directory: str | os.PathLike) -> Path:
    """Convert a legacy ``adapter_model.bin`` to ``adapter_model.safetensors`` beside it.

    Reads with ``torch.load(weights_only=True)``, which loads tensors and plain containers only and
    refuses arbitrary pickled objects. An existing safetensors file is never overwritten.
    """
    path = Path(directory)
    src, dst = path / PICKLE_NAME, path / WEIGHTS_NAME
    if dst.exists():
        raise FileExistsError(f"{dst} already exists; delete it first if you mean to replace it with {src.name}.")
    if not os.path.lexists(src):
        raise AdapterFileError(f"{src}: missing; nothing to convert.")
    data = read_regular_file(src, None, PICKLE_NAME, error=AdapterFileError)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever a crafted pickle makes torch.load raise, the file is refused
        detail = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), type(e).__name__)
        raise AdapterFileError(f"{src}: refused: torch.load(weights_only=True) cannot read it ({detail}); it holds "
                               "pickled objects other than tensors, or is corrupt. dorakit never unpickles those: "
                               f"re-save the adapter as {WEIGHTS_NAME} with the tool that wrote it.") from None
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise AdapterFileError(f"{src}: expected a flat dict of tensors, got {type(state).__name__}.")
    try:
        blob = save_safetensors_bytes({k: v.contiguous() for k, v in state.items()}, {"format": "pt"})
    except (ValueError, RuntimeError, TypeError) as e:
        raise AdapterFileError(f"{src}: its tensors cannot be written as safetensors ({e}).") from None
    atomic_write_bytes(dst, blob)
    return dst

