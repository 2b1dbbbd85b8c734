"""Several adapters on one wrapped module: one adapter's state in one small object, rows routed in the forward.

A wrapper (``layers.AdapterLayer``) holds its *own* adapter as it always has (``lora_A``, ``lora_B``,
``magnitude`` on the wrapper; named ``adapter_name``, "default" unless added under another name), so
the parameter names and state_dict keys of a single adapter never change. Further adapters on the
same module live in ``wrapper.adapters``, a ModuleDict of ``AdapterSlot`` (the same three
parameters and the same scalars: variant, rank, alpha, scaling, ...).

The math is not copied into the slot: to run, merge or save a slot, the wrapper *binds* it
(``bound``) — swaps the slot's tensors and scalars with its own for the duration of a call — and runs
its usual code (eager reference, fused / Triton paths, merge / unmerge), so every adapter of every
layer type goes through the one implementation, and a slot keeps its own DoRA norm cache.

Routing happens in one place, ``MultiAdapter._multi_forward``, and only when ``multi`` is set (the
module holds a second adapter, the active adapter is not its own, or a mixed batch is routed): the
single-adapter forward is untouched.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .gathered import GatherPath

SLOT_PARAMS = ("lora_A", "lora_B", "magnitude")
"""The parameters an adapter owns (a LoRA adapter has no magnitude; a magnitude-only one has A = B = None)."""
SLOT_MODULES = ("lora_dropout",)
SLOT_ATTRS = ("variant", "rank", "alpha", "use_rslora", "scaling", "norm_grad", "backend", "_norm_cache",
              "_infer_cache")
"""The scalars (and the caches of cached_norms()) that belong to one adapter rather than to the module."""

_MISSING = object()


class AdapterSlot(nn.Module):
    """One adapter's state on one module, held by the module's wrapper under its name (see module doc)."""

    @classmethod
    def take(cls, wrapper: nn.Module) -> AdapterSlot:
        """A slot holding ``wrapper``'s own adapter (its tensors are moved, not copied)."""
        slot = cls()
        for key in SLOT_ATTRS:
            slot.__dict__[key] = None
        for key in SLOT_MODULES:
            slot._modules[key] = None
        swap_adapter(wrapper, slot)
        return slot

    def train(self, mode: bool = True) -> AdapterSlot:
        self._norm_cache = self._infer_cache = None
        return super().train(mode)

    def extra_repr(self) -> str:
        if self.variant == "magnitude":
            return "variant=magnitude"
        return f"variant={self.variant}, rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}"


def _swap_entry(a: dict, b: dict, key: str) -> None:
    """Exchange a[key] and b[key] in place (dict order kept where both have the key)."""
    va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
    if va is not _MISSING and vb is not _MISSING:
        a[key], b[key] = vb, va
        return
    a.pop(key, None)
    b.pop(key, None)
    if vb is not _MISSING:
        a[key] = vb
    if va is not _MISSING:
        b[key] = va


def swap_adapter(wrapper: nn.Module, slot: nn.Module) -> None:
    """Exchange the adapter state of ``wrapper`` and ``slot`` (its own inverse)."""
    for key in SLOT_PARAMS:
        _swap_entry(wrapper._parameters, slot._parameters, key)
    for key in SLOT_MODULES:
        _swap_entry(wrapper._modules, slot._modules, key)
    for key in SLOT_ATTRS:
        _swap_entry(wrapper.__dict__, slot.__dict__, key)


class RoutingError(ValueError):
    """A mixed-adapter batch that does not fit the model (wrong row count, unknown name, merged adapter)."""


