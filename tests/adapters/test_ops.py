"""Tests for dorakit.adapters.kernels.ops: the dorakit:: custom ops that torch.compile sees.

torch.library.opcheck checks each op's schema, fake (meta) implementation and autograd registration
over shapes and dtypes; a tiny adapted model compiles with fullgraph=True (no graph breaks), Dynamo's
graph holds exactly one dorakit::adapter_linear per adapted linear, and the compiled output and every
gradient (x, A, B, m, bias) match a dense float64 reference.
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
from dorakit.adapters import kernels  # noqa: E402,F401  (importing it registers the dorakit:: ops)
from dorakit.adapters.functional import row_norm_sq  # noqa: E402

F64 = torch.float64
REL_TOL = {F64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 4 * 2.0**-8}
OPS = torch.ops.dorakit


def _tensors(shape: tuple[int, int, int, int], dtype: torch.dtype, seed: int = 0) -> dict[str, Tensor]:
    M, K, N, R = shape
    g = torch.Generator().manual_seed(seed)
    adt = torch.float32 if dtype == torch.bfloat16 else dtype
    return {
        "x": torch.randn(M, K, generator=g).to(dtype).requires_grad_(),
        "W": (torch.randn(N, K, generator=g) / K**0.5).to(dtype),
        "b": torch.randn(N, generator=g).to(dtype).requires_grad_(),
        "A": (torch.randn(R, K, generator=g) / K**0.5).to(adt).requires_grad_(),
        "B": (torch.randn(N, R, generator=g) * 0.3).to(adt).requires_grad_(),
        "m": (torch.rand(N, generator=g) + 0.5).to(adt).requires_grad_(),
    }


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 13, 5, 3), (2, 24, 40, 16)])
@pytest.mark.parametrize("variant", ["dora", "lora"])
def test_opcheck(dtype: torch.dtype, shape: tuple[int, int, int, int], variant: str) -> None:
    t = _tensors(shape, dtype)
    W, A, B = t["W"], t["A"].detach(), t["B"].detach()
    x = t["x"].detach().view(1, *t["x"].shape).requires_grad_()  # a leading batch dimension
    if variant == "dora":
        torch.library.opcheck(OPS.dora_prepare, (W, A, B, 1.7, row_norm_sq(W), "fused"))
        with torch.no_grad():
            prepared = OPS.dora_prepare(W, A, B, 1.7, row_norm_sq(W), "fused")
        m = t["m"]
    else:
        torch.library.opcheck(OPS.lora_prepare, (A, B, 1.7, dtype, "fused"))
        with torch.no_grad():
            prepared = (None, *OPS.lora_prepare(A, B, 1.7, dtype, "fused"))
        m = None
    torch.library.opcheck(OPS.adapter_linear, (x, W, t["b"], t["A"], t["B"], m, *prepared, "fused"))
    torch.library.opcheck(OPS.adapter_linear, (x, W, None, t["A"], t["B"], m, *prepared, "fused"))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("rank", [3, 192])
def test_opcheck_triton(rank: int) -> None:
    """The Triton implementation behind the same ops (the interpreter on a CPU): the fake partial sums
    have the kernel's (S, out) shape, at one rank tile and at two."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = {k: v.to(device) for k, v in _tensors((6, 40, 24, rank), torch.float32).items()}
    W, A, B = t["W"], t["A"].detach(), t["B"].detach()
    torch.library.opcheck(OPS.dora_prepare, (W, A, B, 1.7, None, "triton"))
    with torch.no_grad():
        prepared = OPS.dora_prepare(W, A, B, 1.7, None, "triton")
    torch.library.opcheck(OPS.adapter_linear, (t["x"], W, t["b"], t["A"], t["B"], t["m"], *prepared, "triton"))
    torch.library.opcheck(OPS.lora_prepare, (A, B, 1.7, torch.float32, "triton"))


def _model(variant: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 12)).to(dtype)
    dk.apply_adapters(model, dk.AdapterConfig(method=variant, rank=4, targets="all-linear", bias="all"))
    with torch.no_grad():
        for _, layer in dk.adapter_layers(model):
            layer.lora_B.normal_(std=0.1)
            if variant == "dora":
                layer.magnitude.mul_(torch.rand_like(layer.magnitude) + 0.5)
    return model


