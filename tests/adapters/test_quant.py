"""Tests for dorakit.adapters.quant: QLoRA / QDoRA over a bitsandbytes 4-bit (NF4 / FP4) base, on the CPU.

The reference is DoRA / LoRA on a dense ``nn.Linear`` holding W0 = dequant(Q): dorakit's
LinearAdapter in float64 (itself checked against an independent float64 reference in
test_layers.py). The 4-bit adapter must be exactly that adapter, up to float rounding: the
dequantized NF4 weight (code × absmax, formed in float32) is exactly representable, so every
difference comes from rounding the same formula in float32 instead of float64.

Every test but the missing-backend one skips when bitsandbytes is not installed.
"""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dorakit as dk
from fixtures_quant import Allocations, assert_matches_twin, grads
from dorakit.adapters import quant
from dorakit.adapters.inject import adapter_class
from dorakit.adapters.layers import AdapterStateError, LinearAdapter
from dorakit.adapters.quant import Linear4bitAdapter, dequantize_weight, quantize_linear, quantize_model

F64 = torch.float64
RANK, ALPHA = 3, 5.0
IN, OUT = 45, 37  # odd, non-square: out·in = 1665 is not a multiple of the block size 64
# Decided up front (as in test_layers.py). float32: u = 2^-24 ≈ 6e-8; dot products of <= 45 terms,
# the factored norm and the scale give at most a few·gamma_45 ≈ 1e-5 of the typical magnitude.
# bfloat16 against the same computation in bfloat16: the outputs are rounded to bf16 (u = 2^-8)
# once per side, from float32 accumulations that may differ in order: 2 ulps relative.
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2 ** -7, "atol": 1e-3}}
QUANTS = [{"quant_type": "nf4", "double_quant": True}, {"quant_type": "nf4", "double_quant": False},
          {"quant_type": "fp4", "double_quant": True}]


@pytest.fixture
def bnb():
    return pytest.importorskip("bitsandbytes")


def make_pair(variant: str, bias: bool = True, dtype: torch.dtype = torch.float32, *, norm_grad: str = "detach",
              seed: int = 0, backend: str = "auto", **quant_kw: object) -> tuple[Linear4bitAdapter, LinearAdapter, Tensor]:
    """A 4-bit adapter, its dense twin in float64 on an nn.Linear holding dequant(Q), and an input.

    Both share A (and B, m) perturbed away from their init, so DoRA's direction and scale matter.
    """
    g = torch.Generator().manual_seed(seed)
    dense = nn.Linear(IN, OUT, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(OUT, IN, generator=g) / math.sqrt(IN))
        if bias:
            dense.bias.copy_(torch.randn(OUT, generator=g))
    dense = dense.to(dtype).requires_grad_(False)
    q = quantize_linear(dense, compute_dtype=dtype, **quant_kw)
    layer = Linear4bitAdapter(q, variant, RANK, ALPHA, norm_grad=norm_grad, backend=backend)
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
    x = torch.randn(2, 3, IN, generator=g).to(dtype)
    return layer, twin, x


