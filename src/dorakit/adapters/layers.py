"""nn.Modules that wrap a frozen base layer with a LoRA, DoRA or magnitude-only adapter.

Each wrapper *holds* its base module (``self.base_layer``) and adds ``lora_A`` / ``lora_B``
(LoRA, DoRA) and ``magnitude`` (DoRA, magnitude-only). The math is in ``functional``; a wrapper
only says how its base layer maps to the (out, in) view and how to run the two products
x W0ᵀ and x Aᵀ Bᵀ in the layer's own layout.

Dropout (PEFT-exact): with dropout active, DoRA computes
``y = x W0ᵀ + (g − 1) ⊙ x̃ W0ᵀ + g ⊙ s·x̃ Aᵀ Bᵀ + b`` with x̃ = dropout(x) and g = m / ||W0 + sBA||_c,
which is what PEFT does: the clean base output is kept and only the adapter's correction sees the
dropped input (at the cost of a second base product while training). Without dropout, or in eval
mode, this is exactly ``y = g ⊙ (x W0ᵀ + s·x Aᵀ Bᵀ) + b``. Embeddings take no dropout (as in PEFT).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import (
    accumulation_dtype,
    add_bias,
    dora_combine,
    dora_combine_dropout,
    dora_merged_weight,
    dora_norm,
    dora_unmerged_weight,
    lora_delta,
    lora_scaling,
    row_norm_sq,
    safe_sqrt,
)
from .kernels import BACKENDS, dora_linear, dora_prepare, lora_prepare, triton_available, triton_interpreted

Variant = Literal["lora", "dora", "magnitude"]
VARIANTS: tuple[Variant, ...] = ("lora", "dora", "magnitude")


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast computes x's products in, or None where autocast is off."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


TRITON_MAX_RANK = 512
"""The largest rank the Triton path takes (the largest its tests check): the kernels loop over the rank
in tiles of at most 128, so their shared memory stays under the 101,376 bytes of an sm_86 / sm_89 GPU
at any rank (tests/adapters/test_kernels.py compiles them for it); above it "auto" runs the fused path."""


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run forward (pre-)hooks of its own or global ones."""
    from torch.nn.modules import module as nn_module

    return bool(module._forward_hooks or module._forward_pre_hooks
                or getattr(nn_module, "_global_forward_hooks", None)
                or getattr(nn_module, "_global_forward_pre_hooks", None))


class AdapterStateError(RuntimeError):
    """An operation that does not fit the adapter's state (merging twice, unmerging unmerged)."""


def adapter_dtype(weight: Tensor) -> torch.dtype:
    """Adapters train in float32 over a half-precision base (PEFT's default); else in W0's dtype."""
    if not weight.is_floating_point():
        raise TypeError(f"the base weight has dtype {weight.dtype}; dorakit adapts floating-point weights only "
                        "(4-bit bases are a separate feature).")
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


