"""Named adapters on one base model: add, list, activate, delete, route a mixed batch, view one alone.

A model from ``apply_adapters`` holds one adapter named "default"; nothing about it changes until a
second one is added. Each wrapped module holds its own adapter on itself and any others in
``module.adapters`` (see slots.py); the model keeps ``{name: AdapterConfig}`` in
``model.dorakit_adapters`` and the active name in ``model.dorakit_active``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .config import AdapterConfig
from .inject import (
    CONFIG_ATTR,
    NAMES_ATTR,
    _set_child,
    adapter_layers,
    apply_adapters,
)
from .fast_path import cached_norms
from .layers import AdapterLayer
from .slots import AdapterSlot, RoutingError, swap_adapter

ACTIVE_ATTR = "dorakit_active"
DEFAULT = "default"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")


def _registry(model: nn.Module) -> dict[str, AdapterConfig]:
    """{name: config}; a model from apply_adapters / load_adapter alone has {"default": its config}."""
    if not any(True for _ in adapter_layers(model)):
        return {}
    names = model.__dict__.get(NAMES_ATTR)
    if names is None:
        names = model.__dict__[NAMES_ATTR] = {DEFAULT: model.__dict__[CONFIG_ATTR]}
    return names


def list_adapters(model: nn.Module) -> list[str]:
    """The names of the model's adapters, in the order they were added ([] for a plain model)."""
    return list(_registry(model))


def active_adapter(model: nn.Module) -> str | None:
    """The name of the active adapter (None for a plain model)."""
    names = _registry(model)
    return model.__dict__.get(ACTIVE_ATTR, next(iter(names), None)) if names else None


def named_config(model: nn.Module, name: str) -> AdapterConfig:
    """The AdapterConfig of adapter ``name``."""
    return _registry(model)[check_known(model, name)]


def check_known(model: nn.Module, name: str) -> str:
    names = list_adapters(model)
    if name not in names:
        raise KeyError(f"the model has no adapter named {name!r}; it has {names}.")
    return name


def check_new_name(model: nn.Module, name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"adapter name {name!r} must be 1-64 letters, digits, '_' or '-' (it names a sub-folder "
                         "and a module key), e.g. name='math'.")
    if name in list_adapters(model):
        raise ValueError(f"the model already has an adapter named {name!r}; dk.delete_adapter(model, {name!r}) "
                         "first, or pick another name.")
    return name


def _check_unmerged(model: nn.Module, what: str) -> list[tuple[str, AdapterLayer]]:
    layers = list(adapter_layers(model))
    merged = [n for n, layer in layers if layer.merged]
    if merged:
        raise RuntimeError(f"{what} needs unmerged adapters, but {merged[0]!r} is merged; call "
                           "dk.unmerge_adapters(model) first.")
    return layers


def attach_named(model: nn.Module, name: str, build: Callable[[nn.Module], object]) -> object:
    """Run ``build(model)`` (apply_adapters or a file loader) on the model with its adapters hidden, then
    move the new adapters in as ``name``: into an existing wrapper as a slot, or as a new wrapper.

    The new adapter is inactive and frozen (dk.set_adapter activates it), unless it is the first one."""
    check_new_name(model, name)
    old = dict(_check_unmerged(model, "adding an adapter"))
    if not old:
        result = build(model)
        for _, layer in adapter_layers(model):
            layer.adapter_name = layer.active_adapter = name
            layer.refresh_multi()
        model.__dict__[NAMES_ATTR] = {name: model.__dict__[CONFIG_ATTR]}
        model.__dict__[ACTIVE_ATTR] = name
        return result
    names, active = dict(_registry(model)), active_adapter(model)
    grads = [(p, p.requires_grad) for p in model.parameters()]
    config = model.__dict__.pop(CONFIG_ATTR)
    for module_name, layer in old.items():
        _set_child(model, module_name, layer.base_layer)
    try:
        result = build(model)
        new = dict(adapter_layers(model))
        names[name] = model.__dict__[CONFIG_ATTR]
    finally:
        for module_name, layer in old.items():
            _set_child(model, module_name, layer)
        model.__dict__[CONFIG_ATTR] = config
        for p, flag in grads:
            p.requires_grad_(flag)
    for module_name, wrapper in new.items():
        for p in wrapper.parameters(recurse=False):
            p.requires_grad_(False)
        if module_name in old:
            old[module_name].add_slot(name, AdapterSlot.take(wrapper))
        else:
            wrapper.adapter_name, wrapper.active_adapter = name, active
            wrapper.refresh_multi()
    model.__dict__[NAMES_ATTR] = names
    model.__dict__[ACTIVE_ATTR] = active
    return result


def add_adapter(model: nn.Module, cfg: AdapterConfig, name: str = DEFAULT) -> object:
    """Add adapter ``name`` built from ``cfg`` (targets, method, rank may differ from the others').

    On a plain model this is apply_adapters (the adapter is active and trainable). Otherwise the new
    adapter is inactive and frozen until dk.set_adapter(model, name). LoRA / DoRA / magnitude-only;
    a second adapter cannot have ``modules_to_save`` or trainable biases (they train in place, shared).
    """
    if list_adapters(model):
        if cfg.method in ("vera", "dvora"):
            raise ValueError(f"method={cfg.method!r} cannot be a second, named adapter yet; use lora or dora.")
        if cfg.modules_to_save or cfg.bias != "none":
            raise ValueError("a second adapter cannot have modules_to_save or bias != 'none': those train the "
                             "base modules in place, shared by every adapter; leave them out of this config.")
    return attach_named(model, name, lambda m: apply_adapters(m, cfg))


