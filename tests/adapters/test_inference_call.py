"""The inference call inside dk.cached_norms (fast_path.FastPath._inference_call): the decode loop's path.

It must give the values the autograd Function gives outside the block (the same products, bitwise),
skip the Function, follow every change its state can see (W0, A, B, m, s, backend, dtype, autocast,
hooks, the active adapter) and never run where it does not apply (grad, training, magnitude-only).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import Tensor, nn

import dorakit as dk
from dorakit.adapters import fast_path


def _model(variant: str, dtype: torch.dtype = torch.float32, names: tuple[str, ...] = ()) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 18, dtype=dtype), nn.ReLU(), nn.Linear(18, 12, bias=False, dtype=dtype))
    config = (dk.AdapterConfig(method="dora", rank=4, targets=["0"], magnitude_only=["2"]) if variant == "magnitude"
              else dk.AdapterConfig(method=variant, rank=4, targets=["0", "2"]))
    dk.apply_adapters(model, config)
    for name in names:
        dk.add_adapter(model, config, name=name)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in dk.adapter_layers(model):
            for name in layer.hosted_names():
                with layer.bound(name):
                    if layer.lora_B is not None:
                        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)
                    if getattr(layer, "magnitude", None) is not None:
                        layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=gen).to(dtype))
    return model.eval()


def _outside(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x)


def _inside(model: nn.Module, x: Tensor, calls: int = 3) -> list[Tensor]:
    with torch.no_grad(), dk.cached_norms(model):
        return [model(x) for _ in range(calls)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("variant", ["dora", "lora"])
def test_inference_call_equals_the_function_bitwise_and_skips_it(variant: str, dtype: torch.dtype,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(variant, dtype)
    x = torch.randn(3, 5, 24, dtype=dtype)
    ref = _outside(model, x)
    layers = [layer for _, layer in dk.adapter_layers(model)]
    assert all(layer._fast_impl(x) == "fused" for layer in layers)

    def no_function(*args: object, **kw: object) -> None:
        raise AssertionError("the inference call must not run the autograd Function")

    with torch.no_grad(), dk.cached_norms(model):
        first = model(x)  # builds the packs (this call may take the Function)
        assert all(layer._infer_cache is not None and layer._infer_cache[1] is not None for layer in layers)
        monkeypatch.setattr(fast_path, "dora_linear", no_function)
        again = [model(x) for _ in range(2)]
        monkeypatch.undo()
    for y in (first, *again):
        assert y.dtype == ref.dtype and y.equal(ref)
    assert all(layer._infer_cache is None for layer in layers)  # dropped on exit


def test_inference_call_follows_changes_it_can_see() -> None:
    """After each change inside the block the output equals the Function's outside it."""
    model = _model("dora")
    x = torch.randn(4, 24)
    first, second = model[0], model[2]
    changes = [
        lambda: first.magnitude.mul_(1.5),  # g = m / n is kept in the pack: m's version is in its state
        lambda: first.lora_A.add_(0.1),
        lambda: second.base_layer.weight.mul_(0.5),
        lambda: setattr(first, "scaling", first.scaling * 2),
        lambda: first.base_layer.bias.add_(1.0),  # the bias is read on every call, never kept
    ]
    for change in changes:
        with torch.no_grad(), dk.cached_norms(model):
            before = [model(x) for _ in range(2)][-1]
            assert first._infer_cache[1] is not None
            change()
            after = model(x)
        assert not after.equal(before)
        assert after.equal(_outside(model, x))
    with torch.no_grad(), dk.cached_norms(model):
        model(x)
        second.backend = "torch"  # the eager path: the pack is dropped (the values may agree bitwise)
        y = model(x)
        assert second._infer_cache[1] is None and first._infer_cache[1] is not None
    assert y.equal(_outside(model, x))


