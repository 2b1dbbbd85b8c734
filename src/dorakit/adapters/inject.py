"""Model surgery: find target modules, swap in adapter wrappers by name, and undo it.

No class or global patching: ``apply_adapters`` replaces each matched child with ``setattr`` on its
parent, and ``remove_adapters`` / ``merge_and_unload`` put plain modules back the same way.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import nn
from torch.nn.utils import parametrize

from .config import ALL_LINEAR, AdapterConfig, regex_fullmatch
from .layers import (
    AdapterLayer,
    AdapterStateError,
    Conv1DAdapter,
    ConvAdapter,
    EmbeddingAdapter,
    LinearAdapter,
    Variant,
)
from .quant import (
    Linear4bitAdapter,
    Linear8bitAdapter,
    QuantizedLinearAdapter,
    is_linear4bit,
    is_linear8bit,
)
from .vera import VERA_METHODS, build_vera_adapters


class TargetError(ValueError):
    """A target pattern matches nothing, or matches a module dorakit cannot adapt."""


def _is_hf_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def _plain(module: nn.Module, base: type[nn.Module]) -> bool:
    """An instance of ``base`` whose class does not replace base's forward (e.g. not a 4-bit Linear)
    and whose weight is a plain parameter (not computed by torch.nn.utils.parametrize)."""
    return (isinstance(module, base) and type(module).forward is base.forward
            and not parametrize.is_parametrized(module))


# First match wins (PEFT's dispatch list, not an if-chain).
DISPATCH: list[tuple[Callable[[nn.Module], bool], type[AdapterLayer]]] = [
    (is_linear4bit, Linear4bitAdapter),  # before nn.Linear: Linear4bit subclasses it (_plain rejects it anyway)
    (is_linear8bit, Linear8bitAdapter),  # likewise Linear8bitLt
    (lambda m: _plain(m, nn.Linear), LinearAdapter),
    (_is_hf_conv1d, Conv1DAdapter),
    (lambda m: any(_plain(m, c) for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d)), ConvAdapter),
    (lambda m: _plain(m, nn.Embedding), EmbeddingAdapter),
]
SUPPORTED = ("nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, transformers Conv1D, bitsandbytes Linear4bit "
             "and Linear8bitLt")


def adapter_class(module: nn.Module) -> type[AdapterLayer] | None:
    """The wrapper class for ``module``, or None if dorakit cannot adapt it."""
    for accepts, cls in DISPATCH:
        if accepts(module):
            return cls
    return None


def pattern_matches(name: str, pattern: str, what: str = "pattern") -> bool:
    """One list item of a target pattern (see AdapterConfig) against a dotted module name.

    A "re:" pattern is matched in bounded time (config.regex_fullmatch): one too slow raises PatternError."""
    if pattern.startswith("re:"):
        return regex_fullmatch(pattern[3:], name, what)
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)
    return name == pattern or name.endswith("." + pattern)


@dataclass(frozen=True)
class WrappedModule:
    """One module that apply_adapters wrapped."""

    name: str
    base_type: str
    variant: Variant
    rank: int
    alpha: float
    shape: tuple[int, int]
    """(out, in) of the base weight's (out, in) view."""


