"""DoRA on a linear layer as one autograd Function: y = (m / n) ⊙ (x W0ᵀ + s·x Aᵀ Bᵀ) + b.

LoRA is the same Function without a magnitude (g = 1): y = x W0ᵀ + b + s·x Aᵀ Bᵀ, the adapter's
product added in place into the base product (no output-sized temporary), and the same backward.

n = ||W0 + sBA||_c is passed in as a constant (norm_grad="detach", paper §4.3), so the Function
needs no graph for it. Two implementations share the Function:

* ``"fused"``: torch ops only (any device, any float dtype); saves y_pre = x W0ᵀ + s·x Aᵀ Bᵀ for
  the magnitude's gradient.
* ``"triton"``: the forward epilogue and the backward's first pass are Triton kernels
  (``triton_dora``); saves the Function's *output* y instead of y_pre (the next op often saves y
  anyway, so the storage is shared) and recovers y_pre = (y − b) / g in backward, recomputing it
  where m = 0.

Precision: the two products with x run in the layer's dtype (bf16 on a GPU: fp32 accumulation),
with A and B cast to it, as the base layer's own product; m, n and the scale g = m / n stay in
float32 (float64 for float64 layers), and the gradients of A, B and m come back in their dtypes.

Saved for backward: x (the same tensor the base product reads), h = s·x Aᵀ (M, r), A, B and s·B in
the compute dtype (r-wide; A and B are the parameters themselves where the dtype matches), m, n
(for "triton": the (S, out) partial sums of squares its kernels finish n from), g = m / n ("fused"),
and one output-sized tensor (y_pre or y).

Under torch.compile the same forward and backward (linear_forward, linear_backward) run as the
custom ops of ops.py, which Dynamo sees as one opaque op per layer; eager calls take the Function,
whose host cost per call is lower.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional import accumulation_dtype, direct_norm_sq, safe_sqrt

IMPLS = ("fused", "triton")


def _mm_acc(a: Tensor, b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """a @ b accumulated in float32 and returned in ``out_dtype`` (float32 output on CUDA for half inputs)."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and out_dtype == torch.float32:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).to(out_dtype)