def _reference(model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Dense float64: y and the gradients of x and of every trainable parameter (A, B, m, bias)."""
    x64 = x.detach().to(F64).requires_grad_()
    h, leaves = x64, []
    for mod in model:
        if isinstance(mod, nn.GELU):
            h = torch.nn.functional.gelu(h)
            continue
        W = mod.base_layer.weight.detach().to(F64)
        A, B, b = (p.detach().to(F64).requires_grad_() for p in (mod.lora_A, mod.lora_B, mod.base_layer.bias))
        V = W + mod.scaling * B @ A
        m = None
        if mod.variant == "dora":
            m = mod.magnitude.detach().to(F64).requires_grad_()
            V = m.unsqueeze(1) * V / V.norm(dim=1, keepdim=True).detach()
        h = h @ V.T + b
        leaves += [A, B] + ([m] if m is not None else []) + [b]
    y = h
    grads = torch.autograd.grad(y.square().sum(), [x64, *leaves])
    return y.detach(), list(grads)


def _grads_in_reference_order(model: nn.Module, x: Tensor) -> list[Tensor]:
    out = [x.grad]
    for mod in model:
        if not isinstance(mod, nn.GELU):
            out += [mod.lora_A.grad, mod.lora_B.grad]
            out += [mod.magnitude.grad] if mod.variant == "dora" else []
            out += [mod.base_layer.bias.grad]
    return out


def _count_ops(gm: torch.fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("dorakit."):
            name = str(node.target).split(".")[1]
            counts[name] = counts.get(name, 0) + 1
    return counts


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("variant", ["dora", "lora"])
def test_fullgraph_compile_matches_float64_reference(backend: str, dtype: torch.dtype, variant: str) -> None:
    model = _model(variant, dtype)
    graphs: list[torch.fx.GraphModule] = []

    def recording(gm: torch.fx.GraphModule, inputs: list) -> object:  # Dynamo's graph, then the real backend
        graphs.append(gm)
        return torch._dynamo.lookup_backend(backend)(gm, inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=recording)
    x = torch.randn(2, 3, 24, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
    y = compiled(x)
    y.square().sum().backward()
    assert len(graphs) == 1  # fullgraph: one graph, no breaks
    # LoRA's fused copies are traced (no lora_prepare op: Inductor fuses them, no Python per layer per step)
    assert _count_ops(graphs[0]) == {"adapter_linear": 2, **({"dora_prepare": 2} if variant == "dora" else {})}
    y_ref, g_ref = _reference(model, x)
    tol = REL_TOL[dtype]
    for name, fast, ref in [("y", y.detach(), y_ref), *zip(range(len(g_ref)), _grads_in_reference_order(model, x),
                                                             g_ref)]:
        assert fast is not None and fast.dtype == dtype, name
        err = ((fast.to(F64) - ref).norm() / ref.norm()).item()
        assert err <= tol, f"{backend} {dtype} {variant} {name}: relative error {err:.2e} > {tol:.1e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_lora_traces_its_copies_and_matches_eager_exactly(dtype: torch.dtype) -> None:
    """Compiled LoRA on the fused path: one dorakit op per adapted linear (adapter_linear; the copies of
    s·A, s·B and the casts to W0's dtype are traced, not a lora_prepare op that would run Python and
    several launches per layer on every step), and the output and every gradient equal the eager
    path's bit for bit (bf16 base with float32 adapters, as on a GPU; float32)."""
    model = _model("lora", dtype)
    graphs: list[torch.fx.GraphModule] = []

    def recording(gm: torch.fx.GraphModule, inputs: list) -> object:
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, inputs)

    x = torch.randn(2, 3, 24, generator=torch.Generator().manual_seed(2)).to(dtype)
    results = []
    for run in ("eager", "compiled"):
        for p in model.parameters():
            p.grad = None
        xi = x.clone().requires_grad_()
        torch._dynamo.reset()
        fn = model if run == "eager" else torch.compile(model, fullgraph=True, backend=recording)
        y = fn(xi)
        y.float().square().sum().backward()
        results.append([y.detach(), xi.grad, *(p.grad for p in model.parameters() if p.requires_grad)])
    assert len(graphs) == 1
    assert _count_ops(graphs[0]) == {"adapter_linear": 2}
    for eager, compiled in zip(*results):
        assert compiled is not None and compiled.dtype == eager.dtype
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_compiled_eval_forward_matches_eager_under_no_grad() -> None:
    model = _model("dora", torch.float32).eval()
    x = torch.randn(4, 24)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
