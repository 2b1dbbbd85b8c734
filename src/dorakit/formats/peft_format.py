"""PEFT's on-disk LoRA/DoRA format, as pure translation: tensor keys and adapter_config.json fields.

The oracle is peft's own ``save_pretrained`` (peft 0.21). A file holds, per adapted module ``<m>``
(keys prefixed ``base_model.model.``):

* ``<m>.lora_A.weight`` (r, in[, *k]) and ``<m>.lora_B.weight`` (out, r[, 1, ...]) -- for
  ``nn.Embedding`` they are ``<m>.lora_embedding_A`` (r, vocab) and ``<m>.lora_embedding_B`` (dim, r);
* ``<m>.lora_magnitude_vector`` for DoRA: (out,), or (1, out, 1, ...) for convolutions;
* with ``bias="lora_only"`` / ``"all"``: ``<m>.base_layer.bias`` (and every other ``<x>.bias``);
* for ``modules_to_save`` ``<s>``: the module's whole state dict as ``<s>.<tensor>``;
* with ``save_embedding_layers`` (PEFT's default "auto": on when ``embed_tokens`` / ``lm_head`` is
  targeted, or the vocabulary was resized): the base weights of the model's input / output embeddings,
  ``<e>.base_layer.<tensor>`` for an adapted one and ``<e>.<tensor>`` for a plain one. Loading
  copies them over the base's weights (they must have the model's shapes).

Nothing here touches a model; ``io.py`` does the reading, checking and writing.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from ..adapters.config import AdapterConfig, PatternError, check_regex, regex_fullmatch
from ..adapters.layers import AdapterLayer, Conv1DAdapter, ConvAdapter, EmbeddingAdapter

PREFIX = "base_model.model."
MAGNITUDE = "lora_magnitude_vector"
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # peft.utils.constants.EMBEDDING_LAYER_NAMES

# Fields of PEFT's LoraConfig that change what a file means and that dorakit does not implement:
# loading refuses a file that sets one (to anything but its neutral value) rather than ignoring it.
UNSUPPORTED = {
    "layers_to_transform": "layer-index selection", "layers_pattern": "layer-index selection",
    "lora_bias": "a bias on lora_B", "target_parameters": "adapters on nn.Parameter targets",
    "trainable_token_indices": "trainable tokens", "use_qalora": "QA-LoRA", "layer_replication":
    "layer replication", "alora_invocation_tokens": "activated LoRA", "use_bdlora": "BD-LoRA",
    "megatron_config": "Megatron layers", "arrow_config": "Arrow routing", "exclude_modules": "exclude_modules",
}


class AdapterFileError(ValueError):
    """An adapter directory that dorakit cannot load: missing, corrupt, unsupported or mismatched."""


def adapter_keys(name: str, layer: AdapterLayer) -> tuple[str, str, str]:
    """PEFT's keys (A, B, magnitude) for the adapter of module ``name``, without the prefix."""
    if isinstance(layer, EmbeddingAdapter):
        return f"{name}.lora_embedding_A", f"{name}.lora_embedding_B", f"{name}.{MAGNITUDE}"
    return f"{name}.lora_A.weight", f"{name}.lora_B.weight", f"{name}.{MAGNITUDE}"


def is_embedding_name(name: str) -> bool:
    """PEFT's test for an embedding layer by name: ``re.match(rf"(.*\\.)?{e}$", name)`` for e in
    EMBEDDING_LAYER_NAMES."""
    return any(re.match(rf"(.*\.)?{e}$", name) for e in EMBEDDING_LAYER_NAMES)


def peft_magnitude_shape(layer: AdapterLayer) -> tuple[int, ...]:
    """PEFT stores a convolution's magnitude as (1, out, 1, ...); everything else as (out,).

    ``out`` is read off the magnitude (out,) itself, not off W0: a quantized W0 sharded by FSDP2 cannot be
    dequantized outside the layer's forward."""
    out = layer.magnitude.shape[0]
    if isinstance(layer, ConvAdapter):
        return (1, out) + (1,) * (layer.base_layer.weight.dim() - 2)
    return (out,)


