"""QLoRA / QDoRA: LoRA, DoRA and magnitude-only adapters over a 4-bit or 8-bit bitsandbytes base.

The base is a ``bitsandbytes.nn.Linear4bit`` (Dettmers et al. 2023, QLoRA): W0 stored as 4-bit NF4
(or FP4) codes in blocks of 64 with one absmax scale per block, the scales themselves optionally
8-bit quantized ("double quantization"). That is what transformers' ``BitsAndBytesConfig(
load_in_4bit=True)`` builds, so a model loaded that way is adapted as it is; ``quantize_model``
builds the same layers from a plain model. bitsandbytes does the storage and the kernels (CUDA,
and a CPU backend); dorakit adds only the adapter.

Every quantity of ``functional`` is taken of the *dequantized* weight W0 = dequant(Q): the adapter
is exactly DoRA / LoRA on a dense nn.Linear holding dequant(Q) (Liu et al. 2024, §5.6 "QDoRA").

* x W0ᵀ is bitsandbytes' 4-bit matmul (its backward dequantizes again; nothing dense is saved).
* Nothing dense is cached: ||W0 + sBA||_c is summed directly from a dequantized W0 each time.
* The per-step norm ||W0 + sBA||_c needs W0: one transient dequantization of this layer's weight
  per step, freed before the layer returns (the norm itself is summed over blocks of rows). It
  never raises the peak: the base product dequantizes the same whole weight (bitsandbytes' CPU
  kernel always, its CUDA kernel for more than a few rows of input). With norm_grad="exact" the
  norm is checkpointed, so autograd keeps A and B only and dequantizes once more in backward
  instead of holding W0 until then.
* Merging in place is refused (W' cannot be stored in 4 bits without a second rounding);
  ``dequantize_and_merge`` / ``dk.merge_and_unload`` export a dense nn.Linear holding W'.

8-bit bases are bitsandbytes' ``Linear8bitLt`` (Dettmers et al. 2022, LLM.int8()) with
``has_fp16_weights=False``: int8 codes C (out, in) and one absmax per output row, W0 = C · absmax / 127
(what ``BitsAndBytesConfig(load_in_8bit=True)`` builds). Everything above holds with that W0. The base
product x W0ᵀ is bitsandbytes' own, as in PEFT: in training mode on the CPU it is exactly
x dequant(C)ᵀ; in eval mode (and on CUDA) LLM.int8() also rounds each row of x to int8, so the output
is DoRA / LoRA over *that* product (PEFT's 8-bit model computes the same), while the DoRA norm and
the input gradient always use the exact W0. Merging in place is refused as for 4 bits (PEFT
re-quantizes the merged weight, a second rounding).

bitsandbytes is imported only when a quantized layer is built or found (importing it takes seconds).
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Iterator, Sequence
from types import ModuleType

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from .fast_path import DROPOUT_REASON, _autocast_dtype, _triton_device_unsupported
from .functional import dora_norm, safe_sqrt
from .kernels.dora_linear import DequantizedLinearFunction
from .layers import AdapterLayer, AdapterStateError

INSTALL_HINT = "pip install bitsandbytes  (or: pip install 'dorakit[quant]')"
QUANT_TRITON_AUTO = True
"""Whether backend="auto" runs a 4-bit base's DoRA (rank <= fast_path.TRITON_AUTO_MAX_RANK) through
DequantizedLinearFunction's Triton path on CUDA (see Linear4bitAdapter). Timed on an H100, LLaMA-8B layer
shape (docs/speed.md, "QDoRA"): 58.5 ms a step against the eager path's 102.1 ms; the torch-fused variant of
the Function (137.1 ms) lost to the eager path there, so "auto" never takes it. backend="fused" / "triton"
take the Function wherever it can run."""
QUANT_TYPES = ("nf4", "fp4")


def require_bitsandbytes() -> ModuleType:
    """The ``bitsandbytes`` module, or an ImportError that says what to install."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError(f"4-bit bases (QLoRA / QDoRA) need bitsandbytes, which cannot be imported ({e}). "
                          f"Install it: {INSTALL_HINT}. It runs on CUDA and, more slowly, on the CPU.") from None
    return bitsandbytes