class AdapterLayer(nn.Module):
    """Base of all wrappers. Subclasses define the layout hooks below."""

    channel_dim: int = -1
    """Dimension of the output that holds the out-features (the channel dimension for convolutions)."""
    supports_dropout: bool = True
    supports_fused: bool = False
    """Whether DoRA on this layer type has the fused / Triton paths of ``dorakit.adapters.kernels``."""

    def __init__(self, base_layer: nn.Module, variant: Variant = "dora", rank: int = 8, alpha: float = 16.0, *,
                 use_rslora: bool = False, dropout: float = 0.0, init: str = "kaiming",
                 norm_grad: str = "detach", backend: str = "auto") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
        if norm_grad not in ("detach", "exact"):
            raise ValueError(f"norm_grad must be 'detach' or 'exact', got {norm_grad!r}.")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
        self.base_layer = base_layer
        self.variant: Variant = variant
        self.norm_grad = norm_grad
        self.backend = backend
        self.merged = False
        self.disabled = False
        self.cache_norm = True
        """Whether cached_norms() may keep this layer's norm (off under FSDP, whose updates it cannot see)."""
        self._norm_cache: tuple[tuple, tuple[Tensor | None, ...]] | None = None
        self._cache_depth = 0  # how many cached_norms() blocks hold this layer
        weight = self.weight_2d()  # W0's (out, in) view; for a 4-bit base, a transient dequantized copy
        dtype = adapter_dtype(weight)
        out_features, in_features = self.weight_2d().shape
        if variant != "magnitude":
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"rank must be a positive integer, got {rank!r}.")
            if rank > min(out_features, in_features):  # legal (PEFT allows it, and its files exist), but wasteful
                warnings.warn(f"rank {rank} exceeds min(out, in) = {min(out_features, in_features)} of this "
                              f"{type(base_layer).__name__} of (out, in) = ({out_features}, {in_features}): the update "
                              "BA cannot have a higher rank than that, so the extra parameters add nothing.",
                              stacklevel=3)
            if not math.isfinite(alpha) or alpha <= 0:
                raise ValueError(f"alpha must be a positive finite number, got {alpha!r}.")
        self.rank = 0 if variant == "magnitude" else rank
        self.alpha = float(alpha)
        self.use_rslora = use_rslora
        self.scaling = 0.0 if variant == "magnitude" else lora_scaling(alpha, rank, use_rslora)
        if variant != "magnitude":
            kw = {"device": weight.device, "dtype": dtype}
            self.lora_A = nn.Parameter(torch.empty(self._lora_A_shape(self.rank), **kw))
            self.lora_B = nn.Parameter(torch.empty(self._lora_B_shape(self.rank), **kw))
            self.reset_lora_parameters(init)
        else:
            self.register_parameter("lora_A", None)
            self.register_parameter("lora_B", None)
        if dropout > 0 and not self.supports_dropout and variant != "magnitude":
            raise ValueError(f"dropout={dropout} is not applied to {type(base_layer).__name__} adapters (as in PEFT); "
                             "leave this module out of targets or set dropout=0.")
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("merge_norm", None, persistent=False)  # ||W0 + sBA||_c used by the last merge
        if variant != "lora":
            with torch.no_grad():
                self.magnitude = nn.Parameter(self._norm(grad=False).to(dtype))
        if backend in ("fused", "triton"):
            reason = self._static_unsupported(backend)
            if reason:
                raise ValueError(f"backend={backend!r} cannot run this {type(base_layer).__name__} adapter: {reason}; "
                                 "use backend='auto' (picks the fastest path that can) or 'torch'.")

    def __getattr__(self, name: str) -> object:
        """Attributes the wrapper lacks (``weight``, ``stride``, ``in_features``, ...) are read from the
        base layer, so model code that inspects its submodules keeps working. ``weight`` is W0."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")  # no recursion before __init__
            if base is None:
                raise
            return getattr(base, name)

    # ---- layout hooks (subclasses) -------------------------------------------------------------
    def _lora_A_shape(self, rank: int) -> tuple[int, ...]:
        return (rank, self.weight_2d().shape[1])

    def _lora_B_shape(self, rank: int) -> tuple[int, ...]:
        return (self.weight_2d().shape[0], rank)

    def weight_2d(self) -> Tensor:
        """W0 as an (out, in) view."""
        return self.base_layer.weight

    def _weight_from_2d(self, w2d: Tensor) -> Tensor:
        """Inverse of weight_2d: an (out, in) tensor in the base weight's own layout."""
        return w2d

    def _base(self, x: Tensor) -> Tensor:
        """x W0ᵀ without the bias, in the layer's output layout."""
        return F.linear(x, self.base_layer.weight)

    def _lora(self, x: Tensor) -> Tensor:
        """x Aᵀ Bᵀ, unscaled, in the layer's output layout and the adapter dtype."""
        return F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)

    def reset_lora_parameters(self, init: str) -> None:
        """A: Kaiming-uniform (a=sqrt(5), nn.Linear's default) or N(0, 1/r); B: zeros, so ΔW = 0 at init."""
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.rank)
        else:
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got {init!r}.")
        nn.init.zeros_(self.lora_B)

    # ---- shared math ---------------------------------------------------------------------------
    def lora_A_2d(self) -> Tensor | None:
        """A as (r, in)."""
        return None if self.lora_A is None else self.lora_A.flatten(1)

    def lora_B_2d(self) -> Tensor | None:
        """B as (out, r)."""
        return None if self.lora_B is None else self.lora_B.flatten(1)

    @staticmethod
    def _cache_key(weight: Tensor) -> tuple[int, torch.dtype, torch.device, int]:
        return (weight._version, weight.dtype, weight.device, weight.data_ptr())

    def refresh_weight_cache(self) -> None:
        """Drop the norm kept inside a cached_norms() block: call it there after writing W0, A or B
        through ``.data`` (the one change cached_norms cannot see). Outside such a block nothing is cached."""
        self._norm_cache = None

    def _norm(self, grad: bool) -> Tensor:
        """||W0 + sBA||_c, (out,), summed directly from the current W0, A, B; ||W0||_c (a constant)
        for magnitude-only. Nothing is cached: every call reads the tensors as they are now."""
        if self.variant == "magnitude":
            with torch.no_grad():
                return safe_sqrt(row_norm_sq(self.weight_2d()))
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return dora_norm(self.weight_2d(), self.lora_A_2d(), self.lora_B_2d(), self.scaling)

    def _prepare(self, weight: Tensor, impl: str) -> tuple[Tensor | None, ...]:
        """dorakit.adapters.kernels.dora_prepare (DoRA) or lora_prepare (LoRA: no norm) for W0 = ``weight``.

        Both paths sum (w + s·BA)² directly (the Triton kernel, and kernels.direct_norm for "fused"),
        so neither needs ||w||² nor a second pass over a W0 that FSDP may re-gather every step."""
        if self.variant == "lora":
            return lora_prepare(self.lora_A, self.lora_B, self.scaling, weight.dtype, impl)
        return dora_prepare(weight, self.lora_A, self.lora_B, self.scaling, None, impl)

    def _may_cache(self) -> bool:
        """Whether _prepared may keep DoRA's norm: only inside cached_norms(), in eval mode, without grad."""
        return (self._cache_depth > 0 and self.variant == "dora" and self.cache_norm and not self.training
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling())

    def _prepared(self, impl: str) -> tuple[Tensor | None, ...]:
        """_prepare for the current W0, A, B: (norm or None, A, s·A, B, s·B), no graph.

        Computed afresh on every call, except inside a cached_norms() block (see there): a fused
        optimizer updates A and B without bumping their version counters, and a write through
        ``.data`` bypasses them too, so no key of the tensors can prove a cached norm current.
        Inside the block the key (version counters, storage, s, impl) and an optimizer-step hook
        still drop the cache on every change they can see.
        """
        if not self._may_cache():
            return self._prepare(self.base_layer.weight, impl)
        A, B = self.lora_A, self.lora_B
        key = (self._cache_key(self.base_layer.weight), A._version, A.data_ptr(), B._version, B.data_ptr(),
               self.scaling, impl)
        if self._norm_cache is not None and self._norm_cache[0] == key:
            return self._norm_cache[1]
        prepared = self._prepare(self.base_layer.weight, impl)
        self._norm_cache = (key, prepared)
        return prepared

    def train(self, mode: bool = True) -> AdapterLayer:
        """nn.Module.train, dropping the norm kept by cached_norms() (see _prepared)."""
        self._norm_cache = None
        return super().train(mode)

    def dora_scale(self) -> Tensor:
        """g = m / ||W0 + sBA||_c, (out,), float32; the norm is a constant in backward unless norm_grad="exact"."""
        norm = self._norm(grad=self.norm_grad == "exact")
        return self.magnitude.to(norm.dtype) / norm

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        impl = self._fast_impl(x)
        if impl is not None:  # LoRA / DoRA through dorakit.adapters.kernels: one autograd Function, the norm a constant
            cast = _autocast_dtype(x)
            if cast is not None:
                return self._fast_autocast(x, impl, cast)
            return dora_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A, self.lora_B,
                               self._fast_magnitude(), self._prepared(impl), impl)
        if self.variant == "lora":
            y = self.base_layer(x)
            return (y + self.scaling * self._lora(self.lora_dropout(x))).to(y.dtype)
        scale = self.dora_scale()
        base = self._base(x)
        if self.variant == "magnitude":
            y = dora_combine(base, None, scale, 0.0, self.channel_dim)
        elif self.training and isinstance(self.lora_dropout, nn.Dropout):
            x_dropped = self.lora_dropout(x)
            y = dora_combine_dropout(base, self._base(x_dropped), self._lora(x_dropped), scale, self.scaling,
                                     self.channel_dim)
        else:
            y = dora_combine(base, self._lora(x), scale, self.scaling, self.channel_dim)
        return add_bias(y, getattr(self.base_layer, "bias", None), self.channel_dim).to(base.dtype)

    def _fast_autocast(self, x: Tensor, impl: str, dtype: torch.dtype) -> Tensor:
        """The kernels under autocast, as autocast runs F.linear: x, W0 and the bias cast to ``dtype``
        (a transient copy of W0, as autocast makes), the kernels themselves outside autocast."""
        weight, bias = self.base_layer.weight.to(dtype), self.base_layer.bias
        with torch.autocast(x.device.type, enabled=False):
            prepared = self._prepare(weight, impl)
            return dora_linear(x.to(dtype), weight, None if bias is None else bias.to(dtype), self.lora_A,
                               self.lora_B, self._fast_magnitude(), prepared, impl)

    def _fast_magnitude(self) -> Tensor | None:
        """m for DoRA; None tells dora_linear to run LoRA."""
        return self.magnitude if self.variant == "dora" else None

    # ---- backend choice ------------------------------------------------------------------------
    def _static_unsupported(self, impl: str) -> str | None:
        """Why ``impl`` ("fused" / "triton") can never run this adapter, or None."""
        if not self.supports_fused:
            return f"only nn.Linear adapters have it, not {type(self).__name__}"
        if self.variant == "magnitude":
            return "it implements LoRA and DoRA, not variant='magnitude'"
        if self.variant == "dora" and self.norm_grad != "detach":
            return "it treats the norm as a constant (norm_grad='detach'), not norm_grad='exact'"
        if impl == "triton" and not triton_available():
            return "triton is not installed"
        if impl == "triton" and self.rank > TRITON_MAX_RANK:
            return (f"rank {self.rank} > {TRITON_MAX_RANK}, the largest rank the kernels are tested at (their rank "
                    "tiles keep shared memory within an sm_86 GPU's at any rank, but higher ranks are untested)")
        return None

    def _runtime_unsupported(self, impl: str, x: Tensor) -> str | None:
        """Why ``impl`` cannot run this call (dropout while training, autocast, dtypes, device), or None."""
        weight = self.base_layer.weight
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            return "dropout > 0 while training (PEFT's dropout formula runs on the eager path)"
        cast = _autocast_dtype(x)
        if cast is not None and cast not in (torch.float16, torch.bfloat16):
            return f"autocast to {cast} (the kernels follow autocast to float16 / bfloat16 only)"
        if cast is None and x.dtype != weight.dtype:
            return f"the input is {x.dtype} but W0 is {weight.dtype}"
        if weight.requires_grad:
            return "W0 requires grad (it is frozen in an adapter)"
        if self.variant == "lora" and _has_hooks(self.base_layer):
            return "the base layer has forward hooks (the eager LoRA path calls it, so they run)"
        if impl == "triton":
            if cast is None and weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                return f"the kernels take float16, bfloat16 or float32, not {weight.dtype}"
            if not weight.is_cuda and not triton_interpreted():
                return f"the kernels need a CUDA device (or TRITON_INTERPRET=1), not {weight.device}"
        return None

    def _fast_impl(self, x: Tensor) -> str | None:
        """The dorakit.adapters.kernels path for this call ("fused" / "triton"), or None for the eager reference.

        "auto" takes triton for DoRA on CUDA (triton installed), else fused, else the eager path (never
        the Triton interpreter); LoRA's triton path only makes the adapter copies in one launch, which
        costs the host more than the fused path's torch copies (same products), so "auto" runs LoRA fused;
        an explicit "fused" / "triton" that cannot run this call raises instead of falling back.
        """
        if self.backend == "torch" or self.variant == "magnitude":
            return None
        if self.backend == "auto":
            for impl in ("triton", "fused") if self.variant == "dora" else ("fused",):
                if impl == "triton" and not x.is_cuda:
                    continue
                if self._static_unsupported(impl) is None and self._runtime_unsupported(impl, x) is None:
                    return impl
            return None
        reason = self._runtime_unsupported(self.backend, x)
        if reason:
            raise RuntimeError(f"backend={self.backend!r} cannot run this call: {reason}. Use backend='auto' "
                               "(falls back to the eager path where needed) or 'torch'.")
        return self.backend

    # ---- merge / unmerge -----------------------------------------------------------------------
    @torch.no_grad()
    def _adapted(self) -> tuple[Tensor, Tensor | None]:
        """(W' as (out, in) in W0's dtype, ||W0 + sBA||_c or None for LoRA), from the unmerged W0."""
        w2d = self.weight_2d()
        if self.variant == "lora":
            acc = accumulation_dtype(w2d)
            return (w2d.to(acc) + lora_delta(self.lora_A_2d(), self.lora_B_2d(), self.scaling, acc)).to(w2d.dtype), None
        return dora_merged_weight(w2d, self.lora_A_2d(), self.lora_B_2d(), self.magnitude, self.scaling)

    def adapted_weight_2d(self) -> Tensor:
        """The dense adapted weight W' as (out, in), in W0's dtype, without touching the model."""
        return self.weight_2d().detach().clone() if self.merged else self._adapted()[0]

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into W0 in place: W0 <- W' (bias untouched). Raises if already merged."""
        if self.merged:
            raise AdapterStateError("this adapter is already merged; call unmerge() first (merging twice would "
                                    "apply the update twice).")
        new, self.merge_norm = self._adapted()
        self.base_layer.weight.copy_(self._weight_from_2d(new))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W0 from the merged weight (to float rounding). Raises if not merged."""
        if not self.merged:
            raise AdapterStateError("this adapter is not merged; there is nothing to unmerge.")
        w2d = self.weight_2d()
        if self.variant == "lora":
            acc = accumulation_dtype(w2d)
            old = (w2d.to(acc) - lora_delta(self.lora_A_2d(), self.lora_B_2d(), self.scaling, acc)).to(w2d.dtype)
        else:
            if bool((self.magnitude == 0).any()):
                raise AdapterStateError("the magnitude has zero entries, so W0 cannot be recovered from the merged "
                                        "weight; reload the base model instead.")
            old = dora_unmerged_weight(w2d, self.lora_A_2d(), self.lora_B_2d(), self.magnitude, self.merge_norm,
                                       self.scaling)
            self.merge_norm = None
        self.base_layer.weight.copy_(self._weight_from_2d(old))
        self.merged = False

    def extra_repr(self) -> str:
        if self.variant == "magnitude":
            return f"variant=magnitude, merged={self.merged}"
        return (f"variant={self.variant}, rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}, "
                f"norm_grad={self.norm_grad}, backend={self.backend}, merged={self.merged}")


class LinearAdapter(AdapterLayer):
    """Adapter around ``nn.Linear``: W0 (out, in), y = x W'ᵀ + b."""

    supports_fused = True


