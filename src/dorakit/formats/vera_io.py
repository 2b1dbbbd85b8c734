"""VeRA / DVoRA adapters on disk: save_vera_adapter and load_vera_adapter (the format: vera_format.py).

The shared A, B: by default (AdapterConfig.vera_save_projection=False) a file holds only the seed, as
the issue asks; PEFT then regenerates them from ``projection_prng_key`` (it warns that it relies on the
PRNG). dorakit writes the matrices' shapes and SHA-256 (DVoRA: in the config; VeRA: in the safetensors
metadata ``dorakit_projections``, since PEFT's config has no field for them); loading regenerates A, B
from the seed and refuses a file whose checksum or shapes differ. A file that holds the matrices
(PEFT's default save_projection=True) is loaded with them. As in io.py, every check runs before the
model is touched and the files are written atomically.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor, nn

from ..adapters.config import AdapterConfig
from ..adapters.inject import (
    AdapterPlan,
    InjectionReport,
    adapter_config,
    adapter_layers,
    install_adapters,
    plan_adapters,
)
from .io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    _modules_to_save,
    atomic_write_files,
    check_same_save,
    extra_state_dict,
    read_adapter_files,
    read_config_json,
)
from .loading import (
    _peft_modules_to_save,
    base_out_in,
    check_file_modules,
    check_floating,
    check_same_modules,
    extra_targets,
    group_tensors,
    write_tensors,
)
from .peft_format import (
    PREFIX,
    AdapterFileError,
    exact_name_list,
    strip_prefix,
)
from ..adapters.vera import VeraAdapter, VeraConv1DAdapter, VeraProjections, projection_checksum
from .vera_format import (
    BOUND_FIELDS,
    DVORA_FORMAT,
    MAGNITUDE_KEY,
    PEFT_TYPES,
    PROJECTION_KEYS,
    TO_PEFT_BIAS,
    VeraFields,
    read_vera_fields,
)

_KEY = re.compile(rf"^(.+)\.(vera_lambda_d|vera_lambda_b|{MAGNITUDE_KEY})$")
_KIND = {"vera_lambda_d": "d", "vera_lambda_b": "b", MAGNITUDE_KEY: "m"}


def _shared(layers: Mapping[str, nn.Module], where: str) -> VeraProjections:
    """The one VeraProjections that every adapter of ``layers`` holds."""
    found = {id(layer.vera_projections): layer.vera_projections for layer in layers.values()
             if isinstance(layer, VeraAdapter)}
    if len(found) != 1 or not all(isinstance(layer, VeraAdapter) for layer in layers.values()):
        raise AdapterFileError(f"{where}: the model's adapters do not all share one set of VeRA matrices; apply them "
                               "with one dk.apply_adapters(model, cfg) call.")
    return next(iter(found.values()))


def _projection_info(projections: VeraProjections, checksum: str) -> dict[str, object]:
    (a_shape, b_shape) = projections.shapes
    return {"seed": projections.seed, "vera_A_shape": list(a_shape), "vera_B_shape": list(b_shape), "sha256": checksum}


# ---- save ----------------------------------------------------------------------------------------

def save_vera_adapter(model: nn.Module, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                      task_type: str | None = None) -> Path:
    """Write a VeRA (PEFT's format) or DVoRA (dorakit's format) adapter; see the module docstring."""
    cfg = adapter_config(model)
    layers = dict(adapter_layers(model))
    projections = _shared(layers, str(directory))
    # Matrices loaded from a file that the seed does not regenerate must travel with the adapter.
    stored = cfg.vera_save_projection or not projections.matches_seed()
    checksum = projections.checksum()
    out: dict[str, Tensor] = {}
    for name, layer in layers.items():
        out[f"{name}.vera_lambda_d"], out[f"{name}.vera_lambda_b"] = layer.vera_lambda_d, layer.vera_lambda_b
        if cfg.method == "dvora":
            out[f"{name}.{MAGNITUDE_KEY}"] = layer.magnitude
    out.update(extra_state_dict(model, cfg, layers))
    tensors = {PREFIX + k: v for k, v in out.items()}
    if stored:
        tensors.update(zip(PROJECTION_KEYS, (projections.vera_A, projections.vera_B)))
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    names = [n for n, _ in model.named_modules() if n]
    to_save = _modules_to_save(model, cfg)
    config = {
        "peft_type": PEFT_TYPES[cfg.method], "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "r": cfg.rank, "target_modules": exact_name_list(list(layers), names),
        "projection_prng_key": projections.seed, "save_projection": stored, "vera_dropout": cfg.dropout,
        "d_initial": cfg.vera_d_initial, "bias": TO_PEFT_BIAS[cfg.bias],
        "fan_in_fan_out": any(isinstance(layer, VeraConv1DAdapter) for layer in layers.values()),
        "modules_to_save": sorted(to_save) or None, "init_weights": True, "layers_to_transform": None,
        "layers_pattern": None, "inference_mode": True,
    }
    info = _projection_info(projections, checksum)
    if cfg.method == "dvora":
        config.update({"dorakit_format": DVORA_FORMAT, "vera_A_shape": info["vera_A_shape"],
                       "vera_B_shape": info["vera_B_shape"], "projection_sha256": checksum, "norm_grad": cfg.norm_grad})
    metadata = {"format": "pt", "dorakit_config": json.dumps(cfg.to_dict()), "dorakit_projections": json.dumps(info),
                "dorakit_peft_fields": json.dumps({k: config[k] for k in BOUND_FIELDS})}
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_files({  # weights first, as io.save_adapter: a torn save is caught by dorakit_peft_fields
        path / WEIGHTS_NAME: save_safetensors_bytes(tensors, metadata),
        path / CONFIG_NAME: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
    })
    return path


# ---- read ----------------------------------------------------------------------------------------

def is_vera_adapter(model: nn.Module, directory: str | os.PathLike) -> bool:
    """Whether load_adapter should go here: the model has VeRA / DVoRA adapters, or the config says VeRA / DVoRA."""
    if any(isinstance(layer, VeraAdapter) for _, layer in adapter_layers(model)):
        return True
    try:
        raw = read_config_json(Path(directory) / CONFIG_NAME)
    except AdapterFileError:
        return False  # io.read_adapter reports it
    return isinstance(raw, dict) and raw.get("peft_type") in PEFT_TYPES.values()


# ---- load ----------------------------------------------------------------------------------------

def load_vera_adapter(model: nn.Module, directory: str | os.PathLike) -> InjectionReport | None:
    """Load a VeRA / DVoRA adapter onto ``model`` (what dk.load_adapter does for these files).

    On a plain model the adapters are built from the file (seed, rank, targets) and the InjectionReport
    is returned; on a model whose VeRA / DVoRA adapters match the file, their vectors are overwritten.

    Raises:
        AdapterFileError: a missing or corrupt file; an adapter for another base model (modules, shapes,
            or shared matrices of another size); a seed that differs from the model's adapters'; shared
            matrices that, regenerated from the seed, differ from those the adapter was saved with. The
            model is then unchanged.
    """
    where = str(Path(directory))
    raw, tensors, metadata = read_adapter_files(directory)
    fields = read_vera_fields(raw, metadata, where)
    check_same_save(directory, raw, metadata)
    stored = {k: tensors.pop(k) for k in PROJECTION_KEYS if k in tensors}
    check_floating({"base_model": {k.rpartition(".")[2]: v for k, v in stored.items()}}, where, {})
    if len(stored) == 1 or (fields.save_projection and not stored):
        raise AdapterFileError(f"{where}: save_projection is {fields.save_projection} but the file holds "
                               f"{sorted(stored) or 'neither'} of {list(PROJECTION_KEYS)}; the file is incomplete.")
    groups, rest = _split_keys(strip_prefix(tensors, where), fields.method, where)
    existing = dict(adapter_layers(model))
    plan: AdapterPlan | None = None
    if existing:
        _check_existing(model, existing, fields, groups, where)
        layers = existing
    else:
        cfg = _config_for(model, fields, groups, where)
        _check_sizes(model, fields, groups, stored, where)  # before the shared matrices are allocated
        try:
            plan = plan_adapters(model, cfg)
        except (ValueError, TypeError, RuntimeError) as e:
            if isinstance(e, AdapterFileError):
                raise
            raise AdapterFileError(f"{where}: cannot build this adapter on the model: {e}") from None
        layers = plan.wrappers
    projections = _shared(layers, where)
    new_projections = _check_projections(projections, fields, stored, plan is None, where)
    copies = [pair for name, layer in layers.items() for pair in _copies(name, layer, groups[name], where)]
    extra = extra_targets(model, fields.bias, fields.modules_to_save, rest, set(layers), where)
    report = install_adapters(model, plan) if plan is not None else None  # nothing below can fail
    if new_projections is not None:
        copies += [(projections.vera_A, new_projections[0]), (projections.vera_B, new_projections[1])]
    write_tensors(copies, rest, extra)
    return report


def _split_keys(tensors: Mapping[str, Tensor], method: str,
                where: str) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """Adapter tensors grouped by module ({"d", "b"[, "m"]}) and everything else."""
    groups, rest = group_tensors(tensors, _KEY, _KIND)
    check_floating(groups, where, {v: k for k, v in _KIND.items()})
    if not groups:
        raise AdapterFileError(f"{where}: the file holds no VeRA tensors (vera_lambda_d / vera_lambda_b).")
    need = {"d", "b", "m"} if method == "dvora" else {"d", "b"}
    for name, group in groups.items():
        if set(group) != need:
            raise AdapterFileError(f"{where}: module {name!r} has {sorted(group)} but a {method} module needs "
                                   f"{sorted(need)} (d, b{', m' if method == 'dvora' else ''}); the file is "
                                   "incomplete or its peft_type is wrong.")
    return groups, rest


def _config_for(model: nn.Module, fields: VeraFields, groups: Mapping[str, Mapping[str, Tensor]],
                where: str) -> AdapterConfig:
    """The AdapterConfig that rebuilds exactly the file's adapters on ``model``."""
    all_names = check_file_modules(model, groups, fields.target_modules, where)
    extra = fields.dorakit_config or {}
    try:
        return AdapterConfig(
            method=fields.method, rank=fields.rank, targets=exact_name_list(list(groups), all_names),
            dropout=fields.dropout, bias=fields.bias, vera_seed=fields.seed, vera_d_initial=fields.d_initial,
            vera_save_projection=fields.save_projection,
            modules_to_save=_peft_modules_to_save(all_names, fields.modules_to_save, where),
            norm_grad=str(extra.get("norm_grad", "detach")))
    except ValueError as e:
        raise AdapterFileError(f"{where}: {e}") from None


