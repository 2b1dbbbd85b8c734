"""The fast mixed-adapter forward (dorakit.adapters.gathered, kernels/triton_gather.py).

Each routed row at inference must equal its adapter alone (float64, the torch path), the Triton kernel
must equal the torch path (float32, under TRITON_INTERPRET=1 on CPU), and the packs kept by
dk.cached_norms must follow every change of the weights.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

import dorakit as dk
from dorakit.adapters import gathered
from dorakit.adapters.gathered import GatherPath
from fixtures_multi import MLP, perturb_adapters
from fixtures_multi import alone as alone_with

F64 = torch.float64
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CONFIGS = {
    "default": dk.AdapterConfig(method="dora", rank=4, alpha=8, targets=["up", "down"]),
    "lora": dk.AdapterConfig(method="lora", rank=3, alpha=5, targets=["up", "gate"]),
    "mag": dk.AdapterConfig(method="dora", rank=2, alpha=2, targets=["gate"], magnitude_only=["down"]),
    "dora2": dk.AdapterConfig(method="dora", rank=20, alpha=3, targets=["up", "gate", "down"]),
}
ROWS = ["dora2", None, "default", "mag", "lora", "dora2"]


def alone(base: nn.Module, multi: nn.Module, name: str) -> nn.Module:
    """fixtures_multi.alone with this file's CONFIGS."""
    return alone_with(base, multi, name, CONFIGS[name])


def build(dtype: torch.dtype = F64) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = MLP(24, 40, 20, dtype).eval()
    model = copy.deepcopy(base)
    dk.apply_adapters(model, CONFIGS["default"])
    for name in ("lora", "mag", "dora2"):
        dk.add_adapter(model, CONFIGS[name], name=name)
    perturb_adapters(model, b_scale=0.3)
    return base, model.eval()


def set_backend(model: nn.Module, backend: str) -> None:
    """The wrapper's own adapter's backend picks the mixed-batch path (gathered.GatherPath._gather_impl)."""
    for _, layer in dk.adapter_layers(model):
        layer.backend = backend


@pytest.mark.parametrize("shape", [(6, 3, 24), (6, 24)])
def test_rows_equal_each_adapter_alone(shape: tuple[int, ...]) -> None:
    base, model = build()
    x = torch.randn(shape, dtype=F64)
    with torch.no_grad(), dk.adapter_routing(model, ROWS):
        assert model.up._gather_impl(x[..., :24]) == "torch"
        got = model(x)
    with torch.no_grad():
        want = [base(x[i:i + 1]) if n is None else alone(base, model, n)(x[i:i + 1])
                for i, n in enumerate(ROWS)]
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got[0], got[2])  # the adapters differ, so the test can fail


def test_paths_taken_and_reference_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    _, model = build()
    x = torch.randn(6, 2, 24, dtype=F64)
    calls = []
    real = gathered.gathered_torch
    monkeypatch.setattr(gathered, "gathered_torch", lambda *a: calls.append(1) or real(*a))
    with dk.adapter_routing(model, ROWS):
        with torch.no_grad():
            fast = model(x)
        assert len(calls) == 3                                # every adapted layer, once
        slow = model(x)                                       # with grad: the reference routing
        set_backend(model, "torch")
        with torch.no_grad():
            ref = model(x)
    assert len(calls) == 3 and slow.requires_grad
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)


def test_dvora_rows_equal_alone() -> None:
    torch.manual_seed(1)
    base = MLP(24, 40, 20, F64).eval()
    model = copy.deepcopy(base)
    dk.apply_adapters(model, dk.AdapterConfig(method="dvora", rank=4, targets=["up", "down"]))
    with torch.no_grad():
        for _, layer in dk.adapter_layers(model):
            layer.vera_lambda_b.normal_()
            layer.magnitude.mul_(1.5)
    x = torch.randn(3, 2, 24, dtype=F64)
    with torch.no_grad():
        with dk.adapter_routing(model, ["default", None, "default"]):
            got = model(x)
        want = torch.cat([model(x[:1]), base(x[1:2]), model(x[2:])])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got[1], model(x[1:2])[0])


