"""A weighted combination of named adapters as a new adapter: ``dk.add_weighted_adapter`` (PEFT's name).

On one module let adapter i have A_i (r_i, in), B_i (out, r_i) in the (out, in) view of W0, scale
s_i = alpha_i / r_i (or / sqrt(r_i)) and, for DoRA, magnitude m_i (out,); w_i is its weight. The new
adapter has scale 1 (alpha = rank, no rsLoRA: the weights and scales live in its factors) and

* ``"cat"``: A = [w_1 s_1 A_1; …; w_k s_k A_k] (Σ r_i, in), B = [B_1 … B_k] (out, Σ r_i), so
  BA = ΔV := Σ w_i s_i B_i A_i exactly (PEFT's "cat"; the rank is the sum of the ranks);
* ``"linear"``: A = Σ sign(w_i s_i) √|w_i s_i| A_i, B = Σ √|w_i s_i| B_i (PEFT's "linear"; same rank
  everywhere; BA ≠ ΔV for k > 1, the cross terms B_i A_j stay: a cheap approximation);
* ``"svd"``: BA = the best rank-k approximation of ΔV (truncated SVD: B = U_k Σ_k, A = V_kᵀ; PEFT's
  "svd"; k = ``svd_rank``, default the largest r_i on the module, at most min(out, in)).

A module an adapter does not hold counts as ΔV_i = 0 and m_i = m0 := ||W0||_c (the adapter leaves it
as the base). DoRA's magnitude, whose combination PEFT does not define:

* ``magnitude="combine"`` (default): m = m0 + Σ w_i (m_i − m0), the task-arithmetic rule applied to
  the magnitude's change, so weights (1, 0, …) give adapter 1 back exactly with "cat", and weights
  all 0 give the base model;
* ``magnitude="base"``: m = m0, what PEFT's ``add_weighted_adapter`` leaves (its new adapter keeps
  the magnitude of a fresh adapter, ||W0 + 0||_c with the default init_lora_weights=True).

The combined adapter's weight is then W' = m ⊙ (W0 + BA) / ||W0 + BA||_c (DoRA) or W0 + BA (LoRA).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .config import AdapterConfig
from .inject import adapter_layers
from .layers import AdapterLayer
from .multi import _check_unmerged, add_adapter, check_known, check_new_name, named_config

COMBINATIONS = ("svd", "linear", "cat")
"""The combination types implemented (PEFT's ties / dare_* / magnitude_prune are not)."""
MAGNITUDES = ("combine", "base")


@dataclass
class _Part:
    """One adapter's contribution on one module, in the accumulation dtype."""

    weight: float
    A: Tensor           # (r_i, in)
    B: Tensor           # (out, r_i)
    scaling: float
    magnitude: Tensor | None  # (out,) for DoRA


@dataclass
class _Combined:
    """The new adapter's tensors on one module: A (r, in), B (out, r), magnitude (out,) or None."""

    A: Tensor
    B: Tensor
    magnitude: Tensor | None


def _check_weights(adapters: Sequence[str], weights: Sequence[float]) -> list[float]:
    if isinstance(adapters, str) or not len(adapters):
        raise ValueError(f"adapters must be a non-empty list of adapter names, got {adapters!r}; e.g. "
                         "adapters=['math', 'code'].")
    if isinstance(weights, (int, float)) or len(weights) != len(adapters):
        raise ValueError(f"weights must be a list with one number per adapter ({len(adapters)}), got {weights!r}; "
                         "e.g. weights=[0.5, 0.5].")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)]
    if bad:
        raise ValueError(f"weights must be finite numbers (negative ones subtract an adapter), got {bad[0]!r}.")
    return [float(w) for w in weights]


def _check_method(model: nn.Module, adapters: Sequence[str], magnitude: str) -> str:
    methods = {name: named_config(model, name).method for name in adapters}
    unsupported = {n: m for n, m in methods.items() if m not in ("lora", "dora")}
    if unsupported:
        raise ValueError(f"add_weighted_adapter combines LoRA or DoRA adapters; {unsupported} cannot be combined.")
    if len(set(methods.values())) > 1:
        raise ValueError(f"add_weighted_adapter needs adapters of one method, got {methods}; combine the LoRA "
                         "adapters and the DoRA adapters separately.")
    if magnitude not in MAGNITUDES:
        raise ValueError(f"magnitude must be one of {MAGNITUDES}, got {magnitude!r}.")
    return next(iter(methods.values()))


def _parts(layer: AdapterLayer, module_name: str, adapters: Sequence[str], weights: Sequence[float],
           acc: torch.dtype) -> list[_Part]:
    """The contributions of the adapters this module holds."""
    parts = []
    for name, w in zip(adapters, weights):
        if name not in layer.hosted_names():
            continue
        with layer.bound(name):
            if layer.variant == "magnitude":
                raise ValueError(f"adapter {name!r} is magnitude-only on module {module_name!r}; add_weighted_adapter "
                                 "combines low-rank adapters (leave that module out with magnitude_only=[]).")
            mag = layer.magnitude.detach().to(acc) if layer.variant == "dora" else None
            parts.append(_Part(w, layer.lora_A_2d().detach().to(acc), layer.lora_B_2d().detach().to(acc),
                               layer.scaling, mag))
    return parts


