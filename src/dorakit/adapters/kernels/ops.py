"""DoRA / LoRA on a linear layer as PyTorch custom ops, so torch.compile sees one opaque op per call.

Under ``torch.compile`` Dynamo would otherwise trace DoRALinearFunction and the norm's torch ops
into its graph, and AOTAutograd and Inductor would compile all of them again for every adapted
layer. These ops run the same Python math as the eager Function (dora_linear.linear_forward /
linear_backward, dora_prepare, lora_prepare: "fused" torch ops, or the Triton kernels on CUDA), so
the eager and the compiled paths share one implementation:

* ``dorakit::dora_prepare(W0, A, B, s, ||w||², impl)``: the norm (Triton: its partial sums) and
  A, s·A, B, s·B in W0's dtype; ``dorakit::lora_prepare(A, B, s, dtype, impl)``: the four copies.
  No graph (the norm is a constant, norm_grad="detach"); called under no_grad. While compiling,
  "fused" LoRA does not call lora_prepare: its multiplies and casts are traced (dora_linear.lora_prepare).
* ``dorakit::adapter_linear(x, W0, b, A, B, m, n, A, s·A, B, s·B, impl)``: (y, h, y_pre), with
  autograd through ``dorakit::adapter_linear_backward`` (one op for every gradient of the layer).
  LoRA is the same op with m = n = None. h = s·x Aᵀ and y_pre are outputs only so that backward
  can read them (y_pre is empty where backward needs none: LoRA, and "triton", which recovers it
  from y).

Only the APIs of ``torch.library`` present since torch 2.4 are used (custom_op, register_fake,
register_autograd, opcheck in the tests). ``kernels.dora_linear`` / ``dora_prepare`` route here
while compiling and to the Function otherwise (a custom op costs more host time per eager call).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dora_linear import linear_backward, linear_forward, prepare_dora, prepare_lora

_PREPARE = "dorakit::dora_prepare"
_LORA_PREPARE = "dorakit::lora_prepare"
_LINEAR = "dorakit::adapter_linear"
_BACKWARD = "dorakit::adapter_linear_backward"


@torch.library.custom_op(
    _PREPARE,
    mutates_args=(),
    schema="(Tensor weight, Tensor lora_A, Tensor lora_B, float scaling, Tensor? weight_sq, str impl)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def dora_prepare_op(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, weight_sq: Tensor | None, impl: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(norm, A, s·A, B, s·B): dora_linear.dora_prepare's eager body."""
    return prepare_dora(weight, lora_A, lora_B, scaling, weight_sq, impl, fresh=True)


@dora_prepare_op.register_fake
def _(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, weight_sq: Tensor | None,
      impl: str) -> tuple[Tensor, ...]:
    (N, K), R = weight.shape, lora_A.shape[0]
    if impl == "triton":
        from .triton_dora import partial_rows

        norm = weight.new_empty((partial_rows(N, K, R), N), dtype=torch.float32)
    else:
        norm = weight.new_empty(N, dtype=torch.float64 if weight.dtype == torch.float64 else torch.float32)
    return (norm, *_fake_copies(lora_A, lora_B, weight.dtype))


def _fake_copies(lora_A: Tensor, lora_B: Tensor, dtype: torch.dtype) -> tuple[Tensor, ...]:
    a, b = lora_A.new_empty(lora_A.shape, dtype=dtype), lora_B.new_empty(lora_B.shape, dtype=dtype)
    return a, torch.empty_like(a), b, torch.empty_like(b)