def _check_sizes(model: nn.Module, fields: VeraFields, groups: Mapping[str, Mapping[str, Tensor]],
                 stored: Mapping[str, Tensor], where: str) -> None:
    """Every size the file declares (r, the vectors, the shared matrices' shapes) against the file's tensors
    and the model, from sizes alone: a small file cannot make dorakit build huge shared matrices."""
    r = fields.rank
    shapes: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if name in groups and (out_in := base_out_in(module)) is not None:
            shapes[name] = out_in
    for name, (out, _) in shapes.items():
        for kind, want in (("d", (r,)), ("b", (out,)), ("m", (out,))):
            got = groups[name].get(kind)
            if got is not None and tuple(got.shape) != want:
                raise AdapterFileError(f"{where}: module {name!r}: vera_lambda_{kind if kind != 'm' else 'magnitude'} "
                                       f"is {tuple(got.shape)} in the file but r={r} on this model's "
                                       f"{type(model.get_submodule(name)).__name__} (out {out}) needs {want}; the "
                                       "adapter was made for a different base model, or its config and weights disagree.")
    if not shapes:
        return
    want = ((r, max(i for _, i in shapes.values())), (max(o for o, _ in shapes.values()), r))
    declared = [tuple(tuple(stored[k].shape) for k in PROJECTION_KEYS)] if stored else []
    if fields.projections is not None:
        declared.append((tuple(fields.projections["vera_A_shape"]), tuple(fields.projections["vera_B_shape"])))
    for got in declared:
        _same_projection_shapes(got, want, r, where)


