"""Tests for dorakit.adapters.quant over bitsandbytes 8-bit (LLM.int8(), ``Linear8bitLt``) bases, on the CPU.

As for 4 bits (test_quant.py), the reference is DoRA / LoRA on a dense ``nn.Linear`` holding
W0 = dequant(Q) = C · absmax / 127: dorakit's LinearAdapter in float64. In training mode bitsandbytes'
CPU matmul is exactly x dequant(C)ᵀ, so the 8-bit adapter must equal that reference up to float32
rounding. In eval mode LLM.int8() also rounds x to int8: the adapter must then be DoRA over that product.

Every test skips when bitsandbytes is not installed.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dorakit as dk
from fixtures_quant import Allocations, assert_matches_twin, grads
from dorakit.adapters import quant
from dorakit.adapters.inject import adapter_class
from dorakit.adapters.layers import AdapterStateError, LinearAdapter
from dorakit.adapters.quant import Linear8bitAdapter, dequantize_weight, quantize_linear_8bit, quantize_model

F64 = torch.float64
RANK, ALPHA = 3, 5.0
IN, OUT = 45, 37  # odd, non-square
# As in test_quant.py, decided up front: float32 dot products of <= 45 terms, the factored norm and the
# scale give at most a few·gamma_45 ≈ 1e-5 of the typical magnitude; bf16 against the same computation
# in bf16: 2 ulps relative.
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2 ** -7, "atol": 1e-3}}


@pytest.fixture
def bnb():
    bnb = pytest.importorskip("bitsandbytes")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16" per eval call
    return bnb


def make_pair(variant: str, bias: bool = True, *, norm_grad: str = "detach", seed: int = 0,
              threshold: float = 0.0) -> tuple[Linear8bitAdapter, LinearAdapter, Tensor]:
    """An 8-bit adapter, its dense float64 twin on an nn.Linear holding dequant(Q), and an input; both
    share A, B and m perturbed away from their init."""
    g = torch.Generator().manual_seed(seed)
    dense = nn.Linear(IN, OUT, bias=bias).requires_grad_(False)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(OUT, IN, generator=g) / math.sqrt(IN))
        if bias:
            dense.bias.copy_(torch.randn(OUT, generator=g))
    q = quantize_linear_8bit(dense, threshold=threshold)
    layer = Linear8bitAdapter(q, variant, RANK, ALPHA, norm_grad=norm_grad)
    twin_base = nn.Linear(IN, OUT, bias=bias, dtype=F64).requires_grad_(False)
    with torch.no_grad():
        twin_base.weight.copy_(dequantize_weight(q))
        if bias:
            twin_base.bias.copy_(q.bias)
    twin = LinearAdapter(twin_base, variant, RANK, ALPHA, norm_grad=norm_grad, backend="torch")
    with torch.no_grad():
        if layer.lora_A is not None:
            layer.lora_A.add_(0.3 * torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.copy_(0.5 * torch.randn(layer.lora_B.shape, generator=g))
        if layer.variant != "lora":
            layer.magnitude.mul_(0.5 + torch.rand(OUT, generator=g))
        for name, p in layer.named_parameters(recurse=False):
            getattr(twin, name).copy_(p)
    return layer, twin, torch.randn(2, 3, IN, generator=g)


# ---- the adapter is DoRA / LoRA on the dequantized weight --------------------------------------

def test_dequantized_weight_is_codes_times_row_absmax_over_127(bnb) -> None:
    dense = nn.Linear(IN, OUT).requires_grad_(False)
    q = quantize_linear_8bit(dense)
    codes, scb = q.weight.data, q.weight.SCB
    assert codes.dtype == torch.int8 and scb.shape == (OUT,)
    w0 = dequantize_weight(q)
    assert w0.dtype == torch.float32 and w0.shape == (OUT, IN)
    torch.testing.assert_close(w0.double(), codes.double() * scb.double().unsqueeze(1) / 127, rtol=2e-7, atol=0)
    # LLM.int8() rounds w·127/absmax (a row's absmax) to an integer level: half a level, plus float16
    # rounding of w and of w·127/absmax (bitsandbytes computes in float16), 2^-11 · 127 levels each.
    level = dense.weight.abs().amax(dim=1, keepdim=True) / 127
    assert bool(((w0 - dense.weight).abs() <= (0.5 + 2 * 2 ** -11 * 127) * level).all())
    assert not torch.equal(w0, dense.weight)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("variant", ["lora", "dora", "magnitude"])
def test_output_and_gradients_match_dense_adapter(bnb, variant: str, bias: bool) -> None:
    layer, twin, x = make_pair(variant, bias)
    assert_matches_twin(layer, twin, x, TOL[torch.float32])


@pytest.mark.parametrize("variant", ["dora", "magnitude"])
def test_exact_norm_gradient_matches_dense_adapter(bnb, variant: str) -> None:
    layer, twin, x = make_pair(variant, norm_grad="exact")
    assert_matches_twin(layer, twin, x, TOL[torch.float32], same_names=False)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_bfloat16_input_matches_float64_reference_normwise(bnb, variant: str) -> None:
    """bf16 activations: bitsandbytes multiplies by W0 rounded to bf16, while the DoRA norm uses the float32
    W0 (an 8-bit base does not record a dtype), so no bf16 twin computes the same thing. Against the float64
    reference, every output and gradient is within 2 bf16 ulps (2^-7) of its tensor's largest entry."""
    layer, twin, x = make_pair(variant)
    x = x.bfloat16()
    y, g = grads(layer, x)
    y_ref, g_ref = grads(twin, x.to(F64))
    assert y.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    for name, got, ref in [("y", y, y_ref)] + [(n, g[n], g_ref[n]) for n in g]:
        bound = 2 ** -7 * ref.abs().max().item()
        torch.testing.assert_close(got.double(), ref, rtol=2 ** -7, atol=bound, msg=name)