def exact_name_list(names: Sequence[str], all_names: Sequence[str]) -> list[str] | str:
    """``names`` as PEFT ``target_modules`` that select exactly them: the plain list when no other
    module's name ends in ".<name>" (PEFT's suffix rule), else one anchored regular expression."""
    chosen = set(names)
    clash = any(other not in chosen and other.endswith("." + n) for n in names for other in all_names)
    if not clash:
        return sorted(names)
    return "(" + "|".join(re.escape(n) for n in sorted(names)) + ")"


def peft_target_matches(name: str, target_modules: str | Sequence[str]) -> bool:
    """PEFT's rule: a string is a regex matched against the whole name (in bounded time: a pattern too
    slow to match raises config.PatternError); a list item matches the name exactly or as a dotted suffix."""
    if isinstance(target_modules, str):
        return regex_fullmatch(target_modules, name, "target_modules")
    return name in target_modules or any(name.endswith("." + t) for t in target_modules)


def peft_config_dict(cfg: AdapterConfig, layers: Mapping[str, AdapterLayer], all_names: Sequence[str],
                     modules_to_save: Sequence[str], base_model_name_or_path: str | None,
                     task_type: str | None) -> dict[str, object]:
    """adapter_config.json for ``layers`` (name -> adapter), with every module named explicitly.

    target_modules lists the adapted modules by full name, and rank_pattern / alpha_pattern carry
    every module whose rank / alpha differs from r / lora_alpha, so any reader that follows PEFT's
    rules rebuilds exactly these adapters. A magnitude-only module is written as a rank-1 DoRA
    module with B = 0 (PEFT then computes m ⊙ W0 / ||W0||_c, which is exactly it).
    """
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for name, layer in layers.items():
        rank = 1 if layer.variant == "magnitude" else layer.rank
        if rank != cfg.rank:
            rank_pattern[name] = rank
        if layer.variant != "magnitude" and layer.alpha != cfg.alpha:
            alpha_pattern[name] = layer.alpha
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "target_modules": exact_name_list(list(layers), all_names),
        "lora_dropout": cfg.dropout,
        "fan_in_fan_out": any(isinstance(layer, Conv1DAdapter) for layer in layers.values()),
        "bias": cfg.bias,
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.method == "dora",
        "modules_to_save": sorted(modules_to_save) or None,
        "init_lora_weights": True if cfg.init == "kaiming" else "gaussian",
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "inference_mode": True,
    }


@dataclass(frozen=True)
class PeftFields:
    """What dorakit reads from a PEFT adapter_config.json, checked."""

    rank: int
    alpha: float
    use_dora: bool
    use_rslora: bool
    dropout: float
    bias: str
    target_modules: str | tuple[str, ...]
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    modules_to_save: tuple[str, ...]
    init: str


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON (JSON has no NaN or Infinity)")


def load_json(text: str | bytes, where: str, what: str = "") -> object:
    """json.loads that raises AdapterFileError naming ``where`` (and the field ``what``) for anything
    that is not plain JSON: a syntax error, bytes that are not UTF-8, NaN / Infinity, nesting too deep."""
    label = f"{where}: {what}" if what else where
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, huge integers and bad bytes are ValueErrors
        raise AdapterFileError(f"{label}: not valid JSON ({e}); the file is truncated or corrupt.") from None
    except RecursionError:
        raise AdapterFileError(f"{label}: JSON nested too deeply to be an adapter file; the file is corrupt.") from None


def check_patterns(raw: Mapping[str, object], targets: str | tuple[str, ...], where: str) -> None:
    """target_modules (when a regex), rank_pattern and alpha_pattern keys are valid, bounded regexes
    and the patterns' values are positive numbers (ranks: integers)."""
    try:
        if isinstance(targets, str) and targets != "all-linear":
            check_regex(targets, "target_modules")
        for field in ("rank_pattern", "alpha_pattern"):
            pattern = raw.get(field) or {}
            if not isinstance(pattern, dict):
                raise AdapterFileError(f"{where}: {field} must be a JSON object of pattern -> value, got {pattern!r}.")
            for key, value in pattern.items():
                check_regex(rf"(.*\.)?({key})$", f"{field} key {key!r}")
                kind = int if field == "rank_pattern" else (int, float)
                if isinstance(value, bool) or not isinstance(value, kind) or value <= 0 \
                        or not (isinstance(value, int) or math.isfinite(value)):
                    raise AdapterFileError(f"{where}: {field}[{key!r}] must be a positive "
                                           f"{'integer' if kind is int else 'number'}, got {value!r}.")
    except PatternError as e:
        raise AdapterFileError(f"{where}: {e}") from None