def _same_projection_shapes(got: tuple, want: tuple, rank: int, where: str) -> None:
    if got != want:
        rank_note = (f" (r={rank} is larger than the file's matrices' rank {got[0][0]})"
                     if got[0] and got[0][0] < rank else "")
        raise AdapterFileError(f"{where}: the file's shared VeRA matrices are A {got[0]}, B {got[1]}, but this model's "
                               f"adapted modules need A {want[0]}, B {want[1]} (rank, largest in, largest out)"
                               f"{rank_note}; the adapter was made for a different base model or targets.")


def _check_existing(model: nn.Module, layers: Mapping[str, nn.Module], fields: VeraFields,
                    groups: Mapping[str, Mapping[str, Tensor]], where: str) -> None:
    """The model's adapters must be the file's: same modules, method, rank, seed and bias mode."""
    check_same_modules(layers, groups, where)
    for name, layer in layers.items():
        if not isinstance(layer, VeraAdapter) or layer.method != fields.method:
            kind = layer.method if isinstance(layer, VeraAdapter) else layer.variant
            raise AdapterFileError(f"{where}: module {name!r} is {kind} in the model but {fields.method} in the file; "
                                   "call dk.remove_adapters(model) first.")
        if layer.merged:
            raise AdapterFileError(f"{where}: module {name!r} is merged; call dk.unmerge_adapters(model) first.")
        if layer.rank != fields.rank:
            raise AdapterFileError(f"{where}: module {name!r} has rank {layer.rank} in the model but r={fields.rank} "
                                   "in the file.")
    seed = _shared(layers, where).seed
    if seed != fields.seed:
        raise AdapterFileError(f"{where}: the file's shared matrices come from seed (projection_prng_key) "
                               f"{fields.seed}, the model's adapters from seed {seed}; the adapter was trained on "
                               "other random matrices. Call dk.remove_adapters(model) and load it onto the plain model.")
    if adapter_config(model).bias != fields.bias:
        raise AdapterFileError(f"{where}: the model trains biases {adapter_config(model).bias!r} but the file has "
                               f"bias={fields.bias!r}.")