def bf16_twin(layer: Linear4bitAdapter, variant: str, backend: str) -> LinearAdapter:
    """A dense bf16 LinearAdapter holding dequant(Q) and ``layer``'s bias and adapter tensors."""
    twin_base = nn.Linear(IN, OUT, dtype=torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        twin_base.weight.copy_(dequantize_weight(layer.base_layer))
        twin_base.bias.copy_(layer.base_layer.bias)
    twin = LinearAdapter(twin_base, variant, RANK, ALPHA, backend=backend)
    with torch.no_grad():
        for name, p in layer.named_parameters(recurse=False):
            getattr(twin, name).copy_(p)
    return twin


# ---- the adapter is DoRA / LoRA on the dequantized weight --------------------------------------

@pytest.mark.parametrize("quant_kw", QUANTS, ids=lambda kw: f"{kw['quant_type']}-dq{int(kw['double_quant'])}")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("variant", ["lora", "dora", "magnitude"])
def test_output_and_gradients_match_dense_adapter(bnb, variant: str, bias: bool, quant_kw: dict) -> None:
    layer, twin, x = make_pair(variant, bias, **quant_kw)
    assert_matches_twin(layer, twin, x, TOL[torch.float32])


@pytest.mark.parametrize("variant", ["dora", "magnitude"])
def test_exact_norm_gradient_matches_dense_adapter(bnb, variant: str) -> None:
    """norm_grad="exact" (checkpointed on the 4-bit base) gives the dense adapter's gradients."""
    layer, twin, x = make_pair(variant, norm_grad="exact")
    assert_matches_twin(layer, twin, x, TOL[torch.float32], same_names=False)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_bfloat16_base_matches_dense_adapter_in_bfloat16(bnb, variant: str) -> None:
    """A bf16 model (the usual QLoRA setup): the same computation as the dense bf16 twin."""
    layer, _, x = make_pair(variant, dtype=torch.bfloat16)
    assert layer.lora_A.dtype == torch.float32                    # adapters train in float32, as in PEFT
    twin = bf16_twin(layer, variant, "torch")
    y, g = grads(layer, x)
    y_ref, g_ref = grads(twin, x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, **TOL[torch.bfloat16])
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], **TOL[torch.bfloat16], msg=name)


def test_magnitude_comes_from_the_dequantized_weight(bnb) -> None:
    dense = nn.Linear(IN, OUT).requires_grad_(False)
    q = quantize_linear(dense, compute_dtype=torch.float32)
    w0 = dequantize_weight(q)
    layer = Linear4bitAdapter(q, "dora", RANK, ALPHA)
    torch.testing.assert_close(layer.magnitude, w0.norm(dim=1), rtol=1e-6, atol=0)  # ||w_n|| of dequant(Q) ...
    assert not torch.allclose(layer.magnitude, dense.weight.norm(dim=1), rtol=1e-4, atol=0)  # ... not of the original W
    assert layer.weight_2d().shape == (OUT, IN) and layer.weight_2d() is not layer.weight_2d()  # never stored


def test_each_forward_dequantizes_at_most_once(bnb, monkeypatch: pytest.MonkeyPatch) -> None:
    """DoRA's and magnitude-only's per-step norms dequantize once (nothing of W0 is cached: issue 16):
    DoRA in one pass of row blocks, magnitude-only whole; LoRA never does."""
    calls = []
    whole, blocks = quant.dequantize_weight, quant.dequantized_row_blocks
    monkeypatch.setattr(quant, "dequantize_weight", lambda linear: calls.append("whole") or whole(linear))
    monkeypatch.setattr(quant, "dequantized_row_blocks", lambda linear: calls.append("blocks") or blocks(linear))
    # DoRA on the CPU: one pass whose one block is the whole weight (quant.STREAMED_BLOCKSIZE)
    for variant, per_step in (("dora", ["blocks", "whole"]), ("lora", []), ("magnitude", ["whole"])):
        layer, _, x = make_pair(variant)
        calls.clear()
        for _ in range(3):
            layer(x).sum().backward()
        assert calls == 3 * per_step, variant