def linear_forward(
    x2: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    magnitude: Tensor | None,
    norm: Tensor | None,
    a_s: Tensor,
    b_c: Tensor,
    impl: str,
    g: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(y (M, N), h = s·x Aᵀ (M, R), y_pre (M, N) and g = m / n in W0's dtype for "fused" DoRA, else
    None, None) for x2 (M, K); ``g``: m / n as this function computes it, if the caller kept it.

    The forward both DoRALinearFunction (eager) and the ``dorakit::adapter_linear`` op (torch.compile,
    ops.py) run. For "triton", backward recovers y_pre from y itself."""
    h = F.linear(x2, a_s)  # (M, R) = s·x Aᵀ
    if magnitude is None:  # LoRA
        return F.linear(x2, weight, bias).addmm_(h, b_c.T), h, None, None  # x W0ᵀ + b, += s·x Aᵀ Bᵀ in place
    if impl == "triton":
        from .triton_dora import dora_forward

        return dora_forward(F.linear(x2, weight), h, b_c, magnitude, norm, bias), h, None, None
    y_pre = F.linear(x2, weight).addmm_(h, b_c.T)  # x W0ᵀ + s·x Aᵀ Bᵀ, in place
    if g is None:
        g = (magnitude.to(norm.dtype) / norm).to(weight.dtype)
    return (y_pre * g if bias is None else torch.addcmul(bias, y_pre, g)), h, y_pre, g


def linear_backward(
    dy2: Tensor,
    x2: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    magnitude: Tensor | None,
    norm: Tensor | None,
    a_c: Tensor,
    b_c: Tensor,
    b_s: Tensor,
    h: Tensor,
    saved: Tensor | None,
    impl: str,
    needs: tuple[bool, bool, bool, bool, bool],
    dtypes: tuple[torch.dtype, torch.dtype],
    g: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(∂L/∂x (M, K), ∂L/∂b, ∂L/∂A, ∂L/∂B, ∂L/∂m) for dy2 (M, N), each None unless ``needs`` (x, b, A, B, m)
    asks for it; ``saved``: y_pre ("fused" DoRA) or y ("triton"); ``dtypes``: those of A and B; ``g``:
    the forward's m / n in W0's dtype ("fused" DoRA; None recomputes it)."""
    need_x, need_b, need_A, need_B, need_m = needs
    if magnitude is None:  # LoRA: g = 1
        dyp, grad_m = dy2, None
    elif impl == "triton":
        from .triton_dora import dora_backward

        dyp, grad_m = dora_backward(dy2.contiguous(), saved, bias, magnitude, norm, x2.contiguous(), weight, h, b_c)
    else:
        if g is None:
            g = (magnitude.to(norm.dtype) / norm).to(dy2.dtype)
        dyp = dy2 * g  # dL/dy_pre = g ⊙ dy
        grad_m = (dy2 * saved).sum(dim=0, dtype=norm.dtype) / norm if need_m else None
    grad_x = grad_A = grad_B = grad_b = None
    if need_x or need_A:
        dh = torch.mm(dyp, b_s)  # (M, R): dL/d(x Aᵀ)
        if need_x:
            grad_x = torch.mm(dyp, weight).addmm_(dh, a_c)
        if need_A:
            grad_A = _mm_acc(dh.T, x2, dtypes[0])
    if need_B:
        grad_B = _mm_acc(dyp.T, h, dtypes[1])
    if need_b:  # float32 (float64) accumulation
        grad_b = dy2.sum(dim=0, dtype=accumulation_dtype(bias)).to(bias.dtype)
    if need_m:
        grad_m = grad_m.to(magnitude.dtype)
    return grad_x, grad_b, grad_A, grad_B, grad_m


class DoRALinearFunction(torch.autograd.Function):
    """Forward and backward of DoRA on a linear layer with a detached norm (see module docstring).

    Takes, besides the parameters, what dora_prepare made of them: the norm n (for "triton", the
    partial sums of squares of W0 + sBA that its kernels finish n from) and A, s·A, B, s·B in the
    compute dtype. With h = x (s·A)ᵀ saved, every gradient is one product with no extra scaling:
    ∂L/∂B = dy'ᵀ h, ∂L/∂h·s = dy' (s·B), ∂L/∂A = (dy' s·B)ᵀ x, ∂L/∂x = dy' W0 + (dy' s·B) A.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        lora_A: Tensor,
        lora_B: Tensor,  # noqa: ANN001
        magnitude: Tensor | None,
        norm: Tensor | None,
        a_c: Tensor,
        a_s: Tensor,
        b_c: Tensor,
        b_s: Tensor,
        impl: str,
    ) -> Tensor:
        return _function_forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, (norm, a_c, a_s, b_c, b_s), impl,
                                 save_weight=True)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        return (*_function_backward(ctx, dy, None), None, None, None, None, None, None)


class DequantizedLinearFunction(torch.autograd.Function):
    """DoRALinearFunction over a base whose dense W0 is formed on demand (a 4-bit base): ``weight_fn()``
    gives W0 in forward (the norm and the product) and again in backward (∂L/∂x, and the Triton
    backward's rare m = 0 tiles), so no dense W0 is kept between them, as for bitsandbytes' own product.
    The adapter's copies and the norm are prepared inside, from the same W0 the product uses."""

    @staticmethod
    def forward(ctx, x: Tensor, weight_fn: Callable[[], Tensor], bias: Tensor | None, lora_A: Tensor,  # noqa: ANN001
                lora_B: Tensor, magnitude: Tensor | None, scaling: float, impl: str) -> Tensor:
        weight = weight_fn()
        prepared = (lora_prepare(lora_A, lora_B, scaling, weight.dtype, impl) if magnitude is None
                    else dora_prepare(weight, lora_A, lora_B, scaling, None, impl))
        ctx.weight_fn = weight_fn
        return _function_forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, prepared, impl, save_weight=False)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        need_x = ctx.needs_input_grad[0]
        triton_dora = ctx.impl == "triton" and ctx.has_magnitude
        weight = ctx.weight_fn() if need_x or triton_dora else None
        return (*_function_backward(ctx, dy, weight), None, None)


def _function_forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor,  # noqa: ANN001
                      lora_B: Tensor, magnitude: Tensor | None, prepared: tuple[Tensor | None, ...], impl: str,
                      save_weight: bool) -> Tensor:
    """The Functions' forward: linear_forward, and what backward needs saved (W0 only if ``save_weight``)."""
    norm, a_c, a_s, b_c, b_s = prepared
    y, h, y_pre, g = linear_forward(x.reshape(-1, x.shape[-1]), weight, bias, magnitude, norm, a_s, b_c, impl)
    saved = y if impl == "triton" and magnitude is not None else y_pre
    ctx.save_for_backward(x, weight if save_weight else None, bias, magnitude, norm, a_c, b_c, b_s, h, saved, g)
    ctx.impl, ctx.has_magnitude = impl, magnitude is not None
    ctx.dtypes = (lora_A.dtype, lora_B.dtype)
    return y.view(*x.shape[:-1], y.shape[-1])


