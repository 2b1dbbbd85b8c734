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
from .fast_path import TRITON_MAX_RANK, FastPath, cached_norms  # noqa: F401  (re-exported)
from .kernels import BACKENDS
from .slots import MultiAdapter

Variant = Literal["lora", "dora", "magnitude"]
VARIANTS: tuple[Variant, ...] = ("lora", "dora", "magnitude")


class AdapterStateError(RuntimeError):
    """An operation that does not fit the adapter's state (merging twice, unmerging unmerged)."""


def adapter_dtype(weight: Tensor) -> torch.dtype:
    """Adapters train in float32 over a half-precision base (PEFT's default); else in W0's dtype."""
    if not weight.is_floating_point():
        raise TypeError(f"the base weight has dtype {weight.dtype}; dorakit adapts floating-point weights only "
                        "(4-bit bases are a separate feature).")
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


class AdapterLayer(MultiAdapter, FastPath, nn.Module):
    """Base of all wrappers: parameters, the eager forward (the reference), merge / unmerge.

    Subclasses define the layout hooks below; the fast paths and the norm cache are FastPath's, named
    adapters besides the own one and mixed-batch routing MultiAdapter's (slots.py)."""

    channel_dim: int = -1
    """Dimension of the output that holds the out-features (the channel dimension for convolutions)."""
    supports_dropout: bool = True

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

    def _norm(self, grad: bool) -> Tensor:
        """||W0 + sBA||_c, (out,), summed directly from the current W0, A, B; ||W0||_c (a constant)
        for magnitude-only. Nothing is cached: every call reads the tensors as they are now."""
        if self.variant == "magnitude":
            with torch.no_grad():
                return safe_sqrt(row_norm_sq(self.weight_2d()))
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return dora_norm(self.weight_2d(), self.lora_A_2d(), self.lora_B_2d(), self.scaling)

    def dora_scale(self) -> Tensor:
        """g = m / ||W0 + sBA||_c, (out,), float32; the norm is a constant in backward unless norm_grad="exact"."""
        norm = self._norm(grad=self.norm_grad == "exact")
        return self.magnitude.to(norm.dtype) / norm

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.disabled:
            return self._plain_forward(x)
        if self.multi:  # several adapters here, another one active, or a routed batch (slots.py)
            return self._multi_forward(x)
        return self._single_forward(x)

    def _single_forward(self, x: Tensor) -> Tensor:
        """The forward of the wrapper's own adapter (or the one bound in its place)."""
        y = self._inference_call(x)  # inside cached_norms() at inference: the kept pack (fast_path.py)
        if y is not None:
            return y
        impl = self._fast_impl(x)
        if impl is not None:  # LoRA / DoRA through dorakit.adapters.kernels: one autograd Function, the norm a constant
            return self._fast_forward(x, impl)
        if self.variant == "lora":
            y = self._plain_forward(x)
            return (y + self.scaling * self._lora(self.lora_dropout(x))).to(y.dtype)
        scale = self.dora_scale()
        base = self._base(x)
        if self.variant == "magnitude":
            y = dora_combine(base, None, scale, 0.0, self.channel_dim)
        elif self._dropout_active():
            x_dropped = self.lora_dropout(x)
            y = dora_combine_dropout(base, self._base(x_dropped), self._lora(x_dropped), scale, self.scaling,
                                     self.channel_dim)
        else:
            y = dora_combine(base, self._lora(x), scale, self.scaling, self.channel_dim)
        return add_bias(y, getattr(self.base_layer, "bias", None), self.channel_dim).to(base.dtype)

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

    def merge(self, name: str | None = None) -> None:
        """Fold adapter ``name`` (default: the own one) into W0 in place: W0 <- W' (bias untouched).
        Raises if already merged."""
        name = self.adapter_name if name is None else name
        with self.bound(name):
            self._merge()
        self.merged_adapter = name

    def unmerge(self) -> None:
        """Restore W0 from the merged weight (to float rounding). Raises if not merged."""
        with self.bound(self.merged_adapter or self.adapter_name):
            self._unmerge()
        self.merged_adapter = None

    @torch.no_grad()
    def _merge(self) -> None:
        if self.merged:
            raise AdapterStateError("this adapter is already merged; call unmerge() first (merging twice would "
                                    "apply the update twice).")
        new, self.merge_norm = self._adapted()
        self.base_layer.weight.copy_(self._weight_from_2d(new))
        self.merged = True

    @torch.no_grad()
    def _unmerge(self) -> None:
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
    supports_gather = True


class Conv1DAdapter(AdapterLayer):
    """Adapter around transformers' ``Conv1D`` (GPT-2): its weight is stored (in, out), y = x W + b."""

    supports_gather = True

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