def _is_bnb(module: nn.Module, class_name: str) -> bool:
    """Whether ``module`` is an instance of ``bitsandbytes.nn.<class_name>``.

    Never imports bitsandbytes: if nothing imported it, no module can be one.
    """
    bnb = sys.modules.get("bitsandbytes")
    cls = getattr(getattr(bnb, "nn", None), class_name, None)
    return cls is not None and isinstance(module, cls)


def is_linear4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes Linear4bit (or LinearNF4 / LinearFP4)."""
    return _is_bnb(module, "Linear4bit")


def is_linear8bit(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes Linear8bitLt."""
    return _is_bnb(module, "Linear8bitLt")


def dequantize_weight(linear: nn.Module) -> Tensor:
    """W0 = dequant(Q) of a Linear4bit or Linear8bitLt as a new dense (out, in) tensor: 4-bit in the
    dtype it was quantized from (``quant_state.dtype``), 8-bit in float32. A transient copy: the
    caller drops it."""
    bnb = require_bitsandbytes()
    if is_linear8bit(linear):
        return _dequantize_8bit(bnb, linear)
    return bnb.functional.dequantize_4bit(linear.weight.data, _quant_state_4bit(linear))


def _quant_state_4bit(linear: nn.Module) -> object:
    """The QuantState of a Linear4bit whose codes can be dequantized exactly (errors name the fix)."""
    state = quant_state(linear)
    if state is None:
        raise ValueError(f"this {type(linear).__name__} is not quantized yet (bitsandbytes quantizes on the first "
                         "move to a device): call .to(device) on it, or build it with dk.quantize_model.")
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError(f"this {type(linear).__name__} was repacked in place by bitsandbytes' AVX512-BF16 CPU "
                         "inference path (Linear4bit.forward does it when called in eval mode without grad); that "
                         "rounds its scales to bfloat16 and has no exact inverse. Apply the adapters before running "
                         "the model in eval mode, or reload the 4-bit model.")
    return state


STREAMED_BLOCKSIZE = 64
"""The quantization block size whose codes dequantized_row_blocks slices on CUDA (QLoRA's and
transformers' default), where bitsandbytes' kernel dequantizes each element from its code and its
block's scale alone. Its CPU kernel does not: rows 16-31 of a (32, 32) weight dequantized alone
differ from the same rows of the whole by up to 8e-4 (bitsandbytes 0.50.2), so on the CPU, and for
other block sizes, the weight is dequantized whole, as one block."""

NORM_BLOCK_BYTES_4BIT = 64 * 2**20
"""Largest float32 block of rows that dequantized_row_blocks hands out (also at most half of W0's
own size in its dtype, so a block never costs more than a dense dequantized copy would)."""