def _factors(parts: list[_Part], kind: str, svd_rank: int | None, module_name: str) -> tuple[Tensor, Tensor]:
    """(A, B) of the new adapter on one module (see module doc)."""
    if kind == "cat":
        return (torch.cat([p.weight * p.scaling * p.A for p in parts]), torch.cat([p.B for p in parts], dim=1))
    if kind == "linear":
        ranks = {p.A.shape[0] for p in parts}
        if len(ranks) > 1:
            raise ValueError(f"combination_type='linear' needs one rank per module, but module {module_name!r} has "
                             f"ranks {sorted(ranks)}; use 'cat' (exact) or 'svd'.")
        roots = [(math.copysign(math.sqrt(abs(p.weight * p.scaling)), p.weight * p.scaling),
                  math.sqrt(abs(p.weight * p.scaling))) for p in parts]
        return (sum(ra * p.A for (ra, _), p in zip(roots, parts)), sum(rb * p.B for (_, rb), p in zip(roots, parts)))
    delta = sum(p.weight * p.scaling * (p.B @ p.A) for p in parts)        # (out, in)
    k = min(svd_rank or max(p.A.shape[0] for p in parts), *delta.shape)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return Vh[:k], U[:, :k] * S[:k]


def _combine(layer: AdapterLayer, module_name: str, adapters: Sequence[str], weights: Sequence[float], kind: str,
             svd_rank: int | None, magnitude: str) -> _Combined:
    acc = torch.promote_types(layer.weight_2d().dtype, torch.float32)
    parts = _parts(layer, module_name, adapters, weights, acc)
    A, B = _factors(parts, kind, svd_rank, module_name)
    if parts[0].magnitude is None:
        return _Combined(A, B, None)
    m0 = layer.weight_2d().detach().to(acc).norm(dim=1)                   # ||W0||_c, (out,)
    if magnitude == "base":
        return _Combined(A, B, m0)
    return _Combined(A, B, m0 + sum(p.weight * (p.magnitude - m0) for p in parts))


def _new_config(model: nn.Module, first: str, ranks: dict[str, int]) -> AdapterConfig:
    """The first adapter's config, targeting exactly the combined modules, rank per module, alpha = rank."""
    top = max(ranks.values())
    exact = {re.escape(module): r for module, r in ranks.items() if r != top}
    return replace(named_config(model, first), rank=top, alpha=float(top), use_rslora=False, targets=tuple(ranks),
                   rank_pattern=exact, alpha_pattern={k: float(r) for k, r in exact.items()}, magnitude_only=(),
                   modules_to_save=(), bias="none")


def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], name: str,
                         combination_type: str = "svd", svd_rank: int | None = None,
                         magnitude: str = "combine") -> None:
    """Add adapter ``name``, the weighted combination of ``adapters`` (see the module doc for the formulas).

    As PEFT's ``LoraModel.add_weighted_adapter``: "cat" is exact (rank Σ r_i), "svd" (the default) the best
    rank-``svd_rank`` approximation of the same ΔV, "linear" PEFT's cheap mix of the factors (same ranks;
    with one adapter every type is "linear", which is then exact). Weights may be negative (subtract an
    adapter). DoRA's magnitude follows ``magnitude``: "combine" (m0 + Σ w_i (m_i − m0)) or "base" (||W0||_c,
    PEFT's result). The new adapter is inactive and frozen, like one from ``dk.add_adapter``; activate it
    with ``dk.set_adapter(model, name)``, route rows to it, save it or train it on.
    """
    weights = _check_weights(adapters, weights)
    for adapter in adapters:
        check_known(model, adapter)
    check_new_name(model, name)
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type must be one of {COMBINATIONS}, got {combination_type!r} (PEFT's ties / "
                         "dare / magnitude_prune types are not implemented).")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0
                                 or combination_type != "svd"):
        raise ValueError(f"svd_rank must be a positive integer and needs combination_type='svd', got "
                         f"svd_rank={svd_rank!r} with {combination_type!r}.")
    method = _check_method(model, adapters, magnitude)
    if method == "lora" and magnitude != "combine":
        raise ValueError("magnitude= applies to DoRA adapters; these are LoRA adapters (leave it out).")
    kind = "linear" if len(adapters) == 1 else combination_type
    combined = {module: _combine(layer, module, adapters, weights, kind, svd_rank, magnitude)
                for module, layer in _check_unmerged(model, "dk.add_weighted_adapter")
                if any(a in layer.hosted_names() for a in adapters)}
    add_adapter(model, _new_config(model, adapters[0], {m: c.A.shape[0] for m, c in combined.items()}), name=name)
    layers = dict(adapter_layers(model))
    with torch.no_grad():
        for module, new in combined.items():
            layer = layers[module]
            with layer.bound(name):
                layer.lora_A.copy_(new.A.reshape(layer.lora_A.shape))
                layer.lora_B.copy_(new.B.reshape(layer.lora_B.shape))
                if new.magnitude is not None:
                    layer.magnitude.copy_(new.magnitude)
                layer.refresh_weight_cache()
