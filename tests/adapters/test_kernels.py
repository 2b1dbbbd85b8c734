"""Tests for dorakit.adapters.kernels: the fused and Triton DoRA paths against a dense float64 reference.

The reference forms V = W0 + s·B·A densely in float64, detaches ||V||_c (norm_grad="detach",
paper §4.3) and computes y = x (m ⊙ V / ||V||_c)ᵀ + b; autograd gives every gradient (x, A, B, m, b).
Without CUDA the Triton kernels run under TRITON_INTERPRET=1 on CPU tensors (float32 and float16:
the interpreter's bfloat16 dot is wrong, so bfloat16 kernels are checked by the gpu tests).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from torch import Tensor, nn

if not torch.cuda.is_available():  # must be set before triton_dora is imported (triton.jit reads it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dorakit as dk  # noqa: E402
from dorakit.adapters.functional import row_norm_sq  # noqa: E402
from dorakit.adapters.kernels import dora_linear, dora_norm, dora_prepare, lora_prepare  # noqa: E402
from dorakit.adapters.layers import ConvAdapter, LinearAdapter  # noqa: E402

F64 = torch.float64
HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
gpu = pytest.mark.gpu
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# ||fast − ref|| / ||ref|| per tensor, decided up front. float64: exact to ~1e-15. float32: products of
# <= 600 terms, u = 6e-8: 1e-5. Half precision: the products run with operands rounded to the dtype
# (unit roundoff u = 2^-11 fp16, 2^-8 bf16, counting the rounding of x W0ᵀ, of the output and of
# g ⊙ dy), so 4u, the bound tests/test_gpu.py uses for bf16 outputs.
REL_TOL = {F64: 1e-10, torch.float32: 1e-5, torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8}
# (M rows of x, in, out, rank): odd sizes, ranks below, at and above Triton's 16-wide dot.
SHAPES = [(37, 70, 45, 3), (5, 33, 19, 16), (130, 96, 67, 20)]


def _case(
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    bias: bool,
    zero_m: bool,
    seed: int,
    device: str = "cpu",
) -> dict[str, Tensor]:
    """Random W0 (frozen, in dtype), x (dtype), A, B, m (float32 over half precision, else dtype), bias."""
    M, K, N, R = shape
    g = torch.Generator().manual_seed(seed)
    adt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    t = {
        "x": torch.randn(3, M, K, generator=g, dtype=F64)
        if M % 2
        else torch.randn(M, K, generator=g, dtype=F64),
        "W": torch.randn(N, K, generator=g, dtype=F64) / K**0.5,
        "A": torch.randn(R, K, generator=g, dtype=F64) / K**0.5,
        "B": torch.randn(N, R, generator=g, dtype=F64) * 0.3,
        "m": torch.rand(N, generator=g, dtype=F64) + 0.5,
        "b": torch.randn(N, generator=g, dtype=F64) if bias else None,
    }
    if zero_m:
        t["m"][[0, N // 2, N - 1]] = 0.0  # rows with m = 0: the Triton backward must recompute y_pre there
    out = {
        k: None if v is None else v.to(device, dtype if k in ("x", "W", "b") else adt) for k, v in t.items()
    }
    return out


def _reference(t: dict[str, Tensor], scaling: float, dy: Tensor) -> tuple[Tensor, list[Tensor | None]]:
    """float64 y and the gradients of (x, A, B, m, b) for the upstream gradient dy (no m: LoRA)."""
    leaves = {k: None if v is None else v.detach().to(F64).requires_grad_() for k, v in t.items()}
    V = leaves["W"].detach() + scaling * leaves["B"] @ leaves["A"]
    W_adapted = V if leaves["m"] is None else leaves["m"].unsqueeze(1) * V / V.norm(dim=1, keepdim=True).detach()
    y = leaves["x"] @ W_adapted.T
    if leaves["b"] is not None:
        y = y + leaves["b"]
    names = [k for k in ("x", "A", "B", "m", "b") if leaves[k] is not None]
    grads = torch.autograd.grad(y, [leaves[k] for k in names], dy.to(F64))
    return y.detach(), dict(zip(names, grads))


def _fast(t: dict[str, Tensor], scaling: float, dy: Tensor, impl: str) -> tuple[Tensor, dict[str, Tensor]]:
    leaves = {
        k: None if v is None else (v.detach().clone().requires_grad_() if k != "W" else v)
        for k, v in t.items()
    }
    if leaves["m"] is None:
        prepared = lora_prepare(leaves["A"], leaves["B"], scaling, leaves["W"].dtype, impl)
    else:
        prepared = dora_prepare(leaves["W"], leaves["A"], leaves["B"], scaling, row_norm_sq(leaves["W"]), impl)
    y = dora_linear(
        leaves["x"], leaves["W"], leaves["b"], leaves["A"], leaves["B"], leaves["m"], prepared, impl
    )
    names = [k for k in ("x", "A", "B", "m", "b") if leaves[k] is not None]
    grads = torch.autograd.grad(y, [leaves[k] for k in names], dy.to(y.dtype))
    for k, g in zip(names, grads):
        assert g.dtype == leaves[k].dtype and g.shape == leaves[k].shape, k
    return y, dict(zip(names, grads))


def _check(
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    bias: bool,
    zero_m: bool,
    impl: str,
    device: str = "cpu",
    seed: int = 0,
    lora: bool = False,
) -> None:
    t = _case(shape, dtype, bias, zero_m, seed, device)
    if lora:
        t["m"] = None
    scaling = 1.7
    dy = torch.randn(
        t["x"].shape[:-1] + (shape[2],), generator=torch.Generator().manual_seed(seed + 1), dtype=F64
    ).to(device)
    y_ref, g_ref = _reference(t, scaling, dy)
    y, g = _fast(t, scaling, dy, impl)
    assert y.dtype == dtype and y.shape == y_ref.shape
    tol = REL_TOL[dtype]
    for name, fast, ref in [("y", y, y_ref)] + [(k, g[k], g_ref[k]) for k in g_ref]:
        assert torch.isfinite(fast).all(), name
        err = ((fast.to(F64) - ref).norm() / ref.norm()).item()
        assert err <= tol, f"{impl} {dtype} {shape} {name}: relative error {err:.2e} > {tol:.1e}"
    if zero_m:  # the m = 0 entries of ∂L/∂m on their own, on the scale of the whole gradient
        zero = t["m"] == 0
        err = (g["m"][zero].to(F64) - g_ref["m"][zero]).norm() / g_ref["m"].norm()
        assert err.item() <= tol


# ---- the fused (torch ops) implementation, CPU ------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias,zero_m", [(True, False), (False, True), (True, True)])
def test_fused_matches_float64_reference(dtype: torch.dtype, shape: tuple, bias: bool, zero_m: bool) -> None:
    _check(shape, dtype, bias, zero_m, "fused")


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_fused_lora_matches_float64_reference(dtype: torch.dtype, shape: tuple, bias: bool) -> None:
    """LoRA through the same Function (no magnitude): y and the gradients of x, A, B, b."""
    _check(shape, dtype, bias, False, "fused", lora=True)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_rows", [None, 1, 7])
def test_fused_norm_over_row_blocks_matches_float64(
    dtype: torch.dtype, block_rows: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """direct_norm (the fused path's norm) in one block, one row per block, and blocks that do not
    divide out = 45: every row's norm against float64, in the accumulation dtype."""
    dl = importlib.import_module("dorakit.adapters.kernels.dora_linear")  # the module (the package exports
    # a function of the same name)
    t = _case((1, 70, 45, 6), dtype, False, False, seed=5)
    if block_rows is not None:
        acc = torch.float64 if dtype == F64 else torch.float32
        functional = importlib.import_module("dorakit.adapters.functional")  # where the block size lives
        monkeypatch.setattr(functional, "NORM_CHUNK_BYTES", block_rows * 70 * torch.finfo(acc).bits // 8)
    norm = dl.direct_norm(t["W"], t["A"], t["B"], 1.3)
    ref = (t["W"].to(F64) + 1.3 * t["B"].to(F64) @ t["A"].to(F64)).norm(dim=1)
    assert norm.dtype == (F64 if dtype == F64 else torch.float32) and norm.shape == (45,)
    assert ((norm.to(F64) - ref).abs() / ref).max().item() <= REL_TOL[F64 if dtype == F64 else torch.float32]


# ---- the Triton kernels: on CUDA if present, else the interpreter on CPU -------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias,zero_m", [(True, False), (False, True), (True, True)])
def test_triton_matches_float64_reference(dtype: torch.dtype, shape: tuple, bias: bool, zero_m: bool) -> None:
    _check(shape, dtype, bias, zero_m, "triton", DEVICE)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_lora_matches_float64_reference(dtype: torch.dtype, shape: tuple) -> None:
    _check(shape, dtype, True, False, "triton", DEVICE, lora=True)


@needs_triton
@pytest.mark.parametrize("rank", [192, 384, 512])
def test_triton_high_rank_matches_float64_reference(rank: int) -> None:
    """Ranks above one rank tile (128): 2 (the last one part-filled), 3 and 4 tiles, in the norm, copies,
    forward and backward kernels (m = 0 columns: the backward's recomputation loops over the rank too)."""
    _check((5, 40, 24, rank), torch.float32, True, True, "triton", DEVICE, seed=rank)
    _check((5, 40, 24, rank), torch.float32, True, False, "triton", DEVICE, seed=rank, lora=True)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_norm_matches_float64(dtype: torch.dtype) -> None:
    t = _case((1, 200, 77, 5), dtype, False, False, seed=3, device=DEVICE)
    norm = dora_norm(t["W"], t["A"], t["B"], 0.9, row_norm_sq(t["W"]), "triton")
    W, A, B = (t[k].to(F64) for k in ("W", "A", "B"))
    ref = (W + 0.9 * B @ A).norm(dim=1)
    assert norm.dtype == torch.float32
    assert ((norm.to(F64) - ref).norm() / ref.norm()).item() <= REL_TOL[dtype]
    _, a_c, a_s, b_c, b_s = dora_prepare(t["W"], t["A"], t["B"], 0.9, row_norm_sq(t["W"]), "triton")
    for got, want in [(a_c, t["A"]), (a_s, 0.9 * t["A"]), (b_c, t["B"]), (b_s, 0.9 * t["B"])]:
        assert got.dtype == dtype
        assert torch.equal(got, want.to(dtype))  # one rounding of the float32 value, as .to(dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("out_in", [(20, 600), (70, 600), (130, 300)])
@pytest.mark.parametrize("programs", [None, 1, 7])
def test_triton_prepare_over_several_tiles(
    dtype: torch.dtype, out_in: tuple[int, int], programs: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """K over several BLOCK_K tiles, split into one slice (programs=1: each program loops over every
    tile), slices of several tiles, or one slice per tile (the kept setting on these shapes), with
    fewer, as many or more row blocks than tiles, into NaN-filled buffers: every tile of the A copies
    and every row of the B copies is written, and the norm finished from the partial sums, in torch
    and by the forward kernel, matches float64."""
    from dorakit.adapters.kernels import triton_dora as td

    n, k = out_in
    t = _case((1, k, n, 7), dtype, False, False, seed=5, device=DEVICE)
    cfg = td.prepare_config(7)
    if programs is not None:
        cfg["programs"] = programs
    split = min(-(-k // cfg["block_k"]), -(-cfg["programs"] // -(-n // cfg["block_n"])))
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: empty(*a, **kw).fill_(float("nan")))
    partials, a_c, a_s, b_c, b_s = td.dora_prepare(t["W"], t["A"], t["B"], 1.3, cfg)
    assert partials.shape == (split, n)
    assert split > 1 or programs == 1
    W, A, B = (t[key].to(F64) for key in ("W", "A", "B"))
    ref = (W + 1.3 * B @ A).norm(dim=1)
    norm = td.norm_from_partials(partials)
    assert ((norm.to(F64) - ref).abs() / ref).max().item() <= REL_TOL[dtype]
    # The forward kernel's own norm: y = (1 / n) ⊙ base with base = 1, h = 0 (stored in float32).
    ones = torch.ones((1, n), device=DEVICE, dtype=torch.float32)
    y = td.dora_forward(ones, torch.zeros((1, 7), device=DEVICE), b_c.float(), ones[0], partials, None)
    assert ((1 / y[0].to(F64) - ref).abs() / ref).max().item() <= REL_TOL[dtype]
    for got, want in [(a_c, t["A"]), (a_s, 1.3 * t["A"]), (b_c, t["B"]), (b_s, 1.3 * t["B"])]:
        assert torch.equal(got, want.to(dtype))
    none, *copies = lora_prepare(t["A"], t["B"], 1.3, dtype, "triton")  # LoRA's copies kernel
    assert none is None
    for got, want in zip(copies, [a_c, a_s, b_c, b_s]):
        assert torch.equal(got, want)


# ---- the layer: backend choice ----------------------------------------------------------------


def _linear_layer(
    backend: str = "auto", dtype: torch.dtype = torch.float32, variant: str = "dora", **kw: object
) -> LinearAdapter:
    torch.manual_seed(0)
    layer = LinearAdapter(
        nn.Linear(24, 18).to(dtype).requires_grad_(False), variant, 4, 8.0, backend=backend, **kw
    )
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
        if variant == "dora":
            layer.magnitude.mul_(torch.rand_like(layer.magnitude) + 0.5)
    return layer


@pytest.mark.parametrize("backend", ["fused"] + (["triton"] if HAS_TRITON else []))
@pytest.mark.parametrize("variant", ["dora", "lora"])
def test_layer_backend_matches_torch_backend(backend: str, variant: str) -> None:
    """Same layer, same input: output and every gradient (x, A, B, m, bias) as the eager reference path."""
    results = []
    for b in ("torch", backend):
        layer = _linear_layer(b, variant=variant).to(DEVICE)
        assert layer._fast_impl(torch.randn(1, 24, device=DEVICE)) == (None if b == "torch" else backend)
        layer.base_layer.bias.requires_grad_(True)  # bias="all": the bias trains too
        x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(1)).to(DEVICE).requires_grad_()
        y = layer(x)
        y.square().sum().backward()
        results.append(
            [
                y.detach(),
                x.grad,
                layer.lora_A.grad,
                layer.lora_B.grad,
                layer.magnitude.grad if variant == "dora" else None,
                layer.base_layer.bias.grad,
            ]
        )
    for ref, fast in zip(*results):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_auto_picks_fused_on_cpu_and_eager_where_fused_cannot_run() -> None:
    x = torch.randn(3, 24)
    assert _linear_layer()._fast_impl(x) == "fused"
    assert _linear_layer(norm_grad="exact")._fast_impl(x) is None
    dropped = _linear_layer(dropout=0.1)
    assert dropped._fast_impl(x) is None  # training with dropout: PEFT's formula, eager
    assert dropped.eval()._fast_impl(x) == "fused"  # eval: dropout is the identity
    assert _linear_layer()._fast_impl(x.double()) is None  # dtype mismatch: the eager path raises as before
    with torch.autocast("cpu", dtype=torch.bfloat16):  # followed as autocast runs F.linear (next test)
        assert _linear_layer()._fast_impl(x) == "fused"
    assert _linear_layer("torch")._fast_impl(x) is None
    assert _linear_layer(variant="lora")._fast_impl(x) == "fused"
    assert _linear_layer(variant="lora", norm_grad="exact")._fast_impl(x) == "fused"  # LoRA has no norm
    assert _linear_layer(variant="lora", dropout=0.1)._fast_impl(x) is None
    assert LinearAdapter(nn.Linear(24, 18), "magnitude")._fast_impl(x) is None


@gpu
@cuda
def test_gpu_auto_runs_dora_on_triton_and_lora_fused() -> None:
    """On CUDA, "auto" takes the Triton kernels for DoRA; LoRA's triton path would only copy the adapters
    in one launch (costlier on the host than torch's copies), so LoRA runs fused."""
    x = torch.randn(1, 24, device="cuda")
    assert _linear_layer().cuda()._fast_impl(x) == ("triton" if HAS_TRITON else "fused")
    assert _linear_layer(variant="lora").cuda()._fast_impl(x) == "fused"
    high = LinearAdapter(nn.Linear(24, 18).requires_grad_(False), "dora", 256, 512.0).cuda()
    assert high._fast_impl(x) == "fused"  # above TRITON_AUTO_MAX_RANK


def test_auto_takes_triton_only_for_dora_on_cuda_up_to_its_rank_limit() -> None:
    """Where "auto" looks first (the choice on CUDA, checked here without one): the Triton path for
    DoRA at rank <= TRITON_AUTO_MAX_RANK on CUDA, the fused path otherwise (slower Triton steps above)."""
    from dorakit.adapters.fast_path import TRITON_AUTO_MAX_RANK

    def layer(variant: str, rank: int) -> LinearAdapter:
        return LinearAdapter(nn.Linear(24, 18).requires_grad_(False), variant, rank, 2.0 * rank)

    assert layer("dora", TRITON_AUTO_MAX_RANK)._auto_order(on_cuda=True) == ("triton", "fused")
    assert layer("dora", TRITON_AUTO_MAX_RANK + 1)._auto_order(on_cuda=True) == ("fused",)
    assert layer("dora", 4)._auto_order(on_cuda=False) == ("fused",)
    assert layer("lora", 4)._auto_order(on_cuda=True) == ("fused",)


@pytest.mark.parametrize(("impl", "dtype"), [("fused", torch.bfloat16), ("fused", torch.float16)]
                         + ([("triton", torch.float16)] if HAS_TRITON else []))
def test_fast_path_under_autocast_matches_float64(impl: str, dtype: torch.dtype) -> None:
    """A float32 layer under autocast takes the kernels with x, W0 and b cast to the autocast dtype, as
    autocast runs F.linear: output (in that dtype) and every gradient (x, A, B, m, bias, each in its own
    dtype) against float64 on the same rounded x and W0, at the half-precision tolerance of the kernels."""
    _check_autocast(impl, dtype, "cpu")
    _check_autocast(impl, dtype, "cpu", "lora")


@gpu
@cuda
@pytest.mark.parametrize("impl", ["fused", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_fast_path_under_autocast_matches_float64(impl: str, dtype: torch.dtype) -> None:
    _check_autocast(impl, dtype, "cuda")
    _check_autocast(impl, dtype, "cuda", "lora")


def _check_autocast(impl: str, dtype: torch.dtype, device: str, variant: str = "dora") -> None:
    layer = _linear_layer(impl, variant=variant).to(device)
    layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_()
    with torch.autocast(device, dtype=dtype):
        assert layer._fast_impl(x) == impl
        y = layer(x)
    assert y.dtype == dtype
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=F64).to(device)
    m = layer.magnitude if variant == "dora" else None
    names = [k for k, v in (("x", x), ("A", 1), ("B", 1), ("m", m), ("b", 1)) if v is not None]
    leaves = [p for p in (x, layer.lora_A, layer.lora_B, m, layer.base_layer.bias) if p is not None]
    grads = torch.autograd.grad(y, leaves, dy.to(dtype))
    t = {"x": x.detach().to(dtype), "W": layer.base_layer.weight.to(dtype), "A": layer.lora_A.detach(),
         "B": layer.lora_B.detach(), "m": None if m is None else m.detach(),
         "b": layer.base_layer.bias.detach().to(dtype)}
    y_ref, g_ref = _reference(t, layer.scaling, dy)
    for name, fast, ref in [("y", y, y_ref), *zip(names, grads, [g_ref[k] for k in names])]:
        err = ((fast.to(F64) - ref).norm() / ref.norm()).item()
        assert err <= REL_TOL[dtype], f"{impl} {dtype} {name}: relative error {err:.2e}"
    assert [g.dtype for g in grads] == [p.dtype for p in leaves]


def test_explicit_backend_that_cannot_run_raises() -> None:
    with pytest.raises(RuntimeError, match="dropout"):
        _linear_layer("fused", dropout=0.1)(torch.randn(3, 24))
    with pytest.raises(ValueError, match="norm_grad"):
        _linear_layer("fused", norm_grad="exact")
    with pytest.raises(ValueError, match="only nn.Linear"):
        ConvAdapter(nn.Conv2d(3, 4, 3), "dora", 2, backend="fused")
    with pytest.raises(ValueError, match="variant='magnitude'"):
        LinearAdapter(nn.Linear(8, 8), "magnitude", backend="fused")
    with pytest.raises(ValueError, match="backend must be"):
        LinearAdapter(nn.Linear(8, 8), "dora", 2, backend="cuda")
    with pytest.raises(dk.ConfigError, match="backend"):
        dk.AdapterConfig(backend="fast")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" and HAS_TRITON:
        with pytest.raises(RuntimeError, match="CUDA"):
            _linear_layer("triton")(torch.randn(3, 24))


def test_config_backend_reaches_layers() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    dk.apply_adapters(model, dk.AdapterConfig(method="dora", rank=2, targets=["0", "2"], backend="torch"))
    assert {layer.backend for _, layer in dk.adapter_layers(model)} == {"torch"}
    assert dk.AdapterConfig().backend == "auto"


def test_inference_norm_is_cached_until_an_adapter_tensor_changes() -> None:
    """Inside dk.cached_norms the norm is computed once and recomputed after an in-place change."""
    layer = _linear_layer().eval()
    with dk.cached_norms(layer):
        x = torch.randn(4, 24)
        with torch.no_grad():
            y1 = layer(x)
            cached = layer._norm_cache[1]
            assert layer(x).equal(y1) and layer._norm_cache[1] is cached  # reused
            layer.lora_B.add_(0.05)  # as optimizer.step() does
            y2 = layer(x)
        assert layer._norm_cache[1] is not cached and not y2.equal(y1)
        with torch.no_grad():
            ref = _linear_layer("torch").eval()
            ref.load_state_dict(layer.state_dict())
            torch.testing.assert_close(y2, ref(x), rtol=1e-5, atol=1e-5)
        layer.train()
        cached = layer._norm_cache
        with torch.no_grad():
            layer(x)
        assert layer._norm_cache is cached  # training mode neither reads nor writes the cache


def test_norm_cache_is_dropped_between_train_and_eval() -> None:
    """A fused optimizer updates A and B without bumping their version counters (a write through
    .data does the same): the next eval phase must still see the update, since train()/eval() drop
    the cache. LoRA's copies are never cached. (Only inside dk.cached_norms is anything cached.)"""
    layer = _linear_layer().eval()
    lora = _linear_layer(variant="lora").eval()
    x = torch.randn(4, 24)
    with dk.cached_norms(nn.ModuleList([layer, lora])):
        with torch.no_grad():
            y1 = layer(x)
        layer.train()
        layer.lora_B.data.add_(0.05)  # no version bump, as torch.optim.AdamW(fused=True)
        layer.eval()
        with torch.no_grad():
            y2 = layer(x)
            ref = _linear_layer("torch").eval()
            ref.load_state_dict(layer.state_dict())
            torch.testing.assert_close(y2, ref(x), rtol=1e-5, atol=1e-5)
        assert not y2.equal(y1)
        layer.train().eval()
        layer(x)  # with grad (training steps in eval mode): never cached
        assert layer._norm_cache is None
        with torch.no_grad():
            lora(x)
            assert lora._norm_cache is None
            before = lora(x)
            lora.lora_B.data.add_(0.05)
            assert not lora(x).equal(before)


def test_lora_with_hooks_on_the_base_layer_takes_the_eager_path() -> None:
    """The eager LoRA path calls the base layer, so its forward hooks run; the fast path would skip them."""
    layer = _linear_layer(variant="lora")
    x = torch.randn(3, 24)
    assert layer._fast_impl(x) == "fused"
    calls = []
    handle = layer.base_layer.register_forward_hook(lambda mod, inp, out: calls.append(out.shape))
    assert layer._fast_impl(x) is None
    layer(x)
    assert calls == [torch.Size([3, 18])]
    handle.remove()
    assert layer._fast_impl(x) == "fused"
    with pytest.raises(RuntimeError, match="forward hooks"):
        hooked = _linear_layer("fused", variant="lora")
        hooked.base_layer.register_forward_pre_hook(lambda mod, inp: None)
        hooked(x)


@needs_triton
def test_triton_takes_ranks_up_to_its_limit() -> None:
    from dorakit.adapters.layers import TRITON_MAX_RANK

    for rank, reason in ((TRITON_MAX_RANK, None), (TRITON_MAX_RANK + 1, "shared memory")):
        layer = LinearAdapter(nn.Linear(300, 300).requires_grad_(False), "dora", rank, 8.0)
        got = layer._static_unsupported("triton")
        if reason is None:
            assert got is None
        else:
            assert reason in got
            with pytest.raises(ValueError, match="shared memory"):  # an explicit backend says so at once
                LinearAdapter(nn.Linear(300, 300).requires_grad_(False), "dora", rank, 8.0, backend="triton")


_AOT = """
import json, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dorakit.adapters.kernels import triton_dora as td
from dorakit.adapters.layers import TRITON_MAX_RANK

target = GPUTarget("cuda", 86, 32)
def shared(fn, sig, consts, **opts):
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target, options=opts).metadata.shared
try:
    shared(td._copies_kernel, {"A": "*fp32", "B": "*fp32", "AC": "*bf16", "AS": "*bf16", "BC": "*bf16", "BS": "*bf16",
           "N": "i32", "K": "i32", "R": "i32", "s": "fp32", "NPROG": "i32", "BLOCK_N": "constexpr",
           "BLOCK_K": "constexpr", "BLOCK_R": "constexpr"}, {"BLOCK_N": 32, "BLOCK_K": 64, "BLOCK_R": 16})
except Exception as e:  # no CUDA code generation on this machine (ptxas missing, say)
    print(type(e).__name__, e)
    sys.exit(3)
br, out, cfg = td._block_r(TRITON_MAX_RANK), {}, td.prepare_config(TRITON_MAX_RANK)
for wdt in ("bf16", "fp32"):
    sig = {"W": f"*{wdt}", "A": "*fp32", "B": "*fp32", "SQ": "*fp32", "AC": f"*{wdt}", "AS": f"*{wdt}",
           "BC": f"*{wdt}", "BS": f"*{wdt}", "N": "i32", "K": "i32", "R": "i32", "stride_wn": "i32",
           "stride_wk": "i32", "s": "fp32", "NPROG_N": "i32", "SPLIT": "i32", "BLOCK_N": "constexpr",
           "BLOCK_K": "constexpr", "BLOCK_R": "constexpr"}
    out["prepare " + wdt] = shared(td._prepare_kernel, sig, {"BLOCK_N": cfg["block_n"], "BLOCK_K": cfg["block_k"],
                                   "BLOCK_R": br}, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
sig = {"BASE": "*fp32", "H": "*fp32", "B": "*fp32", "MAG": "*fp32", "SQ": "*fp32", "BIAS": "*fp32", "Y": "*fp32",
       "M": "i32", "N": "i32", "R": "i32", "SPLIT": "i32", "tiny": "fp32", "HAS_BIAS": "constexpr",
       "IEEE": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_R": "constexpr"}
out["forward fp32"] = shared(td._forward_kernel, sig, {"HAS_BIAS": True, "IEEE": True, "BLOCK_M": 64, "BLOCK_N": 128,
                             "BLOCK_R": br}, num_warps=4)
print(json.dumps(out))
"""


@needs_triton
def test_triton_kernels_fit_the_shared_memory_of_an_sm86_gpu() -> None:
    """Compiled ahead of time for sm_86 (101,376 bytes of shared memory per block), outside the
    interpreter, at the largest rank the Triton path takes, in the dtypes that need the most."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT], capture_output=True, text=True, env=env, timeout=600,
                          check=False)
    if proc.returncode == 3:
        pytest.skip(f"triton cannot generate CUDA code here: {proc.stdout.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    sizes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(sizes) == 3
    for kernel, size in sizes.items():
        assert size <= 101_376, f"{kernel}: {size} bytes of shared memory"


_AOT_RANK_LOOPS = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dorakit.adapters.kernels import triton_dora as td
from dorakit.adapters.layers import TRITON_MAX_RANK

target = GPUTarget("cuda", 86, 32)
def shared(fn, sig, consts, **opts):
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target, options=opts).metadata.shared
br, cfg = td._block_r(TRITON_MAX_RANK), td.prepare_config(TRITON_MAX_RANK)
sig = {k: "*fp32" for k in ("A", "B", "AC", "AS", "BC", "BS")}
sig.update({"N": "i32", "K": "i32", "R": "i32", "s": "fp32", "NPROG": "i32"})
sig.update({k: "constexpr" for k in ("BLOCK_N", "BLOCK_K", "BLOCK_R")})
try:
    out = {"copies fp32": shared(td._copies_kernel, sig, {"BLOCK_N": cfg["block_n"], "BLOCK_K": cfg["block_k"],
                                 "BLOCK_R": br}, num_warps=cfg["num_warps"])}
except Exception as e:  # no CUDA code generation on this machine (ptxas missing, say)
    print(type(e).__name__, e)
    sys.exit(3)
sig = {k: "*fp32" for k in ("DY", "Y", "BIAS", "MAG", "SQ", "X", "W", "H", "B", "DYP", "GM")}
sig.update({k: "i32" for k in ("M", "N", "K", "R", "stride_wn", "stride_wk", "SPLIT")})
sig.update({"tiny": "fp32", **{k: "constexpr" for k in ("HAS_BIAS", "IEEE", "BLOCK_M", "BLOCK_N", "BLOCK_K",
                                                        "BLOCK_R")}})
out["backward fp32"] = shared(td._backward_kernel, sig, {"HAS_BIAS": True, "IEEE": True, "BLOCK_M": 64,
                              "BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_R": br}, num_warps=4)
print(json.dumps(out))
"""


@needs_triton
def test_triton_rank_loops_fit_the_shared_memory_of_an_sm86_gpu() -> None:
    """The kernels the test above leaves out (the copies, the backward with its recomputation), compiled
    for sm_86 at the largest rank the Triton path takes: the rank tiles are not multi-buffered."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT_RANK_LOOPS], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    if proc.returncode == 3:
        pytest.skip(f"triton cannot generate CUDA code here: {proc.stdout.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    sizes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(sizes) == 2
    for kernel, size in sizes.items():
        assert size <= 101_376, f"{kernel}: {size} bytes of shared memory"


# ---- GPU: bf16, the shapes of a real model, torch.compile -----------------------------------------


@gpu
@cuda
@needs_triton
@pytest.mark.parametrize("impl", ["fused", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias,zero_m", [(False, False), (True, True)])
def test_gpu_matches_float64_reference(impl: str, dtype: torch.dtype, bias: bool, zero_m: bool) -> None:
    for shape in [(1000, 544, 1000, 16), (257, 2048, 5632, 16), (63, 384, 130, 8)]:
        _check(shape, dtype, bias, zero_m, impl, "cuda")


@gpu
@cuda
@needs_triton
@pytest.mark.parametrize("impl", ["fused", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_lora_matches_float64_reference(impl: str, dtype: torch.dtype) -> None:
    for shape in [(1000, 544, 1000, 16), (257, 2048, 5632, 16), (63, 384, 130, 8)]:
        _check(shape, dtype, True, False, impl, "cuda", lora=True)


@gpu
@cuda
@needs_triton
def test_gpu_fullgraph_compile_of_triton_backend_matches_eager() -> None:
    layer = _linear_layer("triton", torch.bfloat16).cuda()
    x = torch.randn(4, 33, 24, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True)
    outs = []
    for run in (layer, compiled):
        layer.zero_grad()
        y = run(x)
        y.float().square().sum().backward()
        outs.append([y.detach(), layer.lora_A.grad, layer.lora_B.grad, layer.magnitude.grad])
    for ref, got in zip(*outs):  # the same kernels; only the loss around them may be fused differently
        assert ((got.double() - ref.double()).norm() / ref.double().norm()).item() <= REL_TOL[torch.bfloat16]


@gpu
@cuda
@needs_triton
@pytest.mark.parametrize("variant", ["dora", "lora"])
def test_gpu_training_step_captured_in_one_cuda_graph_trains_as_eager(variant: str) -> None:
    """Forward, backward and a capturable AdamW step through the Triton path, captured in one CUDA
    graph (a host sync or CPU-side state would fail the capture or freeze a value): 3 warm-up steps
    and 3 replays leave the parameters where 6 eager steps do."""

    def make() -> tuple[LinearAdapter, torch.optim.Optimizer]:
        layer = _linear_layer("triton", torch.float32, variant).cuda()
        params = [p for p in layer.parameters() if p.requires_grad]
        return layer, torch.optim.AdamW(params, lr=1e-2, capturable=True)

    x = torch.randn(64, 24, device="cuda")
    ref, ref_opt = make()
    for _ in range(6):
        ref(x).square().sum().backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    layer, opt = make()

    def step() -> None:
        layer(x).square().sum().backward()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
            opt.zero_grad(set_to_none=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()  # recorded, not run
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start = _linear_layer("triton", torch.float32, variant)
    for name, p in layer.named_parameters():
        if p.requires_grad:
            moved = (p.detach().cpu() - start.get_parameter(name).detach()).norm()
            assert moved > 0, f"{name} did not train"
            err = (p.detach() - ref.get_parameter(name).detach()).norm() / moved.to(p.device)
            assert err.item() <= REL_TOL[torch.float32], f"{name}: {err.item():.2e}"