@torch.library.custom_op(
    _LORA_PREPARE,
    mutates_args=(),
    schema="(Tensor lora_A, Tensor lora_B, float scaling, ScalarType dtype, str impl) -> (Tensor, Tensor, Tensor, Tensor)",
)
def lora_prepare_op(
    lora_A: Tensor, lora_B: Tensor, scaling: float, dtype: torch.dtype, impl: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(A, s·A, B, s·B) in ``dtype``: dora_linear.lora_prepare's eager body."""
    return prepare_lora(lora_A, lora_B, scaling, dtype, impl, fresh=True)


@lora_prepare_op.register_fake
def _(lora_A: Tensor, lora_B: Tensor, scaling: float, dtype: torch.dtype, impl: str) -> tuple[Tensor, ...]:
    return _fake_copies(lora_A, lora_B, dtype)


@torch.library.custom_op(
    _LINEAR,
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor? magnitude, Tensor? norm,"
    " Tensor a_c, Tensor a_s, Tensor b_c, Tensor b_s, str impl) -> (Tensor, Tensor, Tensor)",
)
def adapter_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor | None,
    norm: Tensor | None, a_c: Tensor, a_s: Tensor, b_c: Tensor, b_s: Tensor, impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y (..., N), h (M, R), y_pre (M, N) or empty): linear_forward, as DoRALinearFunction.forward."""
    y, h, y_pre, _ = linear_forward(x.reshape(-1, x.shape[-1]), weight, bias, magnitude, norm, a_s, b_c, impl)
    return y.view(*x.shape[:-1], y.shape[-1]), h, y.new_empty(0) if y_pre is None else y_pre


@adapter_linear.register_fake
def _fake_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor | None,
      norm: Tensor | None, a_c: Tensor, a_s: Tensor, b_c: Tensor, b_s: Tensor, impl: str) -> tuple[Tensor, ...]:
    N, R = weight.shape[0], a_s.shape[0]
    M = x.numel() // x.shape[-1]
    y_pre = x.new_empty((M, N)) if magnitude is not None and impl != "triton" else x.new_empty(0)
    return x.new_empty((*x.shape[:-1], N)), x.new_empty((M, R)), y_pre


@torch.library.custom_op(
    _BACKWARD,
    mutates_args=(),
    schema="(Tensor dy, Tensor x, Tensor weight, Tensor? bias, Tensor? magnitude, Tensor? norm, Tensor a_c,"
    " Tensor b_c, Tensor b_s, Tensor h, Tensor saved, str impl, bool[] needs, ScalarType a_dtype,"
    " ScalarType b_dtype) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def adapter_linear_backward(
    dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, magnitude: Tensor | None, norm: Tensor | None,
    a_c: Tensor, b_c: Tensor, b_s: Tensor, h: Tensor, saved: Tensor, impl: str, needs: list[bool],
    a_dtype: torch.dtype, b_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(∂L/∂x, ∂L/∂b, ∂L/∂A, ∂L/∂B, ∂L/∂m): linear_backward; a gradient not asked for is empty (0,)."""
    saved2 = None if magnitude is None else saved.reshape(-1, saved.shape[-1])  # LoRA: empty, unused
    grads = linear_backward(dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]), weight, bias, magnitude,
                            norm, a_c, b_c, b_s, h, saved2, impl, tuple(needs), (a_dtype, b_dtype))
    grad_x = grads[0].view(x.shape) if grads[0] is not None else None
    return tuple(dy.new_empty(0) if g is None else g for g in (grad_x, *grads[1:]))  # type: ignore[return-value]


@adapter_linear_backward.register_fake
def _(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, magnitude: Tensor | None, norm: Tensor | None,
      a_c: Tensor, b_c: Tensor, b_s: Tensor, h: Tensor, saved: Tensor, impl: str, needs: list[bool],
      a_dtype: torch.dtype, b_dtype: torch.dtype) -> tuple[Tensor, ...]:
    likes = (x, bias, a_c.new_empty(a_c.shape, dtype=a_dtype), b_c.new_empty(b_c.shape, dtype=b_dtype), magnitude)
    return tuple(torch.empty_like(t) if need else dy.new_empty(0) for need, t in zip(needs, likes))


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:  # noqa: ANN001
    x, weight, bias, lora_A, lora_B, magnitude, norm, a_c, _a_s, b_c, b_s, impl = inputs
    y, h, y_pre = output
    saved = y if impl == "triton" and magnitude is not None else y_pre
    ctx.save_for_backward(x, weight, bias, magnitude, norm, a_c, b_c, b_s, h, saved)
    ctx.impl = impl
    ctx.dtypes = (lora_A.dtype, lora_B.dtype)


def _backward(ctx, dy: Tensor, _dh: Tensor | None, _dy_pre: Tensor | None) -> tuple[Tensor | None, ...]:  # noqa: ANN001
    x, weight, bias, magnitude, norm, a_c, b_c, b_s, h, saved = ctx.saved_tensors
    need_x, _, need_b, need_A, need_B, need_m = ctx.needs_input_grad[:6]
    needs = [need_x, need_b, need_A, need_B, need_m]
    grads = adapter_linear_backward(dy, x, weight, bias, magnitude, norm, a_c, b_c, b_s, h, saved, ctx.impl, needs,
                                    *ctx.dtypes)
    grad_x, grad_b, grad_A, grad_B, grad_m = (g if need else None for g, need in zip(grads, needs))
    return grad_x, None, grad_b, grad_A, grad_B, grad_m, None, None, None, None, None, None


adapter_linear.register_autograd(_backward, setup_context=_setup_context)