class Conv1DAdapter(AdapterLayer):
    """Adapter around transformers' ``Conv1D`` (GPT-2): its weight is stored (in, out), y = x W + b."""

    def weight_2d(self) -> Tensor:
        return self.base_layer.weight.T

    def _weight_from_2d(self, w2d: Tensor) -> Tensor:
        return w2d.T

    def _base(self, x: Tensor) -> Tensor:
        return x @ self.base_layer.weight


class ConvAdapter(AdapterLayer):
    """Adapter around ``nn.Conv1d/2d/3d`` (groups = 1): W0 (out, in, *k) viewed as (out, in·k).

    A is a convolution with the base's kernel, stride, padding and dilation (r, in, *k); B is a
    1×…×1 convolution (out, r, 1, …); the magnitude is per output channel (norm over in×kernel).
    """

    @property
    def channel_dim(self) -> int:  # counted from the end, so unbatched (C, *spatial) inputs work too
        return -(self.base_layer.weight.dim() - 1)

    def __init__(self, base_layer: nn.Module, *args: object, **kwargs: object) -> None:
        if base_layer.groups != 1:
            raise ValueError(f"{type(base_layer).__name__} with groups={base_layer.groups} is not supported "
                             "(only groups=1); leave this module out of targets.")
        if base_layer.padding_mode != "zeros":
            raise ValueError(f"{type(base_layer).__name__} with padding_mode={base_layer.padding_mode!r} is not "
                             "supported (only 'zeros'); leave this module out of targets.")
        super().__init__(base_layer, *args, **kwargs)

    @property
    def _conv(self):  # noqa: ANN202 - one of F.conv1d / conv2d / conv3d
        return (F.conv1d, F.conv2d, F.conv3d)[self.base_layer.weight.dim() - 3]

    def _lora_A_shape(self, rank: int) -> tuple[int, ...]:
        return (rank, *self.base_layer.weight.shape[1:])

    def _lora_B_shape(self, rank: int) -> tuple[int, ...]:
        return (self.base_layer.weight.shape[0], rank) + (1,) * (self.base_layer.weight.dim() - 2)

    def weight_2d(self) -> Tensor:
        return self.base_layer.weight.flatten(1)

    def _weight_from_2d(self, w2d: Tensor) -> Tensor:
        return w2d.view(self.base_layer.weight.shape)

    def _base(self, x: Tensor) -> Tensor:
        conv = self.base_layer
        return self._conv(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)

    def _lora(self, x: Tensor) -> Tensor:
        conv = self.base_layer
        h = self._conv(x.to(self.lora_A.dtype), self.lora_A, None, conv.stride, conv.padding, conv.dilation)
        return self._conv(h, self.lora_B)