@pytest.mark.parametrize("shape", [(OUT, IN), (130, 64), (9, 200)])
@pytest.mark.parametrize("quant_kw", QUANTS + [{"quant_type": "nf4", "double_quant": True, "blocksize": 128}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_row_blocks_are_the_rows_of_the_whole_dequantization(bnb, monkeypatch: pytest.MonkeyPatch,
                                                             shape: tuple[int, int], quant_kw: dict,
                                                             dtype: torch.dtype, device: str) -> None:
    """Bitwise: each block of dequantized_row_blocks is those rows of dequantize_weight, whatever the
    block size (forced small here, so rows that do not end on a quantization block are crossed)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    out_f, in_f = shape
    dense = nn.Linear(in_f, out_f).to(dtype).to(device)
    q = quantize_linear(dense, compute_dtype=dtype, **quant_kw)
    whole = dequantize_weight(q)
    unit = 64 // math.gcd(in_f, 64)  # rows per quantization-block boundary
    for budget in (1, 3 * in_f * 4, 2**30):
        monkeypatch.setattr(quant, "NORM_BLOCK_BYTES_4BIT", budget)
        spans = [(start, stop) for start, stop, block in quant.dequantized_row_blocks(q)
                 if torch.equal(block, whole[start:stop])]
        assert [s for s, _ in spans] == sorted(s for s, _ in spans) and spans[0][0] == 0 and spans[-1][1] == out_f
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), "the equal blocks tile every row"
        if device == "cuda" and budget == 1 and unit < out_f and quant_kw.get("blocksize", 64) == 64:
            assert len(spans) > 1


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_streamed_norm_is_the_dense_norm_without_a_dense_copy(bnb, device: str) -> None:
    """||dequant(Q) + sBA||_c against float64; on CUDA no tensor as large as the dense W0 in float32
    is made (on the CPU the weight is dequantized whole: STREAMED_BLOCKSIZE)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    dense = nn.Linear(IN + 19, OUT, device=device)  # in = 64: blocks of whole rows
    layer = Linear4bitAdapter(quantize_linear(dense, compute_dtype=torch.float32), "dora", RANK, ALPHA)
    with torch.no_grad():
        layer.lora_B.normal_()
    q = layer.base_layer
    ref = (dequantize_weight(q).double() + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()).norm(dim=1)
    with Allocations(OUT) as probe:
        norm = quant.streamed_dora_norm(q, layer.lora_A, layer.lora_B, layer.scaling)
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm.double(), ref, rtol=1e-6, atol=0)
    if device == "cuda":  # half the rows (W0 is float32 here), rounded up by a row
        assert probe.largest <= OUT * 64 * 4 // 2 + 4 * 64


# ---- memory: no dense copy of W0 outlives a step -------------------------------------------------

@pytest.mark.parametrize("norm_grad,backend", [("detach", "auto"), ("exact", "auto"), ("detach", "fused")])
@pytest.mark.parametrize("variant", ["dora", "lora", "magnitude"])
def test_no_dense_copy_of_the_weight_outlives_forward_or_backward(bnb, variant: str, norm_grad: str,
                                                                  backend: str) -> None:
    """The per-step norm dequantizes W0 transiently (the largest tensor made is one dense W0, (out, in)
    float32), and autograd keeps nothing of that size for backward, nor after it; backend "fused" too
    (DequantizedLinearFunction dequantizes again in backward instead of saving W0)."""
    if backend == "fused" and variant == "magnitude":
        pytest.skip("magnitude-only has no fused path")
    layer, _, x = make_pair(variant, norm_grad=norm_grad, backend=backend)
    x = x.requires_grad_(True)
    dense_bytes = OUT * IN * 4
    with Allocations(OUT * IN) as forward:
        y = layer(x)
    assert forward.largest <= dense_bytes
    assert forward.alive() == 0                                   # y and its graph are alive, no W0 copy is
    with Allocations(OUT * IN) as backward:
        y.sum().backward()
    assert backward.largest <= dense_bytes and backward.alive() == 0


def test_memory_probe_sees_a_dense_copy_kept_for_backward(bnb) -> None:
    """The probe above is not blind: F.linear on a dequantized W0 keeps W0 for the input gradient."""
    layer, _, x = make_pair("lora")
    x = x.requires_grad_(True)
    with Allocations(OUT * IN) as probe:
        y = F.linear(x, dequantize_weight(layer.base_layer))
    assert probe.alive() >= 1                                    # W0 (and its transposed view)
    del y


# ---- training ------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_training_steps_reduce_the_loss_and_leave_the_base_alone(bnb, variant: str) -> None:
    """Fit a target that is the base plus a low-rank update and a per-row rescaling (what DoRA models)."""
    g = torch.Generator().manual_seed(0)
    dense = nn.Linear(32, 24).requires_grad_(False)
    q = quantize_linear(dense, compute_dtype=torch.float32)
    packed = q.weight.data.clone()
    torch.manual_seed(0)
    layer = Linear4bitAdapter(q, variant, 4, 8.0)
    w_target = (dequantize_weight(q) + 0.1 * torch.randn(24, 2, generator=g) @ torch.randn(2, 32, generator=g))
    w_target = w_target * (0.8 + 0.4 * torch.rand(24, 1, generator=g))
    xs = torch.randn(64, 32, generator=g)
    ys = xs @ w_target.T + q.bias
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in layer.named_parameters(recurse=False)}
    losses = []
    for _ in range(40):
        loss = F.mse_loss(layer(xs), ys)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses[::8]
    for n, p in layer.named_parameters(recurse=False):
        assert not torch.equal(p, before[n]), f"{n} did not move"
    assert torch.equal(q.weight.data, packed) and not q.weight.requires_grad  # the 4-bit base is frozen