def _function_backward(ctx, dy: Tensor, weight: Tensor | None) -> tuple[Tensor | None, ...]:  # noqa: ANN001
    """(∂L/∂x, None for W0, ∂L/∂b, ∂L/∂A, ∂L/∂B, ∂L/∂m); ``weight``: W0 where the forward did not save it."""
    x, saved_weight, bias, magnitude, norm, a_c, b_c, b_s, h, saved, g = ctx.saved_tensors
    weight = saved_weight if weight is None else weight
    need_x, _, need_b, need_A, need_B, need_m = ctx.needs_input_grad[:6]
    grad_x, grad_b, grad_A, grad_B, grad_m = linear_backward(
        dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]), weight, bias, magnitude, norm, a_c, b_c,
        b_s, h, saved, ctx.impl, (need_x, need_b, need_A, need_B, need_m), ctx.dtypes, g)
    if grad_x is not None:
        grad_x = grad_x.view(x.shape)
    return grad_x, None, grad_b, grad_A, grad_B, grad_m


def dora_prepare(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, weight_sq: Tensor | None, impl: str = "fused"
) -> tuple[Tensor, ...]:
    """(the norm as DoRALinearFunction takes it, A, s·A, B, s·B in W0's dtype), without a graph.

    "fused": ||W0 + sBA||_c (out,) float32 (float64 for float64 layers) through direct_norm (rows
    of W0 + sBA summed directly, block by block). "triton": one kernel that squares W0 + sBA tile by
    tile over slices of the input dimension and returns the (S, out) float32 partial sums, which the
    Function's kernels finish; dora_norm gives the norm itself. Neither reads ``weight_sq`` (||w||²,
    which the factored norm took); it may be None. Under torch.compile, one ``dorakit::dora_prepare`` op (ops.py).
    """
    with torch.no_grad():
        if torch.compiler.is_compiling():
            return torch.ops.dorakit.dora_prepare(weight, lora_A, lora_B, scaling, weight_sq, impl)
        return prepare_dora(weight, lora_A, lora_B, scaling, weight_sq, impl)


def prepare_dora(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, weight_sq: Tensor | None, impl: str,
    fresh: bool = False,
) -> tuple[Tensor, ...]:
    """dora_prepare's body (no grad mode of its own): the eager path and the custom op (``fresh``: no
    output aliases an input) run it."""
    if impl == "triton":
        from .triton_dora import dora_prepare as triton_prepare

        return triton_prepare(weight, lora_A, lora_B, scaling)  # sums (w + s·BA)² itself: no ||w||²
    norm = direct_norm(weight, lora_A, lora_B, scaling)
    return (norm, *_copies(lora_A, lora_B, scaling, weight.dtype, fresh))


def direct_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """||W0 + sBA||_c (out,) in the accumulation dtype, no graph: the fused path's norm.

    Rows of V = W0 + s·B·A summed directly, a block of at most functional.NORM_CHUNK_BYTES at a
    time (functional.direct_norm_sq, the same sum the eager reference differentiates), as the
    Triton norm kernel sums (w + s·BA)² tile by tile: accurate where the update nearly cancels a
    row, and a few launches for a layer whose rows fit one block.
    """
    acc = accumulation_dtype(weight)
    return safe_sqrt(direct_norm_sq(weight, lora_A.to(acc), lora_B.to(acc), scaling))