def test_inference_call_under_autocast_and_grad_runs_as_outside() -> None:
    model = _model("dora")
    x = torch.randn(4, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _outside(model, x)
        with torch.no_grad(), dk.cached_norms(model):
            y = model(x)
            assert model[0]._infer_cache is not None and model[0]._infer_cache[1] is None  # no pack under autocast
    assert y.dtype == torch.bfloat16 and y.equal(ref)
    with dk.cached_norms(model):
        y = model(x)  # grad enabled: the Function, no pack
        assert y.requires_grad and model[0]._infer_cache is None
    model.train()
    with torch.no_grad(), dk.cached_norms(model):
        model(x)
        assert model[0]._infer_cache is None  # training mode: never kept


def test_each_named_adapter_keeps_its_own_pack() -> None:
    """set_adapter swaps the adapter's tensors and its pack with them: alternating adapters inside one
    block gives each adapter's own output (outside the block: the Function)."""
    model = _model("dora", names=("b",))
    x = torch.randn(4, 24)
    refs = {}
    for name in ("default", "b"):
        dk.set_adapter(model, name)
        refs[name] = _outside(model, x)
    assert not refs["default"].equal(refs["b"])
    with torch.no_grad(), dk.cached_norms(model):
        for name in ("default", "b", "default", "b"):
            dk.set_adapter(model, name)
            assert model(x).equal(refs[name])
        assert model[0].adapters["b"]._infer_cache is not None  # the own adapter's pack, parked in its slot


def test_magnitude_only_and_hooked_lora_take_no_pack() -> None:
    x = torch.randn(4, 24)
    model = _model("magnitude")
    with torch.no_grad(), dk.cached_norms(model):
        y = model(x)
        assert model[2]._infer_cache is None and model[0]._infer_cache[1] is not None  # magnitude-only: no state
    assert y.equal(_outside(model, x))
    lora = _model("lora")
    calls = []
    lora[0].base_layer.register_forward_hook(lambda mod, inp, out: calls.append(1))
    with torch.no_grad(), dk.cached_norms(lora):
        ys = [lora(x) for _ in range(3)]
        assert lora[0]._infer_cache[1] is None and lora[2]._infer_cache[1] is not None
    assert len(calls) == 3 and ys[-1].equal(_outside(lora, x))  # the hook ran on every call


@pytest.mark.parametrize("method", ["vera", "dvora"])
def test_vera_inside_the_block_equals_outside(method: str) -> None:
    """VeRA / DVoRA (A and B derived, not parameters) take no pack and give the same output inside the block."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 12))
    dk.apply_adapters(model, dk.AdapterConfig(method=method, rank=4, targets=["0", "2"]))
    with torch.no_grad():
        for _, layer in dk.adapter_layers(model):
            layer.vera_lambda_b.normal_(std=0.3)
    model.eval()
    x = torch.randn(3, 16)
    ref = _outside(model, x)
    with torch.no_grad(), dk.cached_norms(model):
        ys = [model(x) for _ in range(2)]
        assert model[0]._infer_cache is None
    assert all(y.equal(ref) for y in ys)


# ---- the one-launch decode kernel (kernels/triton_decode.py) -------------------------------------------
# On CPU it runs under TRITON_INTERPRET=1 (tests/conftest.py) in float32 and float16 (the interpreter's
# bfloat16 dot is wrong); bfloat16 is checked on CUDA by the gpu-marked test.

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REL_TOL = {torch.float32: 1e-5, torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8}


def _decode_reference(x: Tensor, W: Tensor, A: Tensor, B: Tensor, g: Tensor | None, bias: Tensor | None,
                      seg: Tensor) -> Tensor:
    """float64, row i through slot seg[i] of the packs A (S, R, K), B (S, N, R), g (S, N); h rounded to
    x's dtype as the kernel (and F.linear) rounds it."""
    d, idx = torch.float64, seg.long()
    h = torch.einsum("mk,mrk->mr", x.to(d), A[idx].to(d)).to(x.dtype).to(d)
    y = x.to(d) @ W.to(d).T + torch.einsum("mr,mnr->mn", h, B[idx].to(d))
    y = y if g is None else y * g[idx].to(d)
    return y if bias is None else y + bias.to(d)


def _check_decode(dtype: torch.dtype, rows: int, n: int, k: int, r: int, dora: bool, bias: bool,
                  slots: int = 1) -> None:
    """decode_linear against float64: one adapter (2-D A, B, no seg) or a pack of ``slots`` with each row's slot."""
    from dorakit.adapters.kernels.triton_decode import decode_linear

    gen = torch.Generator().manual_seed(rows * 1000 + n + r + slots)
    def make(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)
    x, W = make(rows, k), make(n, k, scale=k**-0.5)
    A, B = make(slots, r, k, scale=k**-0.5), make(slots, n, r, scale=0.1)
    g = (torch.rand(slots, n, generator=gen) + 0.5).to(DEVICE) if dora else None
    b = make(n) if bias else None
    seg = torch.randint(0, slots, (rows,), generator=gen, dtype=torch.int32).to(DEVICE)
    if slots == 1:
        y = decode_linear(x, W, A[0], B[0], None if g is None else g[0], b)
    else:
        y = decode_linear(x, W, A, B, g, b, seg)
    ref = _decode_reference(x, W, A, B, g, b, seg)
    assert y.shape == (rows, n) and y.dtype == dtype
    err = (y.double() - ref).abs().max().item()
    assert err <= REL_TOL[dtype] * ref.abs().max().item(), (dtype, rows, n, k, r, slots, err)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,n,k,r,dora,bias,slots", [
    (1, 70, 200, 12, True, True, 1), (5, 64, 128, 16, False, False, 1), (16, 33, 129, 5, True, False, 1),
    (2, 96, 64, 128, False, True, 1),
    (32, 33, 129, 16, True, True, 9),  # 8 adapters + "none": 144 stacked ranks, two passes of 128
    (64, 50, 96, 8, True, False, 20), (3, 40, 64, 64, False, True, 3)])