@pytest.mark.parametrize("threshold", [0.0, 1.0])
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_eval_mode_is_the_adapter_over_bitsandbytes_int8_product(bnb, variant: str, threshold: float) -> None:
    """In eval mode LLM.int8() rounds x to int8 too (threshold > 0: outlier columns of x stay float):
    y_eval = y_exact + g ⊙ (int8 product − exact product), g = m / ||W0 + sBA||_c (1 for LoRA)."""
    layer, twin, x = make_pair(variant, threshold=threshold)
    base = layer.base_layer
    with torch.no_grad():
        exact = base.train()(x)                                   # bnb's CPU training path: x dequant(C)ᵀ + b
        rounded = base.eval()(x)                                  # LLM.int8(): x rounded to int8 per row
        assert (rounded - exact).abs().max() > 1e-3               # the two products differ: the test can fail
        y_eval = layer.eval()(x)
        y_exact = twin(x.to(F64)).float()
        g = twin.dora_scale().float() if variant == "dora" else torch.ones(OUT)
    torch.testing.assert_close(y_eval, y_exact + g * (rounded - exact), **TOL[torch.float32])


def test_dora_at_init_is_the_8bit_base_in_both_modes(bnb) -> None:
    dense = nn.Linear(IN, OUT).requires_grad_(False)
    q = quantize_linear_8bit(dense)
    layer = Linear8bitAdapter(q, "dora", RANK, ALPHA)
    x = torch.randn(4, IN)
    for mode in (True, False):
        with torch.no_grad():
            torch.testing.assert_close(layer.train(mode)(x), q.train(mode)(x), **TOL[torch.float32])