class EmbeddingAdapter(AdapterLayer):
    """Adapter around ``nn.Embedding``, following PEFT's convention so adapters interoperate.

    The table E (vocab, dim) acts as a linear map from one-hot tokens, so its (out, in) view is
    Eᵀ (dim, vocab): A is (r, vocab), B is (dim, r), and the magnitude has one entry per embedding
    dimension (the norm over the vocabulary). Init as PEFT: A = 0, B ~ N(0, 1). No dropout.
    """

    supports_dropout = False

    def __init__(self, base_layer: nn.Module, *args: object, **kwargs: object) -> None:
        if base_layer.max_norm is not None:
            raise ValueError("nn.Embedding with max_norm renormalises its table in place on every forward, which "
                             "would change W0 under the adapter; not supported. Leave this module out of targets.")
        super().__init__(base_layer, *args, **kwargs)

    def weight_2d(self) -> Tensor:
        return self.base_layer.weight.T

    def _weight_from_2d(self, w2d: Tensor) -> Tensor:
        return w2d.T

    def _embed(self, x: Tensor, table: Tensor) -> Tensor:
        emb = self.base_layer
        return F.embedding(x, table, emb.padding_idx, None, emb.norm_type, emb.scale_grad_by_freq, emb.sparse)

    def _base(self, x: Tensor) -> Tensor:
        return self._embed(x, self.base_layer.weight)

    def _lora(self, x: Tensor) -> Tensor:
        return self._embed(x, self.lora_A.T) @ self.lora_B.T

    def reset_lora_parameters(self, init: str) -> None:
        if init not in ("kaiming", "gaussian"):
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got {init!r}.")
        nn.init.zeros_(self.lora_A)
        nn.init.normal_(self.lora_B)


