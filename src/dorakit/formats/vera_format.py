"""VeRA / DVoRA adapters on disk: PEFT's VeRA format, and dorakit's DVoRA format built on it.

VeRA (peft_type "VERA") is written exactly as peft's ``save_pretrained`` writes it, so
``PeftModel.from_pretrained`` loads dorakit's files and dorakit loads PEFT's:

* adapter_config.json: ``peft_type`` "VERA", ``r``, ``target_modules`` (every module by full name),
  ``projection_prng_key`` (AdapterConfig.vera_seed), ``save_projection``, ``vera_dropout``, ``d_initial``,
  ``fan_in_fan_out``, ``bias`` ("none" | "all" | "vera_only", dorakit's "lora_only"), ``modules_to_save``,
  ``init_weights``, ``task_type``, ``base_model_name_or_path``, ``inference_mode``;
* adapter_model.safetensors: ``base_model.model.<m>.vera_lambda_d`` (r,) and ``.vera_lambda_b`` (out,)
  per module; ``base_model.vera_A`` (r, in_max) and ``base_model.vera_B`` (out_max, r) only with
  save_projection; biases and modules_to_save as in LoRA files.

DVoRA has no PEFT format. dorakit's (``"dorakit_format": 1``) is the VeRA layout plus
``base_model.model.<m>.dorakit_magnitude`` (out,), with ``peft_type`` "DVORA" -- a type PEFT does not
know, so PEFT refuses the file rather than load it as VeRA and silently drop the magnitude -- and the
config fields ``vera_A_shape``, ``vera_B_shape``, ``projection_sha256`` and ``norm_grad``.

Nothing here touches a model or a file; vera_io.py does the reading, checking and writing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .peft_format import AdapterFileError, check_patterns, load_json

PEFT_TYPES = {"vera": "VERA", "dvora": "DVORA"}
DVORA_FORMAT = 1
MAGNITUDE_KEY = "dorakit_magnitude"
PROJECTION_KEYS = ("base_model.vera_A", "base_model.vera_B")
TO_PEFT_BIAS = {"none": "none", "all": "all", "lora_only": "vera_only"}
BOUND_FIELDS = ("peft_type", "r", "target_modules", "projection_prng_key", "save_projection", "bias",
                "modules_to_save")
"""adapter_config.json fields the weights depend on; a copy rides in the safetensors metadata (as io.py)."""


@dataclass(frozen=True)
class VeraFields:
    """What dorakit reads from a VeRA / DVoRA adapter_config.json (and the weights' metadata), checked."""

    method: str
    rank: int
    seed: int
    save_projection: bool
    dropout: float
    d_initial: float
    bias: str
    """dorakit's naming: "none" | "all" | "lora_only"."""
    target_modules: str | tuple[str, ...]
    modules_to_save: tuple[str, ...]
    projections: Mapping[str, object] | None
    """{"vera_A_shape", "vera_B_shape", "sha256"} when dorakit wrote the file."""
    dorakit_config: Mapping[str, object] | None


def _get(raw: Mapping[str, object], key: str, types: type | tuple[type, ...], default: object, where: str) -> object:
    value = raw.get(key, default)
    if value is None:
        raise AdapterFileError(f"{where}: the required field {key!r} is missing; the config is truncated.")
    if isinstance(value, bool) != (types is bool) or not isinstance(value, types):
        raise AdapterFileError(f"{where}: {key!r} has the wrong type ({type(value).__name__}: {value!r}); the file "
                               "is not a VeRA / DVoRA config or was edited by hand.")
    if isinstance(value, int) and types == (int, float) and abs(value) > 2**1000:
        raise AdapterFileError(f"{where}: {key!r} is {value}, too large for a float.")
    return value


def read_vera_fields(raw: Mapping[str, object], metadata: Mapping[str, str], where: str) -> VeraFields:
    """Check a parsed VeRA / DVoRA adapter_config.json; raises AdapterFileError naming ``where``."""
    peft_type = raw.get("peft_type")
    method = {v: k for k, v in PEFT_TYPES.items()}.get(peft_type)  # type: ignore[arg-type]
    if method is None:
        raise AdapterFileError(f"{where}: peft_type is {peft_type!r}, but the model has VeRA / DVoRA adapters; call "
                               "dk.remove_adapters(model) first to load another kind of adapter.")
    for key in ("layers_to_transform", "layers_pattern"):
        if raw.get(key) not in (None, [], ""):
            raise AdapterFileError(f"{where}: {key}={raw[key]!r} (layer-index selection) is not supported by dorakit.")
    rank = _get(raw, "r", int, None, where)
    if rank <= 0:
        raise AdapterFileError(f"{where}: r must be a positive integer, got {rank!r}.")
    bias = {v: k for k, v in TO_PEFT_BIAS.items()}.get(_get(raw, "bias", str, "none", where))
    if bias is None:
        raise AdapterFileError(f"{where}: bias must be 'none', 'all' or 'vera_only', got {raw.get('bias')!r}.")
    targets = raw.get("target_modules")
    if isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        targets = tuple(targets)
    elif not isinstance(targets, str) or not targets:
        raise AdapterFileError(f"{where}: target_modules must be a non-empty list of names or a regex string, "
                               f"got {targets!r}.")
    to_save = raw.get("modules_to_save") or []
    if not isinstance(to_save, list) or not all(isinstance(m, str) for m in to_save):
        raise AdapterFileError(f"{where}: modules_to_save must be a list of module names, got {to_save!r}.")
    check_patterns({}, targets, where)
    projections = _metadata(metadata, "dorakit_projections", where)
    if method == "dvora":
        if raw.get("dorakit_format") != DVORA_FORMAT:
            raise AdapterFileError(f"{where}: dorakit_format is {raw.get('dorakit_format')!r}; this dorakit reads "
                                   f"DVoRA format {DVORA_FORMAT}. Load it with the dorakit version that wrote it.")
        projections = {"vera_A_shape": _get(raw, "vera_A_shape", list, None, where),
                       "vera_B_shape": _get(raw, "vera_B_shape", list, None, where),
                       "sha256": _get(raw, "projection_sha256", str, None, where)}
    if projections is not None:
        _check_projection_info(projections, where)
    dk_cfg = _metadata(metadata, "dorakit_config", where)
    return VeraFields(
        method=method, rank=rank, seed=_get(raw, "projection_prng_key", int, 0, where),
        save_projection=_get(raw, "save_projection", bool, True, where),
        dropout=float(_get(raw, "vera_dropout", (int, float), 0.0, where)),
        d_initial=float(_get(raw, "d_initial", (int, float), 0.1, where)), bias=bias, target_modules=targets,
        modules_to_save=tuple(to_save), projections=projections, dorakit_config=dk_cfg)


def _metadata(metadata: Mapping[str, str], key: str, where: str) -> dict[str, object] | None:
    """A JSON object from the safetensors metadata (dorakit's entries), or None when absent."""
    if key not in metadata:
        return None
    value = load_json(metadata[key], where, f"metadata {key!r}")
    if not isinstance(value, dict):
        raise AdapterFileError(f"{where}: metadata {key!r} must be a JSON object, got {type(value).__name__}; the "
                               "file is corrupt or was edited by hand.")
    return value


def _check_projection_info(info: Mapping[str, object], where: str) -> None:
    """vera_A_shape / vera_B_shape: two positive integers each; sha256: a string (when present)."""
    for key in ("vera_A_shape", "vera_B_shape"):
        shape = info.get(key)
        if not isinstance(shape, list) or len(shape) != 2 or not all(
                isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
            raise AdapterFileError(f"{where}: {key} must be a list of two positive integers, got {shape!r}.")
    if not isinstance(info.get("sha256"), (str, type(None))):
        raise AdapterFileError(f"{where}: the projections' sha256 must be a string, got {info.get('sha256')!r}.")
