"""The fast paths of an adapter layer: which backend runs a call, the fused / Triton forward, and
the DoRA norm cache of ``cached_norms``.

``FastPath`` is a mixin of ``layers.AdapterLayer`` (which holds the parameters, the eager reference
forward and merge / unmerge); it reads the layer's ``base_layer``, ``lora_A``, ``lora_B``,
``magnitude``, ``variant``, ``backend``, ``scaling``, ``rank``, ``norm_grad`` and ``lora_dropout``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple, Self

import torch
from torch import Tensor, nn

from .kernels import dora_linear, dora_prepare, lora_prepare, triton_available, triton_interpreted
from .kernels import DECODE_MAX_RANK, DECODE_MAX_ROWS
from .kernels.dora_linear import linear_forward

DROPOUT_REASON = "dropout > 0 while training (PEFT's dropout formula runs on the eager path)"
"""Why the fused / Triton paths skip a call while dropout is active (FastPath._dropout_active)."""
DECODE_AUTO = False
"""Whether backend="auto" takes the decode kernel on CUDA (backend="triton" always does where it can)."""


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast computes x's products in, or None where autocast is off."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


TRITON_MAX_RANK = 512
"""The largest rank the Triton path takes (the largest its tests check): the kernels loop over the rank
in tiles of at most 128, so their shared memory stays under the 101,376 bytes of an sm_86 / sm_89 GPU
at any rank (tests/adapters/test_kernels.py compiles them for it); above it "auto" runs the fused path."""

TRITON_AUTO_MAX_RANK = 128
"""The largest rank at which backend="auto" picks the Triton path for DoRA; above it "auto" runs the fused
path (cuBLAS products, the direct row-block norm). Measured (H100, torch 2.11, llama-8b-4l, 1 x 4096, bf16,
all seven projections, commit 7efa872): the Triton step took 883.8 / 1290.0 / 1695.7 ms at r = 256 / 384
/ 512 against PEFT DoRA's 171.5 / 200.5 / 232.5 ms; the fused path (commit 47259b2) 120.2 / 127.6 / 148.8 ms
against PEFT DoRA's 170.4 / 200.3 / 232.3 (docs/speed.md, "High rank"). backend="triton" still takes ranks
up to TRITON_MAX_RANK."""


def _triton_device_unsupported(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (no CUDA, no interpreter), or None."""
    if device.type != "cuda" and not triton_interpreted():
        return f"the kernels need a CUDA device (or TRITON_INTERPRET=1), not {device}"
    return None


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run forward (pre-)hooks of its own or global ones."""
    from torch.nn.modules import module as nn_module

    return bool(module._forward_hooks or module._forward_pre_hooks
                or getattr(nn_module, "_global_forward_hooks", None)
                or getattr(nn_module, "_global_forward_pre_hooks", None))


class InferencePack(NamedTuple):
    """What _inference_call keeps for one adapter inside cached_norms()."""

    impl: str
    norm: Tensor | None  # _prepared's norm (for "triton": the partial sums), None for LoRA
    a_s: Tensor  # s·A (R, K) in W0's dtype
    b_c: Tensor  # B (N, R) in W0's dtype
    g: Tensor | None  # m / n in W0's dtype, as linear_forward computes it ("fused" DoRA), else None
    weight: Tensor  # W0
    decode: bool  # whether calls of <= DECODE_MAX_ROWS rows take triton_decode's kernel
    decode_g: Tensor | None  # that kernel's m / n in float32 (DoRA), None for LoRA
    magnitude: Tensor | None
    keep: tuple[Tensor, ...]  # A and B: their storage cannot be reused while the state holds their pointers


class FastPath:
    """Backend choice, the kernels' forward and the norm cache, for ``AdapterLayer``."""

    supports_fused: bool = False
    """Whether DoRA on this layer type has the fused / Triton paths of ``dorakit.adapters.kernels``."""
    cache_norm: bool
    _norm_cache: tuple[tuple, tuple[Tensor | None, ...]] | None
    _cache_depth: int
    _infer_cache: tuple[tuple, tuple | None] | None = None
    """The inference pack of _inference_call: (state, _inference_pack's tuple or None)."""

    @staticmethod
    def _cache_key(weight: Tensor) -> tuple[int, torch.dtype, torch.device, int]:
        return (weight._version, weight.dtype, weight.device, weight.data_ptr())

    def refresh_weight_cache(self) -> None:
        """Drop the norm kept inside a cached_norms() block: call it there after writing W0, A or B
        through ``.data`` (the one change cached_norms cannot see). Outside such a block nothing is cached."""
        self._norm_cache = self._gather_cache = self._infer_cache = None

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

    def train(self, mode: bool = True) -> Self:
        """nn.Module.train, dropping the norms kept by cached_norms() (see _prepared, gathered.py)."""
        self.refresh_weight_cache()
        return super().train(mode)

    def _inference_state(self, x: Tensor) -> tuple | None:
        """What the inference pack depends on, or None where _inference_call does not apply: outside
        cached_norms(), training mode, grad enabled, the cache turned off, magnitude-only, a base weight
        or A / B that is no plain floating-point parameter (VeRA's derived factors, a quantized base),
        and while torch.compile traces (the traced graph takes the custom op). Read through the modules'
        dicts: this runs on every decode call."""
        if (self._cache_depth == 0 or self.training or torch.is_grad_enabled() or not self.cache_norm
                or self.variant == "magnitude" or torch.compiler.is_compiling()):
            return None
        params = self._parameters
        base = self._modules["base_layer"]
        W, A, B = base._parameters.get("weight"), params.get("lora_A"), params.get("lora_B")
        if W is None or A is None or B is None or not W.is_floating_point():  # VeRA's derived A / B, a 4-bit W0
            return None
        m = params.get("magnitude") if self.variant == "dora" else None
        return (W._version, W.data_ptr(), A._version, A.data_ptr(), B._version, B.data_ptr(),
                None if m is None else (m._version, m.data_ptr()), self.variant, self.backend, self.scaling,
                x.dtype, x.device, torch.is_autocast_enabled(x.device.type),
                self.variant == "lora" and _has_hooks(base))

    def _inference_call(self, x: Tensor) -> Tensor | None:
        """y for ``x`` from the pack kept inside cached_norms() at inference, or None where it does not apply.

        The decode loop calls every adapter once per token with a few rows, so the host's work per call
        is most of an unmerged adapter's cost there. Inside cached_norms(), in eval mode without grad,
        this call is linear_forward itself (the products the Function runs, the same values) without the
        autograd Function, the backend choice or _prepared's key: the pack keeps the backend's choice,
        what _prepared made and, for "fused" DoRA, g = m / n. Where the pack allows it (_decode_allowed),
        calls of at most DECODE_MAX_ROWS rows take the one-launch kernel of triton_decode instead. The
        pack is rebuilt when _inference_state changes (W0, A, B or m written in place or replaced, s,
        the backend, x's dtype / device, autocast, hooks) and dropped where _norm_cache is (train() /
        eval(), an optimizer step, refresh_weight_cache(), the block's entry and exit)."""
        state = self._inference_state(x)
        if state is None:
            return None
        cache = self._infer_cache
        if cache is None or cache[0] != state:
            impl = self._fast_impl(x)
            pack = None if impl is None or _autocast_dtype(x) is not None else self._inference_pack(impl, x)
            cache = self._infer_cache = (state, pack)
        pack = cache[1]
        if pack is None:
            return None
        impl, norm, a_s, b_c, g, weight, decode, decode_g, magnitude, _ = pack
        x2 = x.reshape(-1, x.shape[-1])
        bias = self._modules["base_layer"].bias
        if decode and x2.shape[0] <= DECODE_MAX_ROWS:
            from .kernels.triton_decode import decode_linear

            y = decode_linear(x2.contiguous(), weight, a_s, b_c, decode_g, bias)
        else:
            y = linear_forward(x2, weight, bias, magnitude, norm, a_s, b_c, impl, g)[0]
        return y.view(*x.shape[:-1], y.shape[-1])

    def _decode_allowed(self, x: Tensor, rank: int | None = None) -> bool:
        """Whether calls like ``x`` may take triton_decode's kernel: Triton installed, ``rank`` (default: the
        adapter's) <= DECODE_MAX_RANK, a float16 / bfloat16 / float32 input, contiguous W0, and backend
        "triton" (on CUDA, or interpreted for tests) or "auto" on CUDA where DECODE_AUTO allows it."""
        rank = self.rank if rank is None else rank
        if not (triton_available() and rank <= DECODE_MAX_RANK and self.weight_2d().is_contiguous()
                and x.dtype in (torch.float16, torch.bfloat16, torch.float32)):
            return False
        if self.backend == "triton":
            return x.is_cuda or triton_interpreted()
        return self.backend == "auto" and x.is_cuda and DECODE_AUTO

    def _inference_pack(self, impl: str, x: Tensor) -> InferencePack:
        """The pack of _inference_call for this adapter and calls like ``x`` (see InferencePack)."""
        weight = self.base_layer.weight
        norm, _, a_s, b_c, _ = self._prepared(impl)
        m = self.magnitude if self.variant == "dora" else None
        g = decode_g = None
        if m is not None and impl == "fused":
            g = (m.to(norm.dtype) / norm).to(weight.dtype)  # as linear_forward computes it
        decode = self._decode_allowed(x)
        if decode:
            if m is not None:
                from .kernels.triton_dora import norm_from_partials

                decode_g = m.float() / (norm_from_partials(norm) if impl == "triton" else norm.float())
            a_s, b_c = a_s.contiguous(), b_c.contiguous()
        return InferencePack(impl, norm, a_s, b_c, g, weight, decode, decode_g, m, (self.lora_A, self.lora_B))

    def _fast_forward(self, x: Tensor, impl: str) -> Tensor:
        """LoRA / DoRA through dorakit.adapters.kernels: one autograd Function, the norm a constant."""
        cast = _autocast_dtype(x)
        if cast is not None:
            return self._fast_autocast(x, impl, cast)
        return dora_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A, self.lora_B,
                           self._fast_magnitude(), self._prepared(impl), impl)

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
        return self._variant_unsupported(impl)

    def _variant_unsupported(self, impl: str) -> str | None:
        """Why ``impl`` can never run this adapter's variant, norm gradient or rank, or None."""
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
        if self._dropout_active():
            return DROPOUT_REASON
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
            return _triton_device_unsupported(weight.device)
        return None

    def _dropout_active(self) -> bool:
        """Whether this call drops inputs (training with dropout > 0): the fused / Triton paths skip it."""
        return self.training and isinstance(self.lora_dropout, nn.Dropout)

    def _auto_order(self, on_cuda: bool) -> tuple[str, ...]:
        """The paths backend="auto" tries, in order: Triton only for DoRA on CUDA at rank <=
        TRITON_AUTO_MAX_RANK (LoRA's products are cuBLAS either way)."""
        if self.variant == "dora" and on_cuda and self.rank <= TRITON_AUTO_MAX_RANK:
            return ("triton", "fused")
        return ("fused",)

    def _fast_impl(self, x: Tensor) -> str | None:
        """The dorakit.adapters.kernels path for this call ("fused" / "triton"), or None for the eager reference.

        "auto" takes triton for DoRA on CUDA (triton installed, rank <= TRITON_AUTO_MAX_RANK), else fused,
        else the eager path (never the Triton interpreter); LoRA's triton path only makes the adapter copies in one launch, which
        costs the host more than the fused path's torch copies (same products), so "auto" runs LoRA fused;
        an explicit "fused" / "triton" that cannot run this call raises instead of falling back.
        """
        if self.backend == "torch" or self.variant == "magnitude":
            return None
        if self.backend == "auto":
            for impl in self._auto_order(x.is_cuda):
                if self._static_unsupported(impl) is None and self._runtime_unsupported(impl, x) is None:
                    return impl
            return None
        reason = self._runtime_unsupported(self.backend, x)
        if reason:
            raise RuntimeError(f"backend={self.backend!r} cannot run this call: {reason}. Use backend='auto' "
                               "(falls back to the eager path where needed) or 'torch'.")
        return self.backend