def _copies(lora_A: Tensor, lora_B: Tensor, scaling: float, dtype: torch.dtype, fresh: bool) -> tuple[Tensor, ...]:
    """A, s·A, B, s·B in ``dtype``. ``fresh``: A and B copied even where the dtype matches (a custom op's
    outputs must not alias its inputs); else A and B themselves where it matches (two launches fewer:
    the eager Function may take the same tensor twice)."""
    a_s, b_s = torch.mul(lora_A, scaling), torch.mul(lora_B, scaling)
    if dtype != lora_A.dtype:
        a_s, b_s = a_s.to(dtype), b_s.to(dtype)
    a_c = lora_A.to(dtype, copy=True) if fresh or dtype != lora_A.dtype else lora_A
    b_c = lora_B.to(dtype, copy=True) if fresh or dtype != lora_B.dtype else lora_B
    return a_c, a_s, b_c, b_s


def lora_prepare(
    lora_A: Tensor, lora_B: Tensor, scaling: float, dtype: torch.dtype, impl: str = "fused"
) -> tuple[Tensor | None, ...]:
    """(None, A, s·A, B, s·B in ``dtype``) without a graph: what dora_linear takes for LoRA (no norm).

    Under torch.compile, "fused" traces its two multiplies and casts into the graph (Inductor fuses
    them into a kernel or two that its own wrapper launches, and they round as the eager ops do); an
    opaque op there ran Python, a dispatch and four to six launches per layer on every step, host
    work that made the compiled 1B step host-bound. "triton" stays one ``dorakit::lora_prepare`` op
    (ops.py), its one kernel."""
    with torch.no_grad():
        if torch.compiler.is_compiling():
            if impl == "fused":
                return (None, *_copies(lora_A, lora_B, scaling, dtype, fresh=False))
            return (None, *torch.ops.dorakit.lora_prepare(lora_A, lora_B, scaling, dtype, impl))
        return (None, *prepare_lora(lora_A, lora_B, scaling, dtype, impl))


def prepare_lora(
    lora_A: Tensor, lora_B: Tensor, scaling: float, dtype: torch.dtype, impl: str, fresh: bool = False
) -> tuple[Tensor, ...]:
    """lora_prepare's body without the leading None (the eager path and the custom op, ``fresh``, run it)."""
    if impl == "triton":
        from .triton_dora import lora_prepare as triton_prepare

        return triton_prepare(lora_A, lora_B, scaling, dtype)
    return _copies(lora_A, lora_B, scaling, dtype, fresh)


def dora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor | None,
    prepared: tuple[Tensor | None, ...],
    impl: str = "fused",
) -> Tensor:
    """y = (m / n) ⊙ (x W0ᵀ + s·x Aᵀ Bᵀ) + b with n a constant, through DoRALinearFunction;
    with magnitude None, LoRA: y = x W0ᵀ + b + s·x Aᵀ Bᵀ.

    Args:
        x: (..., in) in W0's dtype.
        weight: W0 (out, in), frozen. bias: (out,) or None (may be trainable).
        lora_A: (r, in). lora_B: (out, r). magnitude: m (out,), or None for LoRA.
        prepared: dora_prepare(weight, lora_A, lora_B, s, None, impl) for the current A, B
            (lora_prepare(lora_A, lora_B, s, W0's dtype, impl) for LoRA).
        impl: "fused" (torch ops) or "triton" (DoRA's epilogues; LoRA's products are cuBLAS either way).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}.")
    if torch.compiler.is_compiling():  # one opaque op for Dynamo (ops.py); the same math as the Function
        return torch.ops.dorakit.adapter_linear(x, weight, bias, lora_A, lora_B, magnitude, *prepared, impl)[0]
    return DoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, magnitude, *prepared, impl)


def dora_norm(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, weight_sq: Tensor | None = None,
    impl: str = "fused",
) -> Tensor:
    """||W0 + sBA||_c (out,) without a graph (see dora_prepare)."""
    if impl == "triton":
        from .triton_dora import norm_from_partials

        return norm_from_partials(dora_prepare(weight, lora_A, lora_B, scaling, weight_sq, impl)[0])
    with torch.no_grad():
        return direct_norm(weight, lora_A, lora_B, scaling)