@dataclass(frozen=True)
class InjectionReport:
    """What apply_adapters did."""

    wrapped: tuple[WrappedModule, ...]

    @property
    def names(self) -> list[str]:
        return [w.name for w in self.wrapped]

    def __len__(self) -> int:
        return len(self.wrapped)

    def __str__(self) -> str:
        lines = [f"dorakit wrapped {len(self.wrapped)} modules:"]
        lines += [f"  {w.name}: {w.base_type} {w.shape[0]}x{w.shape[1]} -> {w.variant}"
                  + (f" r={w.rank} alpha={w.alpha:g}" if w.variant != "magnitude" else "") for w in self.wrapped]
        return "\n".join(lines)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """(name, layer) for every dorakit adapter in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


CONFIG_ATTR = "dorakit_config"
"""The model attribute holding the AdapterConfig of its adapters (set by apply_adapters)."""
NAMES_ATTR = "dorakit_adapters"
"""The model attribute holding {name: AdapterConfig} once named adapters are used (adapters/multi.py)."""

HEAD_NAMES = ("lm_head", "classifier", "score")
"""Leaf names of output / classification heads that "all-linear" leaves out (as PEFT does)."""


def _all_linear(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Every nn.Linear / Conv1D except heads, modules_to_save and nn.MultiheadAttention's projections."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    modules = dict(model.named_modules())
    chosen = []
    for name, module in modules.items():
        parent = modules[name.rpartition(".")[0]] if "." in name else model
        if (not name or module is head or name.rpartition(".")[2] in HEAD_NAMES
                or any(pattern_matches(name, p, "modules_to_save") for p in cfg.modules_to_save)
                or isinstance(parent, nn.MultiheadAttention)):
            continue
        if _plain(module, nn.Linear) or _is_hf_conv1d(module) or is_linear4bit(module) or is_linear8bit(module):
            chosen.append(name)
    return chosen


def _select(model: nn.Module, cfg: AdapterConfig) -> dict[str, Variant]:
    """Module name -> variant for every module the config selects; raises on anything unusable."""
    names = [name for name, _ in model.named_modules() if name]
    modules = dict(model.named_modules())
    chosen: dict[str, Variant] = {}
    if cfg.targets == ALL_LINEAR:
        chosen = dict.fromkeys(_all_linear(model, cfg), cfg.method)  # type: ignore[arg-type]
        if not chosen:
            raise TargetError("targets='all-linear' found no nn.Linear or Conv1D module (besides heads); "
                              "name the modules to adapt, e.g. targets=['query', 'value'].")
    elif isinstance(cfg.targets, str):
        regex = cfg.targets.removeprefix("re:")
        chosen = {n: cfg.method for n in names if regex_fullmatch(regex, n, "targets")}  # type: ignore[misc]
        if not chosen:
            hint = (f" A single string is a regex over the whole dotted name; for a module-name suffix write "
                    f"targets=[{cfg.targets!r}]." if re.fullmatch(r"[\w.]+", cfg.targets) else "")
            raise TargetError(f"targets regex {cfg.targets!r} matches no module name.{hint}{_close(regex, names)}")
    else:
        chosen = _match_list(cfg.targets, names, "targets", cfg.method)  # type: ignore[arg-type]
    magnitude = _match_list(cfg.magnitude_only, names, "magnitude_only", "magnitude")
    both = sorted(set(chosen) & set(magnitude))
    if both:
        raise TargetError(f"{both[:5]} match both targets and magnitude_only; a module gets one adapter. "
                          "Narrow targets (name the modules instead of a regex or 'all-linear') or magnitude_only.")
    chosen.update(magnitude)
    chosen = {n: chosen[n] for n in names if n in chosen}  # model order
    for name in chosen:
        module = modules[name]
        if adapter_class(module) is None:
            raise TargetError(f"module {name!r} ({type(module).__name__}) matched a target but dorakit cannot adapt "
                              f"it; supported: {SUPPORTED}. Use a more specific pattern.")
        parent = modules[name.rpartition(".")[0]] if "." in name else model
        if isinstance(parent, nn.MultiheadAttention):
            raise TargetError(f"module {name!r} belongs to nn.MultiheadAttention, which reads its weights directly "
                              "instead of calling the submodule; it cannot be wrapped.")
    return chosen


def _match_list(patterns: tuple[str, ...], names: list[str], field: str, variant: Variant) -> dict[str, Variant]:
    chosen: dict[str, Variant] = {}
    for pattern in patterns:
        hits = [n for n in names if pattern_matches(n, pattern, field)]
        if not hits:
            raise TargetError(f"{field} pattern {pattern!r} matches no module.{_close(pattern, names)}")
        chosen.update(dict.fromkeys(hits, variant))
    return chosen


def _close(pattern: str, names: list[str]) -> str:
    """A hint listing module names close to a pattern that matched nothing."""
    leaves = sorted({n.rpartition(".")[2] for n in names})
    bare = pattern.removeprefix("re:").rpartition(".")[2]
    close = difflib.get_close_matches(bare, leaves, n=5, cutoff=0.5)
    if not close:
        close = [leaf for leaf in leaves if not leaf.isdigit()][:12] or leaves[:12]
        return f" Module names in this model end in: {close}."
    return f" Close module names: {close}."


def _check_not_tied(model: nn.Module, chosen: dict[str, Variant]) -> None:
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if weight is not None:
            owners.setdefault(id(weight), []).append(name)
    for name in chosen:
        sharing = owners[id(model.get_submodule(name).weight)]
        others = [n for n in sharing if n != name]
        if others:
            raise TargetError(f"module {name!r} shares its weight with {others} (tied weights); adapting it would "
                              "also change those on merge. Leave it out of targets.")


@dataclass
class AdapterPlan:
    """Adapters built for a model but not yet installed (see plan_adapters / install_adapters)."""

    cfg: AdapterConfig
    wrappers: dict[str, AdapterLayer]
    """Module name -> its adapter (holding the original module as base_layer)."""
    modules_to_save: list[str]
    """Full names of the modules trained in full."""


def apply_adapters(model: nn.Module, cfg: AdapterConfig) -> InjectionReport:
    """Wrap every module that ``cfg`` selects, in place, and freeze everything else.

    Trainable afterwards: each adapter's A, B and magnitude, the biases that ``cfg.bias`` names and
    every parameter of ``cfg.modules_to_save``. All other parameters get requires_grad=False.

    Raises:
        TargetError: a pattern matches nothing (with close names), or a matched module cannot be
            adapted, or its weight is tied to another module.
        ValueError: a per-layer misfit (the module is named). A rank above min(out, in) only warns.
        RuntimeError: the model already has dorakit adapters (or is a PEFT model).
    """
    return install_adapters(model, plan_adapters(model, cfg))


def plan_adapters(model: nn.Module, cfg: AdapterConfig) -> AdapterPlan:
    """Check ``cfg`` against ``model`` and build every adapter, without changing the model.

    Raises as apply_adapters does; on success install_adapters cannot fail.
    """
    existing = [n for n, _ in adapter_layers(model)]
    if existing:
        raise RuntimeError(f"the model already has {len(existing)} dorakit adapters (e.g. {existing[0]!r}); call "
                           "dk.remove_adapters(model) or dk.merge_and_unload(model) before applying again.")
    if any(type(m).__module__.startswith("peft.") for m in model.modules()):
        raise RuntimeError("this model contains PEFT adapter modules; unload them first (peft's merge_and_unload "
                           "or unload) or load the PEFT adapter with dorakit instead.")
    chosen = _select(model, cfg)
    _check_not_tied(model, chosen)
    all_names = [n for n, _ in model.named_modules() if n]
    to_save = list(_match_list(cfg.modules_to_save, all_names, "modules_to_save", "lora"))
    for name in to_save:
        inside = [t for t in chosen if t == name or t.startswith(name + ".")]
        if inside:
            raise TargetError(f"modules_to_save {name!r} is or contains adapted modules ({inside[:3]}); a module is "
                              "either adapted or trained in full. Narrow one of the two patterns.")
    if cfg.method in VERA_METHODS:  # the modules share one random A, B sized to the largest: built together
        bases = {name: model.get_submodule(name) for name in chosen}
        return AdapterPlan(cfg, dict(build_vera_adapters(bases, cfg, adapter_class)), to_save)
    wrappers: dict[str, AdapterLayer] = {}
    no_dropout = []
    for name, variant in chosen.items():
        base = model.get_submodule(name)
        rank, alpha = cfg.rank_alpha_for(name)
        cls = adapter_class(base)
        dropout = cfg.dropout if variant != "magnitude" and cls.supports_dropout else 0.0
        if dropout != cfg.dropout and variant != "magnitude":
            no_dropout.append(name)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                wrappers[name] = cls(base, variant, rank, alpha, use_rslora=cfg.use_rslora,  # type: ignore[misc]
                                     dropout=dropout, init=cfg.init, norm_grad=cfg.norm_grad,
                                     backend=cfg.backend)
        except (ValueError, TypeError) as e:
            raise type(e)(f"module {name!r}: {e}") from None
        for w in caught:  # re-issued with the module's name
            warnings.warn(f"module {name!r}: {w.message}", w.category, stacklevel=3)
    if no_dropout:
        warnings.warn(f"dropout={cfg.dropout} does not apply to embedding adapters (as in PEFT); "
                      f"{len(no_dropout)} run without it: {no_dropout[:3]}.", stacklevel=3)
    return AdapterPlan(cfg, wrappers, to_save)


def install_adapters(model: nn.Module, plan: AdapterPlan) -> InjectionReport:
    """Swap the planned adapters into ``model`` and set what trains (see apply_adapters)."""
    for param in model.parameters():
        param.requires_grad_(False)
    report = []
    for name, wrapper in plan.wrappers.items():
        wrapper.train(wrapper.base_layer.training)  # a wrapper follows the train/eval mode of what it replaces
        _set_child(model, name, wrapper)
        for p in wrapper.parameters(recurse=False):  # A, B, magnitude; VeRA's d, b (never the base layer's)
            p.requires_grad_(True)
        out_f, in_f = wrapper.weight_2d().shape
        report.append(WrappedModule(name, type(wrapper.base_layer).__name__, wrapper.variant, wrapper.rank,
                                    wrapper.alpha, (out_f, in_f)))
    _unfreeze_extras(model, plan.cfg, list(plan.wrappers), plan.modules_to_save)
    model.__dict__[CONFIG_ATTR] = plan.cfg  # what save_adapter writes; removed with the adapters
    return InjectionReport(tuple(report))


def adapter_config(model: nn.Module) -> AdapterConfig:
    """The AdapterConfig that apply_adapters (or load_adapter) used on ``model``."""
    cfg = model.__dict__.get(CONFIG_ATTR)
    if cfg is None or not any(True for _ in adapter_layers(model)):
        raise RuntimeError("the model has no dorakit adapters applied by dk.apply_adapters or dk.load_adapter; "
                           "apply or load adapters first.")
    return cfg


def _unfreeze_extras(model: nn.Module, cfg: AdapterConfig, wrapped: list[str], to_save: list[str]) -> None:
    if cfg.bias == "all":
        for name, param in model.named_parameters():
            if name.rpartition(".")[2] == "bias":
                param.requires_grad_(True)
    elif cfg.bias == "lora_only":
        for name in wrapped:
            bias = getattr(model.get_submodule(name).base_layer, "bias", None)
            if bias is not None:
                bias.requires_grad_(True)
    for name in to_save:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _require_adapters(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    layers = list(adapter_layers(model))
    if not layers:
        raise RuntimeError("the model has no dorakit adapters; call dk.apply_adapters(model, cfg) first.")
    return layers


def _adapters_in_state(model: nn.Module, *, merged: bool, fix: str) -> list[tuple[str, AdapterLayer]]:
    """Every adapter of ``model``, after checking that each one's merged flag is ``merged``."""
    layers = _require_adapters(model)
    wrong = [n for n, layer in layers if layer.merged != merged]
    if wrong:
        state = "not merged" if merged else "merged"
        raise RuntimeError(f"{len(wrong)} adapters are {state} (e.g. {wrong[0]!r}); {fix}")
    return layers