# ---- model level: dispatch, merge / export, PEFT ---------------------------------------------------

def _no_cpu_repack(model: nn.Module) -> nn.Module:
    """Turns off bitsandbytes' AVX512-BF16 CPU inference path in every Linear4bit of ``model``.

    On CPUs with AVX512-BF16, Linear4bit.forward in eval mode without grad repacks the weight in
    place for that kernel (its scales rounded to bfloat16), and the repacking fails on this tiny
    model's shapes (it needs out % 32 == 0 and in >= 64; k_proj is 16 × 32). dorakit's adapters never
    call Linear4bit.forward (quant.matmul_4bit), but the layers left unadapted and PEFT's layers do, so
    without this the tests would depend on the CPU they run on."""
    for module in model.modules():
        if quant.is_linear4bit(module):
            module.support_avx512bf16_for_cpu = False
    return model


def quantized_model(bnb, make_tiny) -> tuple[nn.Module, object]:
    tiny = make_tiny("llama")
    names = quantize_model(tiny.model, compute_dtype=torch.float32)
    _no_cpu_repack(tiny.model)
    assert len(names) == 14 and all(isinstance(tiny.model.get_submodule(n), bnb.nn.Linear4bit) for n in names)
    assert isinstance(tiny.model.lm_head, nn.Linear) and not quant.is_linear4bit(tiny.model.lm_head)
    return tiny.model, tiny


def test_dispatch_wraps_linear4bit_and_all_linear_finds_it(bnb, make_tiny) -> None:
    model, _ = quantized_model(bnb, make_tiny)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.Linear)                       # Linear4bit subclasses nn.Linear ...
    assert adapter_class(q_proj) is Linear4bitAdapter          # ... and still gets the 4-bit adapter
    report = dk.apply_adapters(model, dk.AdapterConfig(method="dora", rank=4, alpha=8, targets="all-linear"))
    assert len(report) == 14 and {w.base_type for w in report.wrapped} == {"Linear4bit"}
    assert report.wrapped[0].shape == (32, 32)
    dk.remove_adapters(model)
    assert model.model.layers[0].self_attn.q_proj is q_proj