def _adapter_params(model: nn.Module, name: str) -> Iterator[nn.Parameter]:
    for _, layer in adapter_layers(model):
        if name == layer.adapter_name:
            yield from layer.parameters(recurse=False)
        elif name in layer.slots():
            yield from layer.slots()[name].parameters()


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the adapter every module runs, and the only adapter whose parameters train.

    Modules that do not hold ``name`` give their base output. Biases and modules_to_save keep their flags."""
    check_known(model, name)
    layers = _check_unmerged(model, "dk.set_adapter")
    for other in list_adapters(model):
        for p in _adapter_params(model, other):
            p.requires_grad_(other == name)
    for _, layer in layers:
        layer.active_adapter = name
        layer.refresh_multi()
    model.__dict__[ACTIVE_ATTR] = name


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; a module left without adapters gets its plain base module back.

    Deleting the active adapter needs another one activated first (unless it is the last one)."""
    check_known(model, name)
    layers = _check_unmerged(model, "dk.delete_adapter")
    names = _registry(model)
    if name == active_adapter(model) and len(names) > 1:
        raise RuntimeError(f"adapter {name!r} is active; dk.set_adapter(model, other) first "
                           f"(others: {[n for n in names if n != name]}).")
    for module_name, layer in layers:
        if name in layer.slots():
            layer.remove_slot(name)
        elif name == layer.adapter_name:
            if not layer.slots():
                _set_child(model, module_name, layer.base_layer)
                continue
            heir = next(iter(layer.slots()))  # its tensors move onto the wrapper (their state_dict keys change)
            swap_adapter(layer, layer.remove_slot(heir))
            layer.adapter_name = heir
            layer.refresh_multi()
    del names[name]
    if not names:
        for key in (NAMES_ATTR, ACTIVE_ATTR, CONFIG_ATTR):
            model.__dict__.pop(key, None)


@contextmanager
def adapter_routing(model: nn.Module, names_per_row: Sequence[str | None]) -> Iterator[None]:
    """Within the block each row i of a batch (dim 0) runs adapter ``names_per_row[i]`` (None: no adapter).

    Works for forward and ``generate()`` (greedy / sampling; repeat a row's name for each of its beams or
    return sequences). Each row's output is the one that adapter alone gives it."""
    names = list(names_per_row)
    known = set(list_adapters(model))
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise RoutingError(f"names_per_row has {unknown}, which are not adapters of this model ({sorted(known)}).")
    if not names:
        raise RoutingError("names_per_row is empty; give one adapter name (or None) per row of the batch.")
    layers = _check_unmerged(model, "dk.adapter_routing")
    groups = {n: torch.tensor([i for i, m in enumerate(names) if m == n], dtype=torch.long)
              for n in dict.fromkeys(names)}
    for _, layer in layers:
        layer.set_route(groups, len(names))
    try:
        yield
    finally:
        for _, layer in layers:
            layer.set_route(None)


@contextmanager
def only_adapter(model: nn.Module, name: str) -> Iterator[None]:
    """Within the block the model looks as if it held adapter ``name`` alone (what the single-adapter file
    writers and readers see): its tensors on the wrappers, modules without it plain, its config."""
    check_known(model, name)
    layers = _check_unmerged(model, "this")
    config, own = model.__dict__.get(CONFIG_ATTR), _registry(model)[name]
    hidden, bound = [], []
    for module_name, layer in layers:
        if name not in layer.hosted_names():
            _set_child(model, module_name, layer.base_layer)
            hidden.append((module_name, layer))
        elif name != layer.adapter_name:
            bound.append(layer.bound(name))
            bound[-1].__enter__()
    model.__dict__[CONFIG_ATTR] = own
    try:
        yield
    finally:
        model.__dict__[CONFIG_ATTR] = config
        for ctx in bound:
            ctx.__exit__(None, None, None)
        for module_name, layer in hidden:
            _set_child(model, module_name, layer)


BASE_ALIAS = "__base__"
"""PEFT's name for "no adapter" in ``adapter_names``; dk.generate accepts it as well as None."""


def generate(model: nn.Module, *args: object, adapter_names: Sequence[str | None], **kwargs: object) -> object:
    """``model.generate(*args, **kwargs)`` with row i of the batch run by adapter ``adapter_names[i]``.

    PEFT's ``model.generate(..., adapter_names=[...])`` for dorakit (which does not wrap the model): one
    name per prompt, None (or PEFT's "__base__") for the base model. Each name is repeated for the rows
    ``generate`` makes of its prompt (max(num_beams, num_return_sequences) of them, from the kwargs or the
    model's generation config), so each prompt's output is the one its adapter alone gives it.
    Decoder-only models (an encoder-decoder's encoder sees the unrepeated batch). Runs inside
    ``dk.cached_norms(model)``: the adapters' packs and DoRA norms are built once per call, not per token."""
    if isinstance(adapter_names, str):
        raise RoutingError(f"adapter_names must be a list with one name per prompt, got the string {adapter_names!r}.")
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1
    returns = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", 1) or 1
    repeat = max(int(beams), int(returns))
    names = [None if n == BASE_ALIAS else n for n in adapter_names for _ in range(repeat)]
    with adapter_routing(model, names), cached_norms(model):
        return model.generate(*args, **kwargs)