def merge_adapters(model: nn.Module, name: str | None = None) -> None:
    """Fold an adapter into its base weights (zero inference overhead): each module's active adapter
    (a single adapter: it), or the adapter ``name`` where the model holds several. Raises if any is merged."""
    layers = _adapters_in_state(model, merged=False, fix="merging twice would apply the update twice. "
                                "Call dk.unmerge_adapters(model) first.")
    active = {layer.active_adapter for _, layer in layers}
    if name is not None and active != {name}:
        raise RuntimeError(f"adapter {name!r} is not the active one ({sorted(map(str, active))}); call "
                           f"dk.set_adapter(model, {name!r}) first, so the merged model computes what it computed.")
    chosen = [(layer, layer.active_adapter) for _, layer in layers if layer.active_adapter in layer.hosted_names()]
    quantized = [n for n, layer in layers if isinstance(layer, QuantizedLinearAdapter)]
    if quantized:  # checked first, so a failure never leaves the model half merged
        bits = "/".join(sorted({f"{layer.bits}-bit" for _, layer in layers
                                if isinstance(layer, QuantizedLinearAdapter)}))
        raise AdapterStateError(f"{len(quantized)} adapters have a {bits} base (e.g. {quantized[0]!r}), which cannot "
                                "hold the merged weight; dk.merge_and_unload(model) exports a dense model instead. "
                                "Nothing was merged.")
    for layer, adapter in chosen:
        layer.merge(adapter)