def test_fused_backends_are_refused_with_a_reason(bnb) -> None:
    """backend "fused" / "triton" on a 4-bit base: LoRA and DoRA with the detached norm only; at run time,
    an input in W0's dtype without dropout in training; auto keeps the eager path on the CPU."""
    q = quantize_linear(nn.Linear(IN, OUT), compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="norm_grad='exact'"):
        Linear4bitAdapter(q, "dora", RANK, ALPHA, backend="fused", norm_grad="exact")
    with pytest.raises(ValueError, match="variant='magnitude'"):
        Linear4bitAdapter(q, "magnitude", RANK, ALPHA, backend="fused")
    layer, _, x = make_pair("dora", backend="fused")
    with pytest.raises(RuntimeError, match="needs all three equal"):
        layer(x.double())
    dropped = Linear4bitAdapter(quantize_linear(nn.Linear(IN, OUT), compute_dtype=torch.float32), "dora", RANK,
                                ALPHA, backend="fused", dropout=0.1)
    with pytest.raises(RuntimeError, match="dropout"):
        dropped(torch.randn(2, IN))
    dropped.eval()
    dropped(torch.randn(2, IN))                                  # eval mode: no dropout, the path runs
    auto, _, x = make_pair("dora")
    assert auto._fast_impl(x) is None                            # CPU input: auto keeps the eager path