def _check_projections(projections: VeraProjections, fields: VeraFields, stored: Mapping[str, Tensor],
                       existing: bool, where: str) -> tuple[Tensor, Tensor] | None:
    """Check the model's shared matrices against the file's; returns the file's matrices to copy in, if any."""
    want = (tuple(projections.vera_A.shape), tuple(projections.vera_B.shape))
    if stored:
        got = tuple(tuple(stored[k].shape) for k in PROJECTION_KEYS)
    elif fields.projections is not None:
        got = (tuple(fields.projections["vera_A_shape"]), tuple(fields.projections["vera_B_shape"]))
    else:
        got = want  # a PEFT file without the matrices says nothing more than r (checked) and the seed
    _same_projection_shapes(got, want, fields.rank, where)
    checksum = (fields.projections or {}).get("sha256")
    if stored:
        matrices = (stored[PROJECTION_KEYS[0]], stored[PROJECTION_KEYS[1]])
        if checksum is not None and projection_checksum(*matrices) != checksum:
            raise AdapterFileError(f"{where}: the stored vera_A / vera_B do not match their SHA-256 in the file; the "
                                   "file is corrupt.")
        return matrices
    if checksum is not None and projections.checksum() != checksum:
        source = "the model's adapters" if existing else f"seed {fields.seed} (regenerated)"
        raise AdapterFileError(f"{where}: the shared VeRA matrices from {source} differ from those the adapter was "
                               "saved with (SHA-256 mismatch): another seed, or a torch whose generator draws other "
                               "numbers. Re-save the adapter with vera_save_projection=True to carry the matrices.")
    return None


def _copies(name: str, layer: VeraAdapter, group: Mapping[str, Tensor], where: str) -> list[tuple[Tensor, Tensor]]:
    """(destination, source) pairs for one module, after checking every shape."""
    pairs = [(layer.vera_lambda_d, group["d"]), (layer.vera_lambda_b, group["b"])]
    if "m" in group:
        pairs.append((layer.magnitude, group["m"]))
    for dst, src in pairs:
        if dst.shape != src.shape:
            raise AdapterFileError(f"{where}: module {name!r}: a vector is {tuple(src.shape)} in the file but this "
                                   f"model's {type(layer.base_layer).__name__} needs {tuple(dst.shape)}; the adapter "
                                   "was made for a different base model.")
    return pairs