def unmerge_adapters(model: nn.Module) -> None:
    """Restore every base weight to W0 (to float rounding), whichever adapter was merged into it.
    Raises if no adapter is merged."""
    layers = _require_adapters(model)
    if len(model.__dict__.get(NAMES_ATTR) or ()) <= 1:  # one adapter: all or nothing
        layers = _adapters_in_state(model, merged=True, fix="there is nothing to unmerge.")
    else:  # named adapters: the modules that hold the merged one
        layers = [(n, layer) for n, layer in layers if layer.merged]
        if not layers:
            raise RuntimeError("no adapter is merged; there is nothing to unmerge.")
    stuck = [n for n, layer in layers if _zero_magnitude(layer)]
    if stuck:  # checked for every layer first, so a failure never leaves the model half unmerged
        raise RuntimeError(f"{stuck[:3]} have zero magnitude entries, so W0 cannot be recovered from the merged "
                           "weights; reload the base model instead. Nothing was changed.")
    for _, layer in layers:
        layer.unmerge()


def _zero_magnitude(layer: AdapterLayer) -> bool:
    """Whether the merged adapter of ``layer`` has a zero magnitude entry (W0 is then unrecoverable)."""
    with layer.bound(layer.merged_adapter or layer.adapter_name):
        return layer.variant != "lora" and bool((layer.magnitude == 0).any())


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the plain base modules back; returns ``model``.

    The result has no dorakit modules: plain nn.Linear etc. whose weights are W'. A 4-bit base
    becomes a new dense nn.Linear (dequantized, with the adapter folded in). Parameters keep the
    requires_grad they had under the adapters (the base stays frozen). An 8-bit base, which does not
    record the dtype it was quantized from, is exported in the input embeddings' dtype (float32 if the
    model has none).
    """
    layers = _require_adapters(model)
    several = [n for n, layer in layers if layer.slots() or layer.active_adapter != layer.adapter_name]
    if several:
        raise RuntimeError(f"{several[0]!r} holds several adapters or another one is active; keep one "
                           "(dk.delete_adapter) or merge one in place with dk.merge_adapters(model, name).")
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    dtype8 = getattr(getattr(embeddings, "weight", None), "dtype", None)
    for name, layer in layers:
        if isinstance(layer, QuantizedLinearAdapter):
            dtype = dtype8 if isinstance(layer, Linear8bitAdapter) else None
            _set_child(model, name, layer.dequantize_and_merge(dtype))
            continue
        if not layer.merged:
            layer.merge()
        _set_child(model, name, layer.base_layer)
    model.__dict__.pop(CONFIG_ATTR, None)
    model.__dict__.pop(NAMES_ATTR, None)
    return model


def remove_adapters(model: nn.Module) -> nn.Module:
    """Undo apply_adapters without merging: the original modules with W0 come back; returns ``model``.

    Raises if an adapter is merged (unmerge first, or use merge_and_unload to keep the update).
    """
    for name, layer in _adapters_in_state(model, merged=False, fix="call dk.unmerge_adapters(model) first, or "
                                          "dk.merge_and_unload(model) to keep the adaptation."):
        _set_child(model, name, layer.base_layer)
    model.__dict__.pop(CONFIG_ATTR, None)
    model.__dict__.pop(NAMES_ATTR, None)
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block, every adapter is bypassed.

    This gives the base model's output only if nothing else was trained: biases (``bias`` other than
    "none") and ``modules_to_save`` train in place, so a warning names them when they are trainable.
    """
    layers = [layer for _, layer in _adapters_in_state(
        model, merged=False, fix="a merged update is in the weights and cannot be bypassed; "
        "call dk.unmerge_adapters(model) first.")]
    adapter_params = {id(p) for layer in layers for p in layer.parameters(recurse=False)}
    extras = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapter_params]
    if extras:
        warnings.warn(f"adapters_disabled() bypasses the adapters only: {len(extras)} other trainable parameters "
                      f"(e.g. {extras[0]!r}) train in place and stay in effect.", stacklevel=3)
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, was in zip(layers, previous):
            layer.disabled = was