def test_each_forward_dequantizes_at_most_once(bnb, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = quant.dequantize_weight
    monkeypatch.setattr(quant, "dequantize_weight", lambda linear: calls.append(1) or real(linear))
    for variant, per_step in (("dora", 1), ("lora", 0), ("magnitude", 1)):
        layer, _, x = make_pair(variant)
        calls.clear()
        for _ in range(3):
            layer(x).sum().backward()
        assert len(calls) == 3 * per_step, variant


@pytest.mark.parametrize("norm_grad", ["detach", "exact"])
@pytest.mark.parametrize("variant", ["dora", "lora"])
def test_no_dense_copy_of_the_weight_outlives_forward_or_backward(bnb, variant: str, norm_grad: str) -> None:
    layer, _, x = make_pair(variant, norm_grad=norm_grad)
    x = x.requires_grad_(True)
    codes = layer.base_layer.weight
    with Allocations(OUT * IN, codes) as forward:
        y = layer(x)
    assert forward.largest <= OUT * IN * 4 and forward.alive() == 0
    with Allocations(OUT * IN, codes) as backward:
        y.sum().backward()
    assert backward.largest <= OUT * IN * 4 and backward.alive() == 0


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_training_steps_reduce_the_loss_and_leave_the_base_alone(bnb, variant: str) -> None:
    g = torch.Generator().manual_seed(0)
    q = quantize_linear_8bit(nn.Linear(32, 24).requires_grad_(False))
    codes, scales = q.weight.data.clone(), q.weight.SCB.clone()
    torch.manual_seed(0)
    layer = Linear8bitAdapter(q, variant, 4, 8.0)
    w_target = dequantize_weight(q) + 0.1 * torch.randn(24, 2, generator=g) @ torch.randn(2, 32, generator=g)
    w_target = w_target * (0.8 + 0.4 * torch.rand(24, 1, generator=g))
    xs = torch.randn(64, 32, generator=g)
    ys = xs @ w_target.T + q.bias
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.0)
    losses = []
    for _ in range(40):
        loss = F.mse_loss(layer(xs), ys)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses[::8]
    assert torch.equal(q.weight.data, codes) and torch.equal(q.state.SCB, scales) and not q.weight.requires_grad


def test_a_move_after_the_first_forward_keeps_the_scales(bnb) -> None:
    """bitsandbytes 0.50: Int8Params.to() after a forward gives the weight its codes back but not its scales
    (PEFT's 8-bit DoRA does ``module.weight = module.weight.to(device)``; bnb's own forward then fails)."""
    layer, _, x = make_pair("dora")
    with torch.no_grad():
        before = layer(x)
        layer.base_layer.weight = layer.base_layer.weight.to("cpu")
        assert layer.base_layer.weight.CB is not None and layer.base_layer.weight.SCB is None
        torch.testing.assert_close(layer(x), before, rtol=0, atol=0)


# ---- model level: dispatch, merge / export, PEFT ---------------------------------------------------

def quantized_model(bnb, make_tiny) -> tuple[nn.Module, object]:
    tiny = make_tiny("llama")
    names = quantize_model(tiny.model, bits=8)
    assert len(names) == 14 and all(isinstance(tiny.model.get_submodule(n), bnb.nn.Linear8bitLt) for n in names)
    return tiny.model.train(), tiny  # training mode: bnb's exact CPU product (the llama has no dropout)


def test_dispatch_wraps_linear8bitlt_and_all_linear_finds_it(bnb, make_tiny) -> None:
    model, _ = quantized_model(bnb, make_tiny)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert adapter_class(q_proj) is Linear8bitAdapter
    report = dk.apply_adapters(model, dk.AdapterConfig(method="dora", rank=4, alpha=8, targets="all-linear"))
    assert len(report) == 14 and {w.base_type for w in report.wrapped} == {"Linear8bitLt"}
    dk.remove_adapters(model)
    assert model.model.layers[0].self_attn.q_proj is q_proj