@pytest.mark.parametrize(("variant", "rank", "want"), [("dora", 16, ("triton",)), ("dora", 160, ()), ("lora", 16, ())])
def test_auto_takes_only_the_timed_triton_path_on_cuda(bnb, variant: str, rank: int, want: tuple) -> None:
    """On CUDA "auto" takes the Function's Triton path for DoRA up to TRITON_AUTO_MAX_RANK (timed faster than
    the eager path), never its torch-fused variant (timed slower); LoRA and higher ranks stay eager."""
    layer = Linear4bitAdapter(quantize_linear(nn.Linear(IN, OUT), compute_dtype=torch.float32), variant, rank, ALPHA)
    assert layer._auto_order(on_cuda=True) == want
    assert layer._auto_order(on_cuda=False) == ()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("backend", ["fused", "triton"])
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_fused_backends_match_dense_adapter(bnb, variant: str, backend: str, bias: bool,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """backend "fused" / "triton" (kernels.dora_linear.DequantizedLinearFunction; Triton under the
    interpreter on the CPU): the same DoRA / LoRA on dequant(Q) as the eager path, and it is the path
    that runs (one dequantization in forward, one in backward for ∂L/∂x)."""
    if backend == "triton":
        pytest.importorskip("triton")
    layer, twin, x = make_pair(variant, bias, backend=backend)
    assert layer._fast_impl(x) == backend
    calls = []
    whole = quant.dequantize_weight
    monkeypatch.setattr(quant, "dequantize_weight", lambda linear: calls.append("whole") or whole(linear))
    assert_matches_twin(layer, twin, x, TOL[torch.float32])
    assert calls == ["whole", "whole"]


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_fused_backend_in_bfloat16_is_the_dense_fused_path(bnb, variant: str) -> None:
    """A bf16 model: backend "fused" on the 4-bit base computes what backend "fused" computes on a dense
    bf16 nn.Linear holding dequant(Q) (A and B cast to bf16 for the products, as on the dense layer),
    to the same bits (the Triton interpreter's bfloat16 dot is wrong: "triton" in bf16 is left to the gpu tests)."""
    layer, _, x = make_pair(variant, dtype=torch.bfloat16, backend="fused")
    twin = bf16_twin(layer, variant, "fused")
    y, g = grads(layer, x)
    y_ref, g_ref = grads(twin, x)
    assert y.dtype == torch.bfloat16 and y.equal(y_ref)
    assert set(g) == set(g_ref) and all(g[name].equal(g_ref[name]) for name in g)


def test_merge_in_place_is_refused_and_merge_and_unload_exports_dense(bnb, make_tiny, perturb) -> None:
    model, tiny = quantized_model(bnb, make_tiny)
    dk.apply_adapters(model, dk.AdapterConfig(method="dora", rank=4, alpha=8, targets=["q_proj", "lm_head"]))
    perturb(model)
    layer = model.model.layers[0].self_attn.q_proj
    with pytest.raises(AdapterStateError, match="merge_and_unload"):
        layer.merge()
    head = model.lm_head.base_layer.weight.detach().clone()
    with pytest.raises(AdapterStateError, match="Nothing was merged"):
        dk.merge_adapters(model)                               # lm_head (dense) is checked, not merged
    assert torch.equal(model.lm_head.base_layer.weight, head) and not model.lm_head.merged
    adapted = tiny.run()
    dk.merge_and_unload(model)
    assert not any(isinstance(m, dk.AdapterLayer) for m in model.modules())
    for block in model.model.layers:                           # the adapted 4-bit layers are dense now
        assert type(block.self_attn.q_proj) is nn.Linear and not block.self_attn.q_proj.weight.requires_grad
        assert quant.is_linear4bit(block.self_attn.k_proj)     # the others are untouched
    torch.testing.assert_close(tiny.run(), adapted, **TOL[torch.float32])


def test_dequantize_and_merge_is_the_adapted_weight(bnb) -> None:
    layer, twin, x = make_pair("dora")
    dense = layer.dequantize_and_merge()
    assert type(dense) is nn.Linear and dense.weight.dtype == torch.float32
    torch.testing.assert_close(dense.weight, twin.adapted_weight_2d().float(), **TOL[torch.float32])
    with torch.no_grad():
        torch.testing.assert_close(dense(x), layer(x), **TOL[torch.float32])


def test_save_then_peft_and_dorakit_load_on_a_transformers_4bit_model(bnb, make_tiny, perturb, tmp_path) -> None:
    """The user's path: a model loaded with BitsAndBytesConfig; the saved adapter is PEFT's."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    tiny = make_tiny("llama")
    tiny.model.save_pretrained(tmp_path / "base")
    bnb_cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)

    def load() -> nn.Module:
        return _no_cpu_repack(transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=bnb_cfg, device_map="cpu", dtype=torch.float32).eval())

    model = load()
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    dk.apply_adapters(model, dk.AdapterConfig(method="dora", rank=4, alpha=8, targets="all-linear"))
    perturb(model)
    ours = tiny.run(model)
    dk.save_adapter(model, tmp_path / "adapter")

    theirs = peft.PeftModel.from_pretrained(load(), tmp_path / "adapter").eval()
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"  # PEFT's bnb path
    torch.testing.assert_close(tiny.run(theirs), ours, **TOL[torch.float32])

    again = load()
    dk.load_adapter(again, tmp_path / "adapter")
    torch.testing.assert_close(tiny.run(again), ours, **TOL[torch.float32])


# ---- bad input -----------------------------------------------------------------------------------

def test_missing_bitsandbytes_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)     # import bitsandbytes now raises ImportError
    with pytest.raises(ImportError, match=r"pip install bitsandbytes"):
        quantize_linear(nn.Linear(8, 4))
    with pytest.raises(ImportError, match=r"dorakit\[quant\]"):
        quantize_model(nn.Sequential(nn.Linear(8, 4)))
    assert not quant.is_linear4bit(nn.Linear(8, 4))


def test_unquantized_or_repacked_linear4bit_is_refused(bnb) -> None:
    unquantized = bnb.nn.Linear4bit(64, 32, quant_type="nf4")    # never moved to a device: not quantized yet
    with pytest.raises(ValueError, match=r"not quantized yet"):
        Linear4bitAdapter(unquantized, "dora", RANK, ALPHA)
    model = nn.Sequential(unquantized)
    with pytest.raises(ValueError, match=r"module '0'.*not quantized yet"):
        dk.apply_adapters(model, dk.AdapterConfig(method="dora", rank=4, alpha=8, targets=["0"]))
    assert model[0] is unquantized
    q = quantize_linear(nn.Linear(64, 32))
    w = q.weight                                                 # what Linear4bit.forward does on AVX512-BF16 CPUs
    w.data, w.quant_state = bnb.functional._convert_weight_packed_for_cpu(w.data, w.quant_state)
    with pytest.raises(ValueError, match=r"repacked in place"):
        Linear4bitAdapter(q, "dora", RANK, ALPHA)


def test_quantize_linear_rejects_bad_arguments(bnb) -> None:
    with pytest.raises(ValueError, match="quant_type"):
        quantize_linear(nn.Linear(8, 4), quant_type="int4")
    with pytest.raises(TypeError, match="plain nn.Linear"):
        quantize_linear(copy.deepcopy(quantize_linear(nn.Linear(64, 32))))


# ---- CUDA (bitsandbytes' GPU kernels) -------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["auto", "fused", "triton"])
def test_cuda_qdora_matches_float64_reference_within_one_dense_copy_of_memory(bnb, backend: str) -> None:
    """bf16 QDoRA on bitsandbytes' CUDA kernels, on the eager path (auto) and through
    DequantizedLinearFunction (fused, triton): the float64 DoRA formula on dequant(Q), and the peak
    memory of a training step above the resident layer stays under 1.5 dense copies of W0."""
    if backend == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(0)
    out_f, in_f = 1024, 4096
    q = quantize_linear(nn.Linear(in_f, out_f, dtype=torch.bfloat16, device="cuda"), compute_dtype=torch.bfloat16)
    layer = Linear4bitAdapter(q, "dora", 8, 16.0, backend=backend)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.05)
        layer.magnitude.mul_(torch.empty_like(layer.magnitude).uniform_(0.5, 1.5))
        w = dequantize_weight(q).double()
        v = w + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
        w_adapted = layer.magnitude.double().unsqueeze(1) * v / v.norm(dim=1, keepdim=True)
        del w, v
    x = torch.randn(2, 16, in_f, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ w_adapted.T + q.bias.double()
    del w_adapted
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    y = layer(x)
    y.float().sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - resident
    assert y.dtype == torch.bfloat16
    # bf16 rounding of x W0ᵀ and of the output: a few bf16 epsilons (2^-8) of the output scale.
    assert (y.double() - ref).abs().max().item() <= 4 * 2.0 ** -8 * ref.abs().max().item()
    assert peak < 1.5 * out_f * in_f * 2, f"peak {peak / 2**20:.1f} MiB above the resident layer"


def test_parameter_counts_use_the_unpacked_size(bnb, make_tiny) -> None:
    """A 4-bit weight packs two values per byte; counts must not halve the base model."""
    tiny = make_tiny("llama")
    dense_total = sum(p.numel() for p in tiny.model.parameters())
    dk.quantize_model(tiny.model)
    assert sum(p.numel() for p in tiny.model.parameters()) < dense_total      # packed storage
    assert dk.count_parameters(tiny.model)[1] == dense_total


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_mixed_batch_rows_equal_each_adapter_alone(bnb, variant: str) -> None:
    """Named adapters on a 4-bit layer route a mixed batch: each row equals its adapter alone, and a row
    without one equals the base product (bitsandbytes', not Linear4bit.forward)."""
    gen = torch.Generator().manual_seed(9)
    model = nn.Sequential(quantize_linear(nn.Linear(IN, OUT), compute_dtype=torch.float32))
    config = dk.AdapterConfig(method=variant, rank=RANK, alpha=ALPHA, targets=["0"])
    dk.apply_adapters(model, config)
    dk.add_adapter(model, config, name="b")
    layer = model[0]
    with torch.no_grad():
        for name in ("default", "b"):
            with layer.bound(name):
                layer.lora_B.copy_(0.4 * torch.randn(layer.lora_B.shape, generator=gen))
    model.eval()
    x = torch.randn(3, IN, generator=gen)
    with torch.no_grad():
        with dk.adapter_routing(model, ["default", "b", None]):
            mixed = model(x)
        alone = []
        for name in ("default", "b"):
            dk.set_adapter(model, name)
            alone.append(model(x))
        base = quant.matmul_4bit(layer.base_layer, x, layer.base_layer.bias)
    torch.testing.assert_close(mixed[0], alone[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed[1], alone[1][1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed[2], base[2], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(alone[0][1], alone[1][1], rtol=1e-3, atol=1e-3)  # the adapters differ