def dequantized_row_blocks(linear: nn.Module) -> Iterator[tuple[int, int, Tensor]]:
    """(start, stop, W0[start:stop]) of a Linear4bit, dequantized block of rows by block of rows.

    Each block is bitsandbytes' own dequantization of the codes and scales of those rows (the
    scales of double quantization dequantized once, as ``dequantize_4bit`` does), so the blocks are
    bitwise the rows of ``dequantize_weight(linear)``, without ever holding the whole dense W0.
    Blocks start on rows whose first element begins a quantization block. A weight on the CPU, or
    quantized in blocks of other than STREAMED_BLOCKSIZE elements, comes as one block
    (dequantize_weight; see STREAMED_BLOCKSIZE).
    """
    bnb = require_bitsandbytes()
    state = _quant_state_4bit(linear)
    out_f, in_f = state.shape
    if state.blocksize != STREAMED_BLOCKSIZE or not linear.weight.is_cuda:
        yield 0, out_f, dequantize_weight(linear)
        return
    absmax = state.absmax
    if state.nested:
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    absmax = absmax.float()
    packed = linear.weight.data.view(torch.uint8).reshape(-1)  # two codes per byte, row-major
    size = torch.finfo(state.dtype).bits // 8
    budget = min(NORM_BLOCK_BYTES_4BIT, max(1, out_f * in_f * size // 2))
    unit = state.blocksize // math.gcd(in_f, state.blocksize)  # rows that end on a quantization block
    rows = max(unit, budget // (4 * in_f) // unit * unit)
    for start in range(0, out_f, rows):
        stop = min(start + rows, out_f)
        first, last = start * in_f, stop * in_f                     # element range; first % blocksize == 0
        codes = packed[first // 2:(last + 1) // 2].reshape(-1, 1)
        scales = absmax[first // state.blocksize:-(-last // state.blocksize)]
        block = torch.ops.bitsandbytes.dequantize_4bit.default(codes, scales, state.blocksize, state.quant_type,
                                                               (stop - start, in_f), state.dtype)
        yield start, stop, block


@torch.no_grad()
def streamed_dora_norm(linear: nn.Module, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """||W0 + s·B·A||_c (out,) float32 of a Linear4bit's W0, no graph: each block of rows of V is
    formed from its own dequantized rows (dequantized_row_blocks), squared and summed, so the norm
    never holds the dense W0 (the same sum as functional.direct_norm_sq over dequantize_weight)."""
    A, B = lora_A.detach().float(), lora_B.detach().float()
    out = A.new_empty(lora_B.shape[0])
    for start, stop, block in dequantized_row_blocks(linear):
        v = block.to(torch.float32, copy=True).addmm_(B[start:stop], A, alpha=scaling)
        out[start:stop] = v.square_().sum(dim=1)
    return safe_sqrt(out)


def _dequantize_8bit(bnb: ModuleType, linear: nn.Module) -> Tensor:
    """C · absmax / 127 (out, in) float32, from the int8 codes and the per-row absmax (``SCB``), which
    sit on the weight until the layer's first forward and on ``linear.state`` after it."""
    weight = linear.weight
    if linear.state.has_fp16_weights:
        raise ValueError("this Linear8bitLt has has_fp16_weights=True: it keeps a trainable float16 weight and "
                         "re-quantizes it on every forward, so there is no frozen 8-bit base to adapt. Build it with "
                         "has_fp16_weights=False (what BitsAndBytesConfig(load_in_8bit=True) and "
                         "dk.quantize_model(model, bits=8) do).")
    scb = getattr(weight, "SCB", None)
    scb = linear.state.SCB if scb is None else scb
    if weight.dtype != torch.int8 or scb is None:
        raise ValueError("this Linear8bitLt is not quantized yet (bitsandbytes quantizes on the first move to a "
                         "device): call .to(device) on it, or build it with dk.quantize_model(model, bits=8).")
    return bnb.functional.int8_vectorwise_dequant(weight.data, scb.to(weight.device))


def quant_state(linear: nn.Module) -> object | None:
    """The bitsandbytes QuantState of a Linear4bit: the weight's own, else the copy bitsandbytes keeps on the
    module (``linear.quant_state``). Under FSDP2 the weight is a plain tensor of the packed bytes (a shard, or
    the all-gathered whole inside the forward) that has lost the attribute; the module's copy is the same state."""
    state = getattr(linear.weight, "quant_state", None)
    return getattr(linear, "quant_state", None) if state is None else state


def matmul_8bit(linear: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
    """x W0ᵀ (+ bias) through bitsandbytes' 8-bit matmul, as Linear8bitLt.forward computes it.

    Linear8bitLt.forward itself is not called: it casts ``bias.data`` to x's dtype in place, which would
    change a trainable bias under the optimizer. Its one-time move of the codes and scales from the weight
    to ``linear.state`` is done here too, except that scales already in the state are kept: a ``.to()``
    after the first forward gives the weight its codes back but not its scales, and bitsandbytes 0.50's
    own forward then replaces the state's scales by None (its next matmul fails).
    """
    bnb = require_bitsandbytes()
    state, weight = linear.state, linear.weight
    state.is_training = linear.training  # CPU, training: exact dequantize + matmul; else LLM.int8() on x too
    if weight.CB is not None:
        state.CB, weight.CB = weight.CB, None
        if weight.SCB is not None:
            state.SCB, weight.SCB = weight.SCB, None
    if bias is not None:
        bias = bias.to(x.dtype)
    return bnb.matmul(x, linear.weight, bias=bias, state=state)


def matmul_4bit(linear: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
    """x W0ᵀ (+ bias) through bitsandbytes' 4-bit kernel, as Linear4bit.forward computes it.

    Linear4bit.forward itself is not called: it writes to the module (it casts ``bias.data`` to the
    compute dtype, and on AVX512-BF16 CPUs repacks the weight), which would change parameters under a
    trainable bias and under the cached norms.
    """
    bnb = require_bitsandbytes()
    if not getattr(linear, "compute_type_is_set", True):  # first call: bnb picks the compute dtype from x
        linear.set_compute_type(x)
        linear.compute_type_is_set = True
    in_dtype = x.dtype
    if linear.compute_dtype is not None:
        x = x.to(linear.compute_dtype)
    if bias is not None:
        bias = bias.to(x.dtype)
    return bnb.matmul_4bit(x, linear.weight.t(), bias=bias, quant_state=quant_state(linear)).to(in_dtype)


class QuantizedLinearAdapter(AdapterLayer):
    """Adapter around a bitsandbytes quantized linear layer: W0 = dequant(Q) (out, in), y = x W'ᵀ + b.

    LoRA, DoRA or magnitude-only over the frozen quantized base; the adapter trains in float32 (the
    dequantized weight's dtype if that is float64). Subclasses say how the base product is run
    (``_matmul``); see the module docstring for what is dequantized when.
    """

    bits: int = 0

    def weight_2d(self) -> Tensor:
        """W0 = dequant(Q) as (out, in): dequantized on every call and never stored."""
        return dequantize_weight(self.base_layer)

    def _matmul(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """x W0ᵀ (+ bias) through bitsandbytes' kernel for this base."""
        raise NotImplementedError

    def _weight_from_2d(self, w2d: Tensor) -> Tensor:
        raise AdapterStateError(_no_in_place(self.bits))

    def _base(self, x: Tensor) -> Tensor:
        return self._matmul(x, None)

    def _norm(self, grad: bool) -> Tensor:
        """||W0 + sBA||_c (out,) from a transient dequantization; checkpointed when it carries a gradient."""
        if self.variant == "dora" and self.bits == 4 and not (grad and torch.is_grad_enabled()):
            return streamed_dora_norm(self.base_layer, self.lora_A_2d(), self.lora_B_2d(), self.scaling)
        if self.variant == "magnitude" or not (grad and torch.is_grad_enabled()):
            return super()._norm(grad)

        def norm(A: Tensor, B: Tensor) -> Tensor:  # the norm's gradient needs W0: dequantized again in backward
            return dora_norm(self.weight_2d(), A, B, self.scaling)

        return checkpoint(norm, self.lora_A_2d(), self.lora_B_2d(), use_reentrant=False)

    def _plain_forward(self, x: Tensor) -> Tensor:
        """The base layer's output (disabled, eager LoRA's base product, rows without an adapter):
        bitsandbytes' product, not Linear4bit.forward (which writes to the module; see matmul_4bit)."""
        return self._matmul(x, self.base_layer.bias)

    def merge(self, name: str | None = None) -> None:
        raise AdapterStateError(_no_in_place(self.bits))

    @torch.no_grad()
    def dequantize_and_merge(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A new dense ``nn.Linear`` holding W' (dequant(Q) with the adapter folded in) and the bias.

        W' is formed in float32 (``functional.dora_merged_weight``) and stored in ``dtype`` (default:
        the dequantized weight's dtype: for 4 bits the dtype the base was quantized from, for 8 bits
        float32, as Linear8bitLt does not record it). The quantized layer and this adapter are left as
        they are.
        """
        w = self._adapted()[0]                                            # (out, in)
        base = self.base_layer
        dense = nn.Linear(w.shape[1], w.shape[0], bias=base.bias is not None, device=w.device,
                          dtype=dtype or w.dtype)
        dense.weight.copy_(w)
        dense.weight.requires_grad_(False)                                # the base stays frozen
        if base.bias is not None:
            dense.bias.copy_(base.bias)
            dense.bias.requires_grad_(base.bias.requires_grad)
        return dense.train(self.training)


class Linear4bitAdapter(QuantizedLinearAdapter):
    """QLoRA / QDoRA over a bitsandbytes ``Linear4bit`` (NF4 / FP4).

    Two paths. The eager one (backend "torch"; "auto" for LoRA, on the CPU and above rank 128):
    bitsandbytes' product, the norm streamed over blocks of dequantized rows, DoRA's combination as in AdapterLayer.
    Backend "fused" / "triton": one autograd Function (kernels.dora_linear.DequantizedLinearFunction)
    that dequantizes W0 once in forward for both the norm and the product (x W0ᵀ on the dense W0, as
    bitsandbytes computes it for more than a few rows) and once more in backward, the rest as DoRA on a
    dense layer; no dense W0 is kept between forward and backward. It runs where the input is in W0's
    dtype (the dtype it was quantized from, and bitsandbytes' compute dtype), without autocast, and
    not while dropout is active in training.
    """

    bits = 4

    def _matmul(self, x: Tensor, bias: Tensor | None) -> Tensor:
        return matmul_4bit(self.base_layer, x, bias)

    def _static_unsupported(self, impl: str) -> str | None:
        return self._variant_unsupported(impl)  # a 4-bit base has the fused / Triton paths (_fast_forward)

    def _auto_order(self, on_cuda: bool) -> tuple[str, ...]:
        """Triton for DoRA on CUDA where FastPath would take it (QUANT_TRITON_AUTO); otherwise the eager path:
        the torch-fused Function was slower than the eager path for a 4-bit base (see QUANT_TRITON_AUTO)."""
        return tuple(impl for impl in super()._auto_order(on_cuda) if impl == "triton") if QUANT_TRITON_AUTO else ()

    def _runtime_unsupported(self, impl: str, x: Tensor) -> str | None:
        state = _quant_state_4bit(self.base_layer)
        compute = getattr(self.base_layer, "compute_dtype", None)
        if self._dropout_active():
            return DROPOUT_REASON
        if _autocast_dtype(x) is not None:
            return "autocast is on (the path takes the input in W0's dtype)"
        if x.dtype != state.dtype or compute not in (None, x.dtype):
            return (f"the input is {x.dtype}, W0 was quantized from {state.dtype} and the compute dtype is {compute}; "
                    "the path needs all three equal")
        return _triton_device_unsupported(x.device) if impl == "triton" else None

    def _fast_forward(self, x: Tensor, impl: str) -> Tensor:
        return DequantizedLinearFunction.apply(x, functools.partial(dequantize_weight, self.base_layer),
                                               self.base_layer.bias, self.lora_A, self.lora_B,
                                               self.magnitude if self.variant == "dora" else None, self.scaling, impl)


class Linear8bitAdapter(QuantizedLinearAdapter):
    """LoRA / DoRA over a bitsandbytes ``Linear8bitLt`` (LLM.int8() weights, has_fp16_weights=False)."""

    bits = 8

    def _matmul(self, x: Tensor, bias: Tensor | None) -> Tensor:
        return matmul_8bit(self.base_layer, x, bias)


def _no_in_place(bits: int) -> str:
    return (f"a {bits}-bit base cannot hold the merged weight: storing W' in {bits} bits would round it a second "
            "time. Use dk.merge_and_unload(model) (or layer.dequantize_and_merge()) to export a dense model with W', "
            "or keep the adapter unmerged.")


# ---- building quantized layers -------------------------------------------------------------------

def quantize_linear(linear: nn.Linear, *, quant_type: str = "nf4", double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None, blocksize: int = 64) -> nn.Module:
    """A bitsandbytes Linear4bit holding ``linear``'s weight, quantized on ``linear``'s device.

    Args:
        quant_type: "nf4" (QLoRA's 4-bit NormalFloat) or "fp4".
        double_quant: also quantize the per-block absmax scales to 8 bits (QLoRA §3).
        compute_dtype: dtype of x for the 4-bit matmul (None: bitsandbytes picks it from the input).
        blocksize: weights per absmax scale (QLoRA uses 64).
    """
    bnb = require_bitsandbytes()
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}.")
    if not _plain_linear(linear):
        raise TypeError(f"quantize_linear takes a plain nn.Linear, got {type(linear).__name__}.")
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type,
                          device="meta")
    q.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, blocksize=blocksize,
                                 compress_statistics=double_quant, quant_type=quant_type, module=q)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
    return q.to(linear.weight.device).train(linear.training)  # Params4bit quantizes on this move


def quantize_linear_8bit(linear: nn.Linear, *, threshold: float = 0.0) -> nn.Module:
    """A bitsandbytes Linear8bitLt (has_fp16_weights=False) holding ``linear``'s weight, quantized on
    ``linear``'s device: int8 codes per output row with their absmax (bitsandbytes casts W to float16
    first).

    Args:
        threshold: LLM.int8()'s outlier threshold on the *activations* (0: every column in int8;
            transformers' default is 6.0). It changes the base product in eval mode, never W0.
    """
    bnb = require_bitsandbytes()
    if not _plain_linear(linear):
        raise TypeError(f"quantize_linear_8bit takes a plain nn.Linear, got {type(linear).__name__}.")
    if not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}.")
    q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            has_fp16_weights=False, threshold=threshold, device="meta")
    # Int8Params quantizes only on a move away from the CPU's dense data, so it starts there.
    q.weight = bnb.nn.Int8Params(linear.weight.detach().to("cpu", copy=True), requires_grad=False,
                                 has_fp16_weights=False)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().to("cpu", copy=True), requires_grad=linear.bias.requires_grad)
    return q.to(linear.weight.device).train(linear.training)


def quantize_model(model: nn.Module, targets: Sequence[str] | None = None, *, bits: int = 4,
                   skip: Sequence[str] = ("lm_head", "classifier", "score"), **kwargs: object) -> list[str]:
    """Replace nn.Linear modules of ``model`` by 4-bit Linear4bit (or 8-bit Linear8bitLt) ones, in
    place; returns their names.

    For tests and small models: a transformers model is better loaded quantized directly with
    ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.bfloat16)`` (or ``load_in_8bit=True``), which never holds the dense weights.

    Args:
        targets: module names, each matching a full name or a dotted suffix (None: every nn.Linear).
        bits: 4 (NF4 / FP4, QLoRA) or 8 (LLM.int8()).
        skip: names (same rule) left dense: output heads by default, as QLoRA does.
        **kwargs: quantize_linear's options (quant_type, double_quant, compute_dtype, blocksize) for 4 bits,
            quantize_linear_8bit's (threshold) for 8.
    """
    require_bitsandbytes()
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}.")
    build = quantize_linear if bits == 4 else quantize_linear_8bit

    def hit(name: str, patterns: Sequence[str]) -> bool:
        return any(name == p or name.endswith("." + p) for p in patterns)

    names = [n for n, m in model.named_modules()
             if n and _plain_linear(m) and (targets is None or hit(n, targets)) and not hit(n, skip)]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, build(getattr(owner, child), **kwargs))
    return names


def _plain_linear(module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
            and not parametrize.is_parametrized(module))