@contextmanager
def cached_norms(model: nn.Module) -> Iterator[None]:
    """Inside this block, each DoRA layer of ``model`` computes ||W0 + sBA||_c once and reuses it.

    For generation and evaluation with unmerged adapters (the decode loop would otherwise recompute
    every norm for every token). It applies to DoRA on the fused / Triton paths (nn.Linear), in eval
    mode, without grad, and to every adapter of a mixed-adapter batch at inference (the pack of
    gathered.py: s·A, B and m / ||W0 + sBA||_c of each adapter); everything else runs as outside the block.

    Contract: W0, A and B do not change inside the block. Changes dorakit can see still drop the
    cache: in-place ops (version counters: ``copy_``, ``load_state_dict``, ``add_`` under no_grad),
    replaced or moved tensors, ``train()`` / ``eval()``, and any ``torch.optim`` optimizer step
    (fused, foreach or for-loop, through a global step hook). A write through ``.data`` cannot be
    seen: after one, call ``layer.refresh_weight_cache()``. Caches are dropped on entry and on exit.
    """
    from torch.optim.optimizer import register_optimizer_step_post_hook

    layers = [m for m in model.modules() if isinstance(m, FastPath)]

    def drop(*_: object) -> None:
        for layer in layers:
            layer.refresh_weight_cache()
            for slot in layer.slots().values():  # the named adapters' caches, also of those added inside the block
                slot._norm_cache = slot._infer_cache = None

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