class MultiAdapter(GatherPath):
    """Named adapters on one wrapper: binding, per-name lookup and the routed forward (see module doc)."""

    adapter_name: str = "default"
    """The name of the wrapper's own adapter (the tensors on the wrapper itself)."""
    active_adapter: str | None = "default"
    """The adapter this module runs outside a routed batch; one it does not hold means the base output."""
    merged_adapter: str | None = None
    """The adapter folded into W0 while ``merged`` is set."""
    multi: bool = False
    """Whether the forward routes (see module doc); kept current by refresh_multi()."""
    _route: Mapping[str | None, Tensor] | None = None
    _route_rows: int = 0

    def slots(self) -> Mapping[str, AdapterSlot]:
        """The module's other adapters by name (empty when it holds only its own)."""
        return self._modules.get("adapters") or {}

    def hosted_names(self) -> list[str]:
        """Every adapter this module holds: its own first."""
        return [self.adapter_name, *self.slots()]

    def add_slot(self, name: str, slot: AdapterSlot) -> None:
        if name in self.hosted_names():
            raise ValueError(f"this module already holds an adapter named {name!r}.")
        if "adapters" not in self._modules:
            self.adapters = nn.ModuleDict()
        self.adapters[name] = slot.train(self.training)  # the wrapper's train / eval mode (a new module starts in training mode)
        self.refresh_multi()

    def remove_slot(self, name: str) -> AdapterSlot:
        slot = self.adapters[name]
        del self.adapters[name]
        if not len(self.adapters):
            del self.adapters
        self.refresh_multi()
        return slot

    def refresh_multi(self) -> None:
        """Route only where needed: a second adapter here, another adapter active, or a routed batch."""
        self.multi = bool(self.slots()) or self.active_adapter != self.adapter_name or self._route is not None

    @contextmanager
    def bound(self, name: str) -> Iterator[None]:
        """Within the block the wrapper's own adapter is ``name`` (a no-op for its own)."""
        if name == self.adapter_name:
            yield
            return
        slot = self.slots()[name]
        swap_adapter(self, slot)
        try:
            yield
        finally:
            swap_adapter(self, slot)

    def set_route(self, groups: Mapping[str | None, Tensor] | None, rows: int = 0) -> None:
        """Rows of the next forwards by adapter name (None: no adapter); None ends the routing."""
        self._route, self._route_rows = groups, rows
        self.refresh_multi()

    def _plain_forward(self, x: Tensor) -> Tensor:
        """The base layer's own output (merged, disabled, a row without an adapter, eager LoRA's base product);
        a quantized base overrides it (quant.py)."""
        return self.base_layer(x)

    def _run_adapter(self, name: str | None, x: Tensor) -> Tensor:
        """The module's output for ``x`` under adapter ``name``; the base output for one it does not hold."""
        if name == self.adapter_name:  # the own adapter: no binding (the decode loop's common case)
            return self._single_forward(x)
        if name is None or name not in self.hosted_names():
            return self._plain_forward(x)
        with self.bound(name):
            return self._single_forward(x)

    def _multi_forward(self, x: Tensor) -> Tensor:
        """The routed forward: the active adapter, or each group of rows (batch dim 0) through its own adapter."""
        if self._route is None:
            return self._run_adapter(self.active_adapter, x)
        if x.shape[0] != self._route_rows:
            raise RoutingError(f"adapter_routing was given {self._route_rows} rows but this batch has {x.shape[0]} "
                               "(beam search and num_return_sequences repeat each row: repeat its name likewise).")
        impl = self._gather_impl(x)  # inference: one base product, gathered low-rank products (gathered.py)
        if impl is not None:
            return self._gathered_forward(x, impl)
        held = set(self.hosted_names())
        groups: dict[str | None, list[Tensor]] = {}
        for name, rows in self._route.items():  # adapters this module does not hold share the base output
            groups.setdefault(name if name in held else None, []).append(rows)
        parts = []
        for name, rows in groups.items():
            idx = (rows[0] if len(rows) == 1 else torch.cat(rows).sort().values).to(x.device)   # (n_rows,) ascending
            parts.append((idx, self._run_adapter(name, x.index_select(0, idx))))
        first = parts[0][1]
        if len(parts) == 1:
            return first
        out = first.new_zeros((x.shape[0], *first.shape[1:]))                        # (B, ..., out)
        for idx, y in parts:
            out = out.index_copy(0, idx, y.to(out.dtype))
        return out