def test_decode_kernel_matches_float64(dtype: torch.dtype, rows: int, n: int, k: int, r: int, dora: bool,
                                       bias: bool, slots: int) -> None:
    _check_decode(dtype, rows, n, k, r, dora, bias, slots)


def test_decode_kernel_rejects_what_it_cannot_take() -> None:
    pytest.importorskip("triton")
    from dorakit.adapters.kernels.triton_decode import decode_linear

    x, W = torch.randn(65, 8, device=DEVICE), torch.randn(6, 8, device=DEVICE)
    with pytest.raises(ValueError, match="at most 64 rows"):
        decode_linear(x, W, torch.randn(2, 8, device=DEVICE), torch.randn(6, 2, device=DEVICE), None, None)
    with pytest.raises(ValueError, match="needs seg"):
        decode_linear(x[:2], W, torch.randn(3, 2, 8, device=DEVICE), torch.randn(3, 6, 2, device=DEVICE), None, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows,n,k,r,slots", [(1, 2048, 2048, 16, 1), (16, 5632, 2048, 64, 1),
                                              (3, 4096, 14336, 128, 1), (32, 4096, 4096, 16, 9)])
def test_gpu_decode_kernel_bfloat16(rows: int, n: int, k: int, r: int, slots: int) -> None:
    _check_decode(torch.bfloat16, rows, n, k, r, dora=True, bias=True, slots=slots)


@needs_triton
@pytest.mark.parametrize("variant", ["dora", "lora"])
def test_layer_calls_of_few_rows_take_the_decode_kernel(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """backend="triton" inside cached_norms: <= DECODE_MAX_ROWS rows take the kernel, more rows the Function's
    products; both equal the Function's output outside the block (float32, to float32 rounding)."""
    from dorakit.adapters.kernels import DECODE_MAX_ROWS, triton_decode

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 24, device=DEVICE))
    dk.apply_adapters(model, dk.AdapterConfig(method=variant, rank=8, targets=["0"], backend="triton"))
    with torch.no_grad():
        model[0].lora_B.normal_(std=0.1)
    model.eval()
    calls = []
    kernel = triton_decode.decode_linear
    monkeypatch.setattr(triton_decode, "decode_linear", lambda *a: calls.append(a[0].shape[0]) or kernel(*a))
    for rows in (1, DECODE_MAX_ROWS, DECODE_MAX_ROWS + 1):
        x = torch.randn(rows, 1, 40, device=DEVICE)
        ref = _outside(model, x)
        with torch.no_grad(), dk.cached_norms(model):
            ys = [model(x) for _ in range(2)]
        for y in ys:
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert calls == [1, 1, DECODE_MAX_ROWS, DECODE_MAX_ROWS]  # two calls each; DECODE_MAX_ROWS + 1 rows never


def test_auto_takes_the_decode_kernel_only_on_cuda_where_allowed() -> None:
    model = _model("dora")
    layer = model[0]
    x = torch.randn(1, 24)
    assert not layer._decode_allowed(x)  # CPU, backend "auto": never (not even interpreted)
    layer.backend = "torch"
    assert not layer._decode_allowed(x)


def test_compiled_model_inside_the_block_traces_the_custom_op() -> None:
    """While torch.compile traces, no pack is kept (the graph takes dorakit's custom op): the compiled
    model's output inside the block equals the eager one, with no graph break from the pack."""
    model = _model("dora")
    x = torch.randn(4, 24)
    ref = _outside(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), dk.cached_norms(model):
        y = compiled(x)
        assert model[0]._infer_cache is None
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)


def _one_linear() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 18))
    dk.apply_adapters(model, dk.AdapterConfig(method="dora", rank=4, targets=["0"]))
    return model.eval()


def test_adapter_added_inside_the_block_is_dropped_after_a_fused_step() -> None:
    """A slot added inside the block (add_adapter, add_weighted_adapter, load_adapter) is dropped by the
    optimizer-step hook too: a fused optimizer bumps no version counter, so only the hook can see the step."""
    model = _one_linear()
    x = torch.randn(4, 24)
    with dk.cached_norms(model):
        dk.add_adapter(model, dk.AdapterConfig(method="dora", rank=4, targets=["0"]), name="b")
        dk.set_adapter(model, "b")  # b trains (model stays in eval mode: no dropout)
        with torch.no_grad():
            model(x)  # builds b's pack
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1, fused=True)
        model(x).square().sum().backward()
        opt.step()
        with torch.no_grad():
            inside = model(x)
    with torch.no_grad():
        outside = model(x)
    torch.testing.assert_close(inside, outside)