@contextmanager
def cached_norms(model: nn.Module) -> Iterator[None]:
    """Inside this block, each DoRA layer of ``model`` computes ||W0 + sBA||_c once and reuses it.

    For generation and evaluation with unmerged adapters (the decode loop would otherwise recompute
    every norm for every token). It applies to DoRA on the fused / Triton paths (nn.Linear), in eval
    mode, without grad; everything else runs as outside the block.

    Contract: W0, A and B do not change inside the block. Changes dorakit can see still drop the
    cache: in-place ops (version counters: ``copy_``, ``load_state_dict``, ``add_`` under no_grad),
    replaced or moved tensors, ``train()`` / ``eval()``, and any ``torch.optim`` optimizer step
    (fused, foreach or for-loop, through a global step hook). A write through ``.data`` cannot be
    seen: after one, call ``layer.refresh_weight_cache()``. Caches are dropped on entry and on exit.
    """
    from torch.optim.optimizer import register_optimizer_step_post_hook

    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]

    def drop(*_: object) -> None:
        for layer in layers:
            layer._norm_cache = None

    handle = register_optimizer_step_post_hook(drop)
    for layer in layers:
        layer._cache_depth += 1
    drop()
    try:
        yield
    finally:
        handle.remove()
        for layer in layers:
            layer._cache_depth -= 1
        drop()