@needs_triton
@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("shape", [(6, 1, 24), (6, 5, 24)])
def test_triton_kernel_equals_torch_path(shape: tuple[int, ...], decode: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """float32: the kernels' h = x (sA)ᵀ sums <= 40 terms, their epilogues one product and one fma per entry,
    all IEEE float32 (u = 6e-8), against the torch path's different summation order: 1e-5 relative. Both
    Triton paths: the gathered kernels (base product by cuBLAS) and, for <= DECODE_MAX_ROWS rows, the
    one-launch decode kernel (kernels/triton_decode.py)."""
    from dorakit.adapters import gathered
    from dorakit.adapters.kernels import triton_decode

    if not decode:
        monkeypatch.setattr(gathered, "DECODE_MAX_ROWS", 0)
    calls = []
    kernel = triton_decode.decode_linear
    monkeypatch.setattr(triton_decode, "decode_linear", lambda *a: calls.append(a[0].shape) or kernel(*a))
    _, model = build(torch.float32)
    model.to(DEVICE)
    x = torch.randn(shape, device=DEVICE)
    with torch.no_grad(), dk.adapter_routing(model, ROWS):
        set_backend(model, "fused")
        want = model(x)
        set_backend(model, "triton")
        assert model.up._gather_impl(torch.randn(6, 24, device=DEVICE)) == "triton"
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    routed = [layer for _, layer in dk.adapter_layers(model) if layer.supports_gather]
    assert len(calls) == (len(routed) if decode else 0) and all(c[0] == shape[0] * shape[1] for c in calls)


@needs_triton
def test_triton_kernel_direct_with_split_and_empty_rows() -> None:
    """The kernel on its own: K split over several slices (K = 200), rows with the empty slot, a rank of 1."""
    from dorakit.adapters.kernels.triton_gather import gathered_linear

    gen = torch.Generator().manual_seed(3)
    Bt, T, K, N, R = 5, 2, 200, 33, 7
    x = torch.randn(Bt, T, K, generator=gen)
    W, bias = torch.randn(N, K, generator=gen) / K**0.5, torch.randn(N, generator=gen)
    ranks = (R, 1, 0)
    a = torch.randn(3, R, K, generator=gen) / K**0.5
    b = torch.randn(3, N, R, generator=gen)
    for i, r in enumerate(ranks):
        a[i, r:], b[i, :, r:] = 0, 0
    g = torch.rand(3, N, generator=gen) + .5
    g[2] = 1
    pack = gathered.AdapterPack(("p", "q"), ranks, a, b, g)
    seg = torch.tensor([0, 2, 1, 0, 2], dtype=torch.int32)
    groups = [(s, torch.tensor([i for i in range(Bt) if seg[i] == s])) for s in (0, 1)]
    base = x @ W.T
    want = gathered.gathered_torch(x, base, pack, seg, groups, bias)
    to = {"device": DEVICE}
    got = gathered_linear(*(t.to(**to) for t in (x, base, a, b, g, seg)), bias.to(**to))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(want[1], base[1] + bias, rtol=0, atol=0)  # no adapter: exactly base + bias


def test_dispatch_is_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    _, model = build()
    x = torch.randn(6, 24, dtype=F64)
    layer = model.up
    with dk.adapter_routing(model, ROWS):
        assert layer._gather_impl(x) is None                  # grad enabled: the reference routing
        with torch.no_grad():
            assert layer._gather_impl(x) == "torch"
            assert layer._gather_impl(x.float()) is None      # x not in W0's dtype
            layer.backend = "torch"
            assert layer._gather_impl(x) is None
            layer.backend = "auto"
            model.train()
            assert layer._gather_impl(x) is None
            model.eval()
            if HAS_TRITON:  # an explicit "triton" that the kernel cannot serve: each group's own Triton path
                layer.backend = "triton"
                assert layer._gather_impl(x) is None           # the kernel takes no float64
                monkeypatch.setattr(gathered, "GATHER_MAX_RANK", 2)
                layer.backend = "auto"
                assert layer._gather_impl(x) == "torch"                            # auto: the torch path


def test_cached_pack_follows_optimizer_steps_and_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    base, model = build()
    x = torch.randn(6, 2, 24, dtype=F64)
    builds = []
    real = GatherPath._build_pack
    monkeypatch.setattr(GatherPath, "_build_pack", lambda self, d: builds.append(1) or real(self, d))
    slot = model.down.adapters["dora2"]
    opt = torch.optim.SGD([slot.lora_B, slot.magnitude], lr=0.5)
    with dk.adapter_routing(model, ROWS), dk.cached_norms(model):
        with torch.no_grad():
            first, again = model(x), model(x)
        assert len(builds) == 3                                # built once per layer, then reused
        torch.testing.assert_close(first, again, rtol=0, atol=0)
        for p in (slot.lora_B, slot.magnitude):
            p.grad = torch.randn_like(p)
        opt.step()                                             # the step hook drops every pack
        with torch.no_grad():
            stepped = model(x)
            slot.lora_A.mul_(1.5)                              # an in-place write: a new version
            written = model(x)
    assert len(builds) == 3 + 3 + 1                            # the step: every layer; the write: its layer
    with torch.no_grad():
        want = torch.cat([alone(base, model, "dora2")(x[i:i + 1]) for i in (0, 5)])
    torch.testing.assert_close(written[[0, 5]], want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(first[0], stepped[0]) and not torch.allclose(stepped[0], written[0])
    torch.testing.assert_close(first[[1, 2, 3, 4]], written[[1, 2, 3, 4]], rtol=1e-12, atol=1e-12)


def test_reference_routing_norm_cache_follows_optimizer_step() -> None:
    """backend="torch" routes group by group; each named adapter's own norm cache must follow a step too."""
    base, model = build()
    set_backend(model, "fused")  # the single-adapter fused path caches its norm (fast_path._prepared)
    for _, layer in dk.adapter_layers(model):
        for slot in layer.slots().values():
            slot.backend = "fused"
    x = torch.randn(6, 2, 24, dtype=F64)
    slot = model.down.adapters["dora2"]
    opt = torch.optim.SGD([slot.lora_B], lr=0.5)
    with dk.cached_norms(model):
        with torch.no_grad(), dk.adapter_routing(model, ROWS[:1]):
            layer = model.down
            layer._gather_impl = lambda x: None  # noqa: ARG005  (force the reference routing)
            first = model(x[:1])
            with layer.bound("dora2"):
                assert layer._norm_cache is not None          # the slot's norm is kept
        slot.lora_B.grad = torch.randn_like(slot.lora_B)
        opt.step()
        with torch.no_grad(), dk.adapter_routing(model, ROWS[:1]):
            stepped = model(x[:1])
    with torch.no_grad():
        want = alone(base, model, "dora2")(x[:1])
    torch.testing.assert_close(stepped, want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(first, stepped)


def _conv1d_model(in_f: int = 40, out_f: int = 24) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(out_f, in_f))  # GPT-2's layout: weight stored (in, out)
    config = dk.AdapterConfig(method="dora", rank=4, targets=["0"])
    dk.apply_adapters(model, config)
    dk.add_adapter(model, config, name="b")
    layer = model[0]
    with torch.no_grad():
        for name in layer.hosted_names():
            with layer.bound(name):
                layer.lora_B.normal_(std=0.1)
    return model.to(DEVICE).eval()


@needs_triton
def test_conv1d_mixed_batch_on_the_triton_path_equals_the_reference() -> None:
    """GPT-2's Conv1D stores W0 as (in, out): the decode branch must read W0 as (out, in) (weight_2d(), which
    is not contiguous there, so the gathered kernels run instead). backend="triton" set on the layer stands in
    for "auto" on CUDA once fast_path.DECODE_AUTO is set."""
    model = _conv1d_model()
    layer = model[0]
    x = torch.randn(3, 40, device=DEVICE)
    names = ["default", "b", None]
    with torch.no_grad(), dk.adapter_routing(model, names):
        layer.backend = "torch"  # reference routing: each group through its own adapter
        ref = model(x)
        layer.backend = "triton"
        assert layer._gather_impl(x) == "triton"  # 3 rows: the decode branch unless W0 is no (out, in) view
        y = model(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