def _field(raw: Mapping[str, object], key: str, types: type | tuple[type, ...], default: object, where: str) -> object:
    value = raw.get(key, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise AdapterFileError(f"{where}: {key!r} must be {types}, got {value!r}.")
    if not isinstance(value, types):
        raise AdapterFileError(f"{where}: {key!r} has the wrong type ({type(value).__name__}: {value!r}); "
                               "the file is not a PEFT LoRA config or was edited by hand.")
    if isinstance(value, int) and float in (types if isinstance(types, tuple) else (types,)) \
            and abs(value) > 2**1000:
        raise AdapterFileError(f"{where}: {key!r} is {value}, too large for a float.")
    return value


def read_peft_fields(raw: Mapping[str, object], where: str) -> PeftFields:
    """Check a parsed adapter_config.json and return the fields dorakit uses.

    Raises AdapterFileError for another adapter type, a field dorakit does not implement, or a
    missing / ill-typed field (``where`` names the file in the message).
    """
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise AdapterFileError(f"{where}: peft_type is {peft_type!r}; dorakit loads LoRA / DoRA adapters "
                               "(peft_type 'LORA', with use_dora for DoRA). Use peft to load other adapter types.")
    for key, what in UNSUPPORTED.items():
        value = raw.get(key)
        if value not in (None, False, [], {}, ""):
            raise AdapterFileError(f"{where}: {key}={value!r} ({what}) is not supported by dorakit; load this "
                                   "adapter with peft, or re-save it without that option.")
    targets = raw.get("target_modules")
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets) and targets:
        targets = tuple(targets)
    elif not isinstance(targets, str) or not targets:
        raise AdapterFileError(f"{where}: target_modules must be a non-empty list of names or a regex string, "
                               f"got {targets!r}.")
    check_patterns(raw, targets, where)
    init = raw.get("init_lora_weights", True)
    to_save = _field(raw, "modules_to_save", list, None, where) or []
    if not all(isinstance(m, str) for m in to_save):
        raise AdapterFileError(f"{where}: modules_to_save must be a list of module names, got {to_save!r}.")
    return PeftFields(
        rank=_field(raw, "r", int, None, where) or _missing("r", where),
        alpha=float(_field(raw, "lora_alpha", (int, float), None, where) or _missing("lora_alpha", where)),
        use_dora=_field(raw, "use_dora", bool, False, where),
        use_rslora=_field(raw, "use_rslora", bool, False, where),
        dropout=float(_field(raw, "lora_dropout", (int, float), 0.0, where)),
        bias=_field(raw, "bias", str, "none", where),
        target_modules=targets,
        rank_pattern=_field(raw, "rank_pattern", dict, {}, where) or {},
        alpha_pattern=_field(raw, "alpha_pattern", dict, {}, where) or {},
        modules_to_save=tuple(to_save),
        init="gaussian" if init == "gaussian" else "kaiming",
    )


def _missing(key: str, where: str) -> object:
    raise AdapterFileError(f"{where}: the required field {key!r} is missing or zero; the config is truncated or "
                           "not a PEFT LoRA config.")


def strip_prefix(state: Mapping[str, Tensor], where: str) -> dict[str, Tensor]:
    """Keys without ``base_model.model.``; raises if a key lacks it (not a PEFT LoRA file)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if not key.startswith(PREFIX):
            raise AdapterFileError(f"{where}: tensor {key!r} does not start with {PREFIX!r}; this is not a PEFT "
                                   "LoRA adapter file.")
        out[key[len(PREFIX):]] = value
    return out
