"""load_adapter: a PEFT LoRA / DoRA adapter directory onto a model, all-or-nothing.

Every check (file, config, module names, shapes, ranks) runs before the model is touched; the
adapters are built off-model (inject.plan_adapters), filled, then swapped in.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..adapters.config import AdapterConfig, PatternError, peft_pattern_matches
from ..adapters.inject import (
    AdapterPlan,
    InjectionReport,
    adapter_class,
    adapter_config,
    adapter_layers,
    install_adapters,
    plan_adapters,
)
from .io import WEIGHTS_NAME, AdapterFiles, embedding_modules, read_adapter
from ..adapters.layers import AdapterLayer, Conv1DAdapter, ConvAdapter, EmbeddingAdapter
from .peft_format import (
    MAGNITUDE,
    AdapterFileError,
    PeftFields,
    exact_name_list,
    peft_magnitude_shape,
    peft_target_matches,
)

_ADAPTER_KEY = re.compile(r"^(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|"
                          r"lora_magnitude_vector)$")
_KIND = {"lora_A.weight": "A", "lora_embedding_A": "A", "lora_B.weight": "B", "lora_embedding_B": "B",
         MAGNITUDE: "m"}


def load_lora_adapter(model: nn.Module, directory: str | os.PathLike) -> InjectionReport | None:
    """Load a PEFT LoRA / DoRA adapter (or one dorakit saved) onto ``model``.

    On a plain model the adapters are built from the file's config (as apply_adapters would, then
    filled with the file's tensors) and the InjectionReport is returned; on a model whose adapters
    already match the file, their tensors are overwritten and None is returned.

    Raises:
        AdapterFileError: a missing, pickled, truncated or corrupt file; an unsupported adapter type or
            option; an adapter for a different base (missing module, wrong shape); a config whose
            rank / alpha disagrees with the tensors or with the model's adapters. The model is then
            unchanged.
    """
    files = read_adapter(directory)
    where = str(Path(directory))
    groups, rest = _split_keys(files.tensors, where)
    existing = dict(adapter_layers(model))
    plan: AdapterPlan | None = None
    if existing:
        _check_existing(model, existing, files, groups, where)
        layers = existing
    else:
        cfg = _config_for(model, files, groups, where)
        # The base tensors (bias, modules_to_save, embedding weights) are shape-checked first, allocating
        # nothing: a resized vocabulary is then reported as such, with its fix, not as an adapter shape.
        extra_targets(model, files.fields.bias, files.fields.modules_to_save, rest, set(groups), where)
        check_sizes(model, groups, _variants(files, groups, where), where)  # before anything is allocated
        try:
            plan = plan_adapters(model, cfg)
        except (ValueError, TypeError, RuntimeError) as e:
            raise AdapterFileError(f"{where}: cannot build this adapter on the model: {e}") from None
        layers = plan.wrappers
    adapted = set(layers)
    extra = extra_targets(model, files.fields.bias, files.fields.modules_to_save, rest, adapted, where)
    copies = [pair for name, layer in layers.items() for pair in _adapter_copies(name, layer, groups[name], where)]
    report = install_adapters(model, plan) if plan is not None else None  # nothing below can fail
    write_tensors(copies, rest, extra)
    return report


def group_tensors(tensors: Mapping[str, Tensor], key: re.Pattern[str],
                  kinds: Mapping[str, str]) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """Tensors whose key matches ``key`` ("<module>.<suffix>") grouped by module as {kinds[suffix]: tensor},
    and every other tensor."""
    groups: dict[str, dict[str, Tensor]] = {}
    rest: dict[str, Tensor] = {}
    for name, value in tensors.items():
        match = key.match(name)
        if match:
            groups.setdefault(match.group(1), {})[kinds[match.group(2)]] = value
        else:
            rest[name] = value
    return groups, rest


def write_tensors(copies: Sequence[tuple[Tensor, Tensor]], rest: Mapping[str, Tensor],
                  extra: Mapping[str, Tensor]) -> None:
    """The last step of a load, after every check: copy each (destination, source) pair and each
    bias / modules_to_save tensor into the model (PEFT's .original_module. copies have no target)."""
    with torch.no_grad():
        for dst, src in copies:
            dst.copy_(src)
        for key, src in rest.items():
            dst = extra.get(key)
            if dst is not None:
                dst.copy_(src)


def _split_keys(tensors: Mapping[str, Tensor], where: str) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """Adapter tensors grouped by module ({"A", "B", "m"}) and everything else."""
    groups, rest = group_tensors(tensors, _ADAPTER_KEY, _KIND)
    check_floating(groups, where, {v: k for k, v in _KIND.items()})
    for name, group in groups.items():
        if "A" not in group or "B" not in group:
            raise AdapterFileError(f"{where}: module {name!r} has {sorted(group)} but needs both lora_A and lora_B; "
                                   "the file is incomplete.")
    if not groups:
        raise AdapterFileError(f"{where}: the file holds no LoRA tensors (lora_A / lora_B).")
    return groups, rest


def _variants(files: AdapterFiles, groups: Mapping[str, Mapping[str, Tensor]], where: str) -> dict[str, str]:
    default = "dora" if files.fields.use_dora else "lora"
    variants = dict(files.variants) if files.variants is not None else {n: default for n in groups}
    if set(variants) != set(groups) or not set(variants.values()) <= {"lora", "dora", "magnitude"}:
        raise AdapterFileError(f"{where}: the dorakit metadata does not describe the file's modules; re-save it.")
    for name, variant in variants.items():
        has_m = "m" in groups[name]
        if has_m != (variant != "lora"):
            state = "has" if has_m else "lacks"
            raise AdapterFileError(f"{where}: module {name!r} {state} a {MAGNITUDE} but use_dora is "
                                   f"{files.fields.use_dora}; the config and the weights disagree.")
    return variants


def _pattern(pattern: Mapping[str, object], name: str, default: object, what: str) -> object:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key k with re.match(rf"(.*\\.)?({k})$", name),
    in bounded time (config.peft_pattern_matches)."""
    for key, value in pattern.items():
        if peft_pattern_matches(key, name, f"{what} key {key!r}"):
            return value
    return default


def check_floating(groups: Mapping[str, Mapping[str, Tensor]], where: str, labels: Mapping[str, str]) -> None:
    """Adapter tensors are floating point: an integer or bool one would be cast silently. ``labels``:
    kind -> the key's suffix in the file, for the message."""
    for name, group in groups.items():
        for kind, tensor in group.items():
            if not tensor.is_floating_point():
                raise AdapterFileError(f"{Path(where) / WEIGHTS_NAME}: tensor {name}.{labels.get(kind, kind)} has dtype "
                                       f"{tensor.dtype}; adapter tensors must be float16, bfloat16, float32 or "
                                       "float64 (nothing is cast silently). Re-save the adapter in a floating dtype.")


def base_out_in(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of the (out, in) view an adapter of ``module`` uses, from sizes alone (nothing computed or
    allocated); None if dorakit cannot adapt it."""
    cls = adapter_class(module)
    if cls is None:
        return None
    if issubclass(cls, EmbeddingAdapter):
        return module.embedding_dim, module.num_embeddings
    if issubclass(cls, Conv1DAdapter):
        return module.weight.shape[1], module.weight.shape[0]
    if issubclass(cls, ConvAdapter):
        return module.weight.shape[0], math.prod(module.weight.shape[1:])
    return module.out_features, module.in_features  # nn.Linear, bitsandbytes Linear4bit


def _planned_shapes(module: nn.Module, rank: int, variant: str) -> dict[str, tuple[int, ...]] | None:
    """The file's tensor shapes that an adapter of ``rank`` on ``module`` takes (as the layer classes'
    _lora_A_shape / _lora_B_shape and peft_magnitude_shape), from sizes alone; None: not adaptable."""
    out_in = base_out_in(module)
    if out_in is None:
        return None
    out, inp = out_in
    a, b, m = (rank, inp), (out, rank), (out,)
    if issubclass(adapter_class(module), ConvAdapter):  # type: ignore[arg-type]
        kernel = tuple(module.weight.shape[2:])
        a, b, m = (rank, *module.weight.shape[1:]), (out, rank) + (1,) * len(kernel), (1, out) + (1,) * len(kernel)
    return {"m": m} if variant == "magnitude" else ({"A": a, "B": b, "m": m} if variant == "dora" else {"A": a, "B": b})


def check_sizes(model: nn.Module, groups: Mapping[str, Mapping[str, Tensor]], variants: Mapping[str, str],
                where: str) -> None:
    """The file's tensors have the shapes of the adapters about to be built (rank = lora_A's rows, which
    _config_for matched to the config): checked from sizes before anything is allocated, so a small file
    cannot make dorakit allocate a huge adapter (memory amplification)."""
    for name, module in model.named_modules():  # model order, as the checks after building
        group = groups.get(name)
        if group is None:
            continue
        rank = group["A"].shape[0] if group["A"].dim() else 0
        shapes = _planned_shapes(module, rank, variants[name])
        for kind, shape in (shapes or {}).items():  # None: plan_adapters names the module it cannot adapt
            got = tuple(group[kind].shape)
            if got != shape:
                label = {"A": "lora_A", "B": "lora_B", "m": MAGNITUDE}[kind]
                raise AdapterFileError(f"{where}: module {name!r}: {label} is {got} in the file but this model's "
                                       f"{type(module).__name__} needs {shape}; the adapter was made for a different "
                                       "base model.")


def _file_rank_alpha(fields: PeftFields, name: str, where: str) -> tuple[int, float]:
    try:
        rank = _pattern(fields.rank_pattern, name, fields.rank, "rank_pattern")
        alpha = _pattern(fields.alpha_pattern, name, fields.alpha, "alpha_pattern")
    except PatternError as e:
        raise AdapterFileError(f"{where}: {e}") from None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0 or isinstance(alpha, bool) \
            or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise AdapterFileError(f"{where}: module {name!r}: rank {rank!r} / alpha {alpha!r} from the config are invalid.")
    return rank, float(alpha)


def check_file_modules(model: nn.Module, modules_in_file: Iterable[str], target_modules: str | Sequence[str],
                       where: str) -> list[str]:
    """Every module the file has tensors for exists in ``model`` and is selected by the file's own
    target_modules (PEFT's rule); returns the model's module names."""
    names = [n for n, _ in model.named_modules() if n]
    known = set(names)
    missing = sorted(n for n in modules_in_file if n not in known)
    if missing:
        raise AdapterFileError(f"{where}: this adapter is for a different base model: it has tensors for module "
                               f"{missing[0]!r} ({len(missing)} missing in all), which this model lacks.")
    if target_modules != "all-linear":
        try:
            stray = sorted(n for n in modules_in_file if not peft_target_matches(n, target_modules))
        except PatternError as e:
            raise AdapterFileError(f"{where}: {e}") from None
        if stray:
            raise AdapterFileError(f"{where}: the file holds tensors for {stray[0]!r}, which target_modules "
                                   f"{target_modules!r} does not select; the config and the weights disagree.")
    return names


def _config_for(model: nn.Module, files: AdapterFiles, groups: Mapping[str, Mapping[str, Tensor]],
                where: str) -> AdapterConfig:
    """The AdapterConfig that rebuilds exactly the file's adapters on ``model``."""
    f = files.fields
    all_names = check_file_modules(model, groups, f.target_modules, where)
    variants = _variants(files, groups, where)
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for name, variant in variants.items():
        rank, alpha = _file_rank_alpha(f, name, where)
        rows = groups[name]["A"].shape[0]
        if variant != "magnitude" and rows != rank:
            raise AdapterFileError(f"{where}: module {name!r}: the config gives rank {rank} (r / rank_pattern) but "
                                   f"lora_A has {rows} rows; the config and the weights disagree.")
        if variant != "magnitude" and rank != f.rank:
            rank_pattern[re.escape(name)] = rank
        if variant != "magnitude" and alpha != f.alpha:
            alpha_pattern[re.escape(name)] = alpha
    direction = [n for n, v in variants.items() if v != "magnitude"]
    magnitude = [n for n, v in variants.items() if v == "magnitude"]
    if not direction:
        raise AdapterFileError(f"{where}: every module is magnitude-only; dorakit needs at least one LoRA/DoRA module.")
    targets = exact_name_list(direction, all_names)
    mag = exact_name_list(magnitude, all_names) if magnitude else []
    extra = files.dorakit_config or {}
    try:
        return AdapterConfig(
            method="dora" if f.use_dora else "lora", rank=f.rank, alpha=f.alpha,
            targets=targets, magnitude_only=["re:" + mag] if isinstance(mag, str) else mag,
            dropout=f.dropout, use_rslora=f.use_rslora, bias=f.bias, rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern, modules_to_save=_peft_modules_to_save(all_names, f.modules_to_save, where),
            init=str(extra.get("init", f.init)), norm_grad=str(extra.get("norm_grad", "detach")))
    except ValueError as e:
        raise AdapterFileError(f"{where}: {e}") from None


def _peft_modules_to_save(all_names: list[str], patterns: tuple[str, ...], where: str) -> list[str]:
    """PEFT's modules_to_save, resolved to the full names of the outermost matching modules.

    PEFT's rule is a plain ``name.endswith(pattern)`` (no dot boundary), followed here exactly."""
    chosen = []
    for pattern in patterns:
        found = [n for n in all_names if n.endswith(pattern)]
        if not found:
            raise AdapterFileError(f"{where}: modules_to_save names {pattern!r}, which this model lacks.")
        chosen += found
    return [n for n in chosen if not any(n.startswith(o + ".") for o in chosen)]


def check_same_modules(layers: Mapping[str, nn.Module], groups: Mapping[str, Mapping[str, Tensor]],
                       where: str) -> None:
    """A model that already has adapters takes only a file for exactly those modules."""
    if set(layers) != set(groups):
        only_model, only_file = sorted(set(layers) - set(groups)), sorted(set(groups) - set(layers))
        raise AdapterFileError(f"{where}: the model's adapters differ from the file's (only in the model: "
                               f"{only_model[:3]}, only in the file: {only_file[:3]}); call "
                               "dk.remove_adapters(model) first to load onto the plain model.")


def _check_existing(model: nn.Module, layers: Mapping[str, AdapterLayer], files: AdapterFiles,
                    groups: Mapping[str, Mapping[str, Tensor]], where: str) -> None:
    """The model's adapters must be the file's: same modules, variants, ranks, alphas, scaling rule."""
    check_same_modules(layers, groups, where)
    variants = _variants(files, groups, where)
    cfg = adapter_config(model)
    for name, layer in layers.items():
        if layer.merged:
            raise AdapterFileError(f"{where}: module {name!r} is merged; call dk.unmerge_adapters(model) first.")
        rank, alpha = _file_rank_alpha(files.fields, name, where)
        if layer.variant != variants[name]:
            raise AdapterFileError(f"{where}: module {name!r} is {layer.variant} in the model but {variants[name]} "
                                   "in the file.")
        if layer.variant != "magnitude" and (layer.rank, layer.alpha, layer.use_rslora) != \
                (rank, alpha, files.fields.use_rslora):
            raise AdapterFileError(f"{where}: module {name!r} has (rank, alpha, use_rslora) = ({layer.rank}, "
                                   f"{layer.alpha}, {layer.use_rslora}) in the model but ({rank}, {alpha}, "
                                   f"{files.fields.use_rslora}) in the file's config.")
    if cfg.bias != files.fields.bias:
        raise AdapterFileError(f"{where}: the model trains biases {cfg.bias!r} but the file has bias={files.fields.bias!r}.")


def _adapter_copies(name: str, layer: AdapterLayer, group: Mapping[str, Tensor],
                    where: str) -> list[tuple[Tensor, Tensor]]:
    """(destination, source) pairs for one module, after checking every shape."""
    rank = 1 if layer.variant == "magnitude" else layer.rank
    what = type(layer.base_layer).__name__
    expected = {"A": layer._lora_A_shape(rank), "B": layer._lora_B_shape(rank)}
    if layer.variant != "lora":
        expected["m"] = peft_magnitude_shape(layer)
    for kind, shape in expected.items():
        got = tuple(group[kind].shape)
        if got != tuple(shape):
            label = {"A": "lora_A", "B": "lora_B", "m": MAGNITUDE}[kind]
            raise AdapterFileError(f"{where}: module {name!r}: {label} is {got} in the file but this model's {what} "
                                   f"needs {tuple(shape)}; the adapter was made for a different base model.")
    if layer.variant == "magnitude":
        if group["B"].count_nonzero():
            raise AdapterFileError(f"{where}: module {name!r} is magnitude-only but its lora_B is not zero.")
        return [(layer.magnitude, group["m"].reshape(-1))]
    pairs = [(layer.lora_A, group["A"]), (layer.lora_B, group["B"])]
    if layer.variant == "dora":
        pairs.append((layer.magnitude, group["m"].reshape(-1)))
    return pairs


def extra_targets(model: nn.Module, bias: str, modules_to_save: Sequence[str], rest: Mapping[str, Tensor],
                  adapted: set[str], where: str) -> dict[str, Tensor]:
    """Model tensors for the file's bias and modules_to_save entries (shape-checked); others raise."""
    all_names = [n for n, _ in model.named_modules() if n]
    to_save = _peft_modules_to_save(all_names, modules_to_save, where) if modules_to_save else []
    embeddings = set(embedding_modules(model))  # PEFT writes only the model's get_input/output_embeddings
    targets: dict[str, Tensor] = {}
    plain: dict[str, str] = {}  # embedding module -> a key of its plain weights (the resized-vocabulary case)
    for key, value in rest.items():
        if ".original_module." in key:  # PEFT also stores the untouched original of a modules_to_save module
            continue
        path, _, attr = key.replace(".modules_to_save.", ".").rpartition(".")
        owner = path.removesuffix(".base_layer")
        saved = any(path == s or path.startswith(s + ".") for s in to_save)
        is_bias = attr == "bias" and (bias == "all" or (bias == "lora_only" and owner in adapted
                                                                and path.endswith(".base_layer")))
        plain_form = path in embeddings and path not in adapted  # <e>.weight: an embedding without adapter
        is_embedding = not (saved or is_bias) and (plain_form or (
            path == owner + ".base_layer" and owner in adapted and owner in embeddings))  # <e>.base_layer.weight
        if not (saved or is_bias or is_embedding):
            raise AdapterFileError(f"{where}: unexpected tensor {key!r}: not an adapter tensor, not a bias under "
                                   f"bias={bias!r}, not in modules_to_save {list(modules_to_save)}, not a weight "
                                   f"of the model's embeddings {sorted(embeddings)}.")
        module = _get_module(model, owner if owner in adapted else path)
        if isinstance(module, AdapterLayer):
            module = module.base_layer
        dst = None if module is None else (module._parameters.get(attr) if attr in module._parameters
                                           else module._buffers.get(attr))
        if dst is None:
            raise AdapterFileError(f"{where}: tensor {key!r} has no counterpart in this model; the adapter was made "
                                   "for a different base model.")
        if value.is_floating_point() != dst.is_floating_point() or not (dst.is_floating_point() or dst.dtype == value.dtype):
            raise AdapterFileError(f"{where}: tensor {key!r} has dtype {value.dtype} in the file but {dst.dtype} in this "
                                   "model; nothing is cast silently: re-save the adapter from a matching model.")
        if dst.shape != value.shape:
            hint = _resize_hint(value, dst) if is_embedding else "the adapter was made for a different base model."
            raise AdapterFileError(f"{where}: tensor {key!r} is {tuple(value.shape)} in the file but "
                                   f"{tuple(dst.shape)} in this model; {hint}")
        targets[key] = dst
        if is_embedding and plain_form:
            plain.setdefault(path, key)
    _check_embedding_set(plain, embeddings - adapted, where)
    _check_tied_copies(targets, rest, where)
    for name in to_save:
        for sub in _get_module(model, name).state_dict():
            if f"{name}.{sub}" not in targets and f"{name}.modules_to_save.{sub}" not in targets:
                raise AdapterFileError(f"{where}: modules_to_save module {name!r} lacks {sub!r} in the file; "
                                       "the file is incomplete.")
    return targets


def _resize_hint(value: Tensor, dst: Tensor) -> str:
    """What to do about an embedding weight of another shape (PEFT's load_state_dict refuses it too)."""
    if value.dim() == dst.dim() and value.shape[1:] == dst.shape[1:]:  # only the vocabulary axis differs
        return (f"the adapter was trained with a vocabulary of {value.shape[0]} tokens; resize the model's "
                f"embeddings first (transformers: model.resize_token_embeddings({value.shape[0]})) and load again.")
    return "the adapter was made for a different base model."


def _check_embedding_set(found: Mapping[str, str], plain: set[str], where: str) -> None:
    """PEFT writes a plain embedding's weights (``<e>.weight``, its vocabulary-resize case) for every
    embedding of the model that has no adapter, all together; a file holding only some of them was
    not written by PEFT's save_embedding_layers, and its tensor is refused as unexpected.

    ``found``: embedding module -> one of its keys in the file; ``plain``: the model's unadapted embeddings."""
    if found and set(found) != plain:
        key = next(iter(found.values()))
        raise AdapterFileError(f"{where}: unexpected tensor {key!r}: PEFT's save_embedding_layers writes the weights "
                               f"of all of the model's embeddings {sorted(plain)} together, but the file lacks "
                               f"{sorted(plain - set(found))}; the adapter was made for a different base model.")


def _check_tied_copies(targets: Mapping[str, Tensor], rest: Mapping[str, Tensor], where: str) -> None:
    """Two file tensors bound for one tied model tensor (e.g. embed_tokens.weight and lm_head.weight of a
    model with tied embeddings) must be equal; otherwise which one wins would depend on the key order."""
    first: dict[int, str] = {}
    for key, dst in targets.items():
        other = first.setdefault(id(dst), key)
        if other != key and not torch.equal(rest[other], rest[key]):
            raise AdapterFileError(f"{where}: tensors {other!r} and {key!r} differ, but this model ties them (one "
                                   "shared weight); the adapter was made for a model with untied embeddings.")


def _get_module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