def test_merge_in_place_is_refused_and_merge_and_unload_exports_dense(bnb, make_tiny, perturb) -> None:
    model, tiny = quantized_model(bnb, make_tiny)
    dk.apply_adapters(model, dk.AdapterConfig(method="dora", rank=4, alpha=8, targets=["q_proj", "v_proj"]))
    perturb(model)
    with pytest.raises(AdapterStateError, match="8-bit base cannot hold"):
        model.model.layers[0].self_attn.q_proj.merge()
    with pytest.raises(AdapterStateError, match=r"8-bit base .*Nothing was merged"):
        dk.merge_adapters(model)
    adapted = tiny.run()
    dk.merge_and_unload(model)
    assert not any(isinstance(m, dk.AdapterLayer) for m in model.modules())
    for block in model.model.layers:
        assert type(block.self_attn.q_proj) is nn.Linear and block.self_attn.q_proj.weight.dtype == torch.float32
        assert quant.is_linear8bit(block.self_attn.k_proj)
    torch.testing.assert_close(tiny.run(), adapted, **TOL[torch.float32])


def test_dequantize_and_merge_is_the_adapted_weight(bnb) -> None:
    layer, twin, x = make_pair("dora")
    dense = layer.dequantize_and_merge()
    assert type(dense) is nn.Linear and dense.weight.dtype == torch.float32
    torch.testing.assert_close(dense.weight, twin.adapted_weight_2d().float(), **TOL[torch.float32])
    assert layer.dequantize_and_merge(torch.bfloat16).weight.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(dense(x), layer(x), **TOL[torch.float32])


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_and_dorakit_load_each_others_files_on_a_transformers_8bit_model(bnb, make_tiny, perturb, tmp_path,
                                                                              method: str) -> None:
    """BitsAndBytesConfig(load_in_8bit=True): dorakit's file on PEFT's 8-bit model, and PEFT's on dorakit's.

    Compared in training mode (bnb's exact CPU product; the llama has no dropout): in eval mode LLM.int8()
    rounds activations, where float32 rounding differences between the two could flip a level."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    tiny = make_tiny("llama")
    tiny.model.save_pretrained(tmp_path / "base")

    def load() -> nn.Module:
        return transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True),
            device_map="cpu", dtype=torch.float32).train()

    ours = load()
    assert isinstance(ours.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    dk.apply_adapters(ours, dk.AdapterConfig(method=method, rank=4, alpha=8, targets="all-linear"))
    perturb(ours)
    dk.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(load(), tmp_path / "ours").train()
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
    torch.testing.assert_close(tiny.run(theirs), tiny.run(ours), **TOL[torch.float32])

    peft_model = peft.get_peft_model(load(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                             use_dora=method == "dora"))
    perturb(peft_model, seed=1)
    peft_model.save_pretrained(tmp_path / "theirs")
    again = load()
    dk.load_adapter(again, tmp_path / "theirs")
    assert isinstance(again.model.layers[0].self_attn.q_proj, Linear8bitAdapter)
    torch.testing.assert_close(tiny.run(again), tiny.run(peft_model), **TOL[torch.float32])


# ---- bad input -----------------------------------------------------------------------------------

def test_unquantized_or_fp16_weight_linear8bitlt_is_refused(bnb) -> None:
    unquantized = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)   # never moved: not quantized yet
    with pytest.raises(ValueError, match="not quantized yet"):
        Linear8bitAdapter(unquantized, "dora", RANK, ALPHA)
    model = nn.Sequential(unquantized)
    with pytest.raises(ValueError, match=r"module '0'.*not quantized yet"):
        dk.apply_adapters(model, dk.AdapterConfig(method="dora", rank=4, alpha=8, targets=["0"]))
    assert model[0] is unquantized
    with pytest.raises(ValueError, match="has_fp16_weights=True"):
        Linear8bitAdapter(bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=True), "dora", RANK, ALPHA)


def test_quantize_rejects_bad_arguments(bnb) -> None:
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantize_model(nn.Sequential(nn.Linear(8, 4)), bits=3)
    with pytest.raises(ValueError, match="threshold"):
        quantize_linear_8bit(nn.Linear(8, 4), threshold=-1.0)
    with pytest.raises(TypeError, match="plain nn.Linear"):
        quantize_linear_8bit(copy.deepcopy(quantize_linear_8bit(nn.Linear(64, 32))))
