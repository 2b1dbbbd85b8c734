"""dk.add_weighted_adapter (the combined adapter's dense weight equals the stated formula in float64, and
PEFT's add_weighted_adapter where PEFT defines the result) and dk.generate with per-row adapters (each row
equals that prompt generated alone with its adapter, greedy, on a tiny Llama)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import dorakit as dk
from fixtures_multi import MLP, perturb_adapters

pytestmark = pytest.mark.filterwarnings("ignore:.*exceeds min\\(out, in\\)")  # "cat" sums ranks on tiny layers
F64 = torch.float64
DORA = {
    "default": dk.AdapterConfig(method="dora", rank=4, alpha=8, targets=["up", "down"]),
    "b": dk.AdapterConfig(method="dora", rank=3, alpha=5, targets=["up", "gate"], use_rslora=True),
    "c": dk.AdapterConfig(method="dora", rank=4, alpha=2, targets=["up", "gate", "down"]),
}


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    m = MLP().eval()
    dk.apply_adapters(m, DORA["default"])
    for name in ("b", "c"):
        dk.add_adapter(m, DORA[name], name=name)
    perturb_adapters(m)
    return m


def _tensors(layer: dk.AdapterLayer, name: str) -> dict[str, Tensor | float | None]:
    with layer.bound(name):
        return {"A": layer.lora_A.detach().clone(), "B": layer.lora_B.detach().clone(), "s": layer.scaling,
                "m": None if getattr(layer, "magnitude", None) is None else layer.magnitude.detach().clone()}


def _reference(layer: dk.AdapterLayer, names: list[str], weights: list[float], magnitude: str = "combine") -> Tensor:
    """W' = m (W0 + ΔV) / ||W0 + ΔV||_c with ΔV = Σ w_i s_i B_i A_i, m = m0 + Σ w_i (m_i - m0), in float64."""
    w0 = layer.base_layer.weight.detach()
    m0 = w0.norm(dim=1)
    dv, m = torch.zeros_like(w0), m0.clone()
    for name, w in zip(names, weights):
        if name in layer.hosted_names():
            t = _tensors(layer, name)
            dv += w * t["s"] * t["B"] @ t["A"]
            m += w * (t["m"] - m0) if magnitude == "combine" else 0
    v = w0 + dv
    return m[:, None] * v / v.norm(dim=1, keepdim=True)


def _combined_weight(layer: dk.AdapterLayer, name: str) -> Tensor:
    with layer.bound(name):
        return layer.adapted_weight_2d()


@pytest.mark.parametrize("magnitude", ["combine", "base"])
def test_cat_is_exact_for_dora(model: nn.Module, magnitude: str) -> None:
    names, weights = ["default", "b", "c"], [0.7, -0.4, 1.3]
    dk.add_weighted_adapter(model, names, weights, "mix", combination_type="cat", magnitude=magnitude)
    layers = dict(dk.adapter_layers(model))
    assert set(layers) == {"up", "gate", "down"} and all("mix" in la.hosted_names() for la in layers.values())
    assert layers["up"].adapters["mix"].rank == 4 + 3 + 4 and layers["down"].adapters["mix"].rank == 4 + 4
    for layer in layers.values():
        torch.testing.assert_close(_combined_weight(layer, "mix"), _reference(layer, names, weights, magnitude),
                                   rtol=1e-12, atol=1e-12)
    assert dk.active_adapter(model) == "default"
    assert not any(p.requires_grad for la in layers.values() for p in la.adapters["mix"].parameters())


def test_one_weight_one_gives_that_adapter_back(model: nn.Module) -> None:
    x = torch.randn(3, 2, 6, dtype=F64)
    dk.add_weighted_adapter(model, ["b", "c"], [1.0, 0.0], "just_b", combination_type="cat")
    dk.add_weighted_adapter(model, ["c"], [0.0], "nothing")
    outs = {}
    for name in ("b", "just_b", "nothing"):
        dk.set_adapter(model, name)
        outs[name] = model(x)
    with dk.adapter_routing(model, [None] * 3):
        base = model(x)
    torch.testing.assert_close(outs["just_b"], outs["b"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outs["nothing"], base, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(outs["b"], base)


def test_svd_is_the_truncated_svd_of_the_same_delta(model: nn.Module) -> None:
    names, weights = ["default", "c"], [0.5, 0.8]
    dk.add_weighted_adapter(model, names, weights, "svd2", combination_type="svd", svd_rank=2)
    dk.add_weighted_adapter(model, names, weights, "svd_full", combination_type="svd", svd_rank=8)
    for _, layer in dk.adapter_layers(model):
        dv = sum(w * t["s"] * t["B"] @ t["A"] for n, w in zip(names, weights) if n in layer.hosted_names()
                 for t in [_tensors(layer, n)])
        U, S, Vh = torch.linalg.svd(dv)
        best2 = U[:, :2] * S[:2] @ Vh[:2]
        for name, want in (("svd2", best2), ("svd_full", dv)):
            got = _tensors(layer, name)
            assert got["s"] == 1.0
            torch.testing.assert_close(got["B"] @ got["A"], want, rtol=1e-10, atol=1e-10)


def test_linear_mixes_the_factors_as_stated(model: nn.Module) -> None:
    names, weights = ["default", "c"], [0.6, -0.3]  # both rank 4 where they meet (up, down); c alone on gate
    dk.add_weighted_adapter(model, names, weights, "lin", combination_type="linear")
    for _, layer in dk.adapter_layers(model):
        held = [(n, w, _tensors(layer, n)) for n, w in zip(names, weights) if n in layer.hosted_names()]
        root = [abs(w * t["s"]) ** .5 for _, w, t in held]
        want_a = sum(r * (1 if w * t["s"] >= 0 else -1) * t["A"] for r, (_, w, t) in zip(root, held))
        want_b = sum(r * t["B"] for r, (_, w, t) in zip(root, held))
        got = _tensors(layer, "lin")
        torch.testing.assert_close(got["A"], want_a, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["B"], want_b, rtol=1e-12, atol=1e-12)


def test_combined_adapter_saves_loads_peft_reads_it_and_it_routes(model: nn.Module, tmp_path) -> None:
    dk.add_weighted_adapter(model, ["default", "b"], [0.5, 0.5], "mix", combination_type="cat")
    x = torch.randn(4, 2, 6, dtype=F64)
    dk.set_adapter(model, "mix")
    want = model(x)
    want.square().sum().backward()  # the combination trains on like any adapter: every one of its tensors gets a grad
    mix = [p for _, layer in dk.adapter_layers(model) for p in layer.adapters["mix"].parameters()]
    assert len(mix) == 9 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in mix)
    want = want.detach()
    dk.save_adapter(model, tmp_path, name="mix")
    torch.manual_seed(0)
    fresh = MLP().eval()  # the fixture's base
    dk.load_adapter(fresh, tmp_path / "mix")
    torch.testing.assert_close(fresh(x), want, rtol=1e-12, atol=1e-12)
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    theirs = peft.PeftModel.from_pretrained(MLP().eval(), tmp_path / "mix")  # per-module ranks via rank_pattern
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), want, rtol=1e-12, atol=1e-12)
    dk.set_adapter(model, "default")
    with dk.adapter_routing(model, ["mix", "default", None, "mix"]):
        routed = model(x)
    torch.testing.assert_close(routed[[0, 3]], want[[0, 3]], rtol=1e-12, atol=1e-12)


def test_errors(model: nn.Module) -> None:
    cases = [
        (([], []), ValueError, "non-empty list"),
        ((["b"], [1.0, 2.0]), ValueError, "one number per adapter"),
        ((["b", "c"], [1.0, float("nan")]), ValueError, "finite numbers"),
        ((["b", "nope"], [1.0, 1.0]), KeyError, "no adapter named 'nope'"),
        ((["b", "c"], [1.0, 1.0], "c"), ValueError, "already has an adapter named 'c'"),
        ((["b", "c"], [1.0, 1.0], "mix", "ties"), ValueError, "combination_type must be one of"),
        ((["default", "b"], [1.0, 1.0], "mix", "linear"), ValueError, "needs one rank per module"),
    ]
    for args, error, match in cases:
        full = (*args, "mix")[:3] if len(args) == 2 else args
        with pytest.raises(error, match=match):
            dk.add_weighted_adapter(model, *full)
    with pytest.raises(ValueError, match="needs combination_type='svd'"):
        dk.add_weighted_adapter(model, ["b", "c"], [1, 1], "mix", combination_type="cat", svd_rank=2)
    with pytest.raises(ValueError, match="magnitude must be one of"):
        dk.add_weighted_adapter(model, ["b", "c"], [1, 1], "mix", magnitude="mean")
    dk.add_adapter(model, dk.AdapterConfig(method="lora", rank=2, targets=["up"]), name="lo")
    with pytest.raises(ValueError, match="adapters of one method"):
        dk.add_weighted_adapter(model, ["b", "lo"], [1, 1], "mix")
    dk.add_adapter(model, dk.AdapterConfig(method="dora", rank=2, targets=["up"], magnitude_only=["gate"]), name="mo")
    with pytest.raises(ValueError, match="magnitude-only on module 'gate'"):
        dk.add_weighted_adapter(model, ["b", "mo"], [1, 1], "mix")
    assert dk.list_adapters(model) == ["default", "b", "c", "lo", "mo"]  # nothing was added by a failed call


@pytest.mark.parametrize("kind", ["linear", "cat", "svd"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_equals_peft_add_weighted_adapter(tmp_path, method: str, kind: str) -> None:
    """PEFT's add_weighted_adapter on the same two adapters gives the same logits (DoRA: magnitude="base",
    PEFT's rule; its adapters start from init_lora_weights=True, then B and the magnitude are perturbed)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    base = MLP().eval()
    dora = method == "dora"
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"],
                                                                   use_dora=dora))
    pm.add_adapter("two", peft.LoraConfig(r=4, lora_alpha=3, target_modules=["up", "gate"], use_dora=dora))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.copy_((p if "magnitude" in name else 0) + torch.randn(p.shape, generator=gen, dtype=F64) * .3)
    pm.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    dk.load_adapter(ours, tmp_path)
    dk.load_adapter(ours, tmp_path / "two", name="two")
    weights = [0.7, -0.4]
    pm.add_weighted_adapter(["default", "two"], weights, "mix", combination_type=kind)
    dk.add_weighted_adapter(ours, ["default", "two"], weights, "mix", combination_type=kind,
                            **({"magnitude": "base"} if dora else {}))
    pm.set_adapter("mix")
    dk.set_adapter(ours, "mix")
    x = torch.randn(3, 4, 6, dtype=F64)
    with torch.no_grad():
        want, got = pm(x), ours(x)
        dk.set_adapter(ours, "default")
        assert not torch.allclose(ours(x), got)
    # PEFT holds the weights of "linear" and "svd" in a float32 tensor (torch.tensor(valid_weights)): one float32
    # rounding of w_i (and of sqrt|w_i s_i|); "cat" multiplies by the Python floats, so it matches to float64.
    tol = 1e-10 if kind == "cat" else 1e-6
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    """A tiny float64 Llama with a DoRA adapter ("default") and a LoRA adapter ("lo") on different targets."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=1, pad_token_id=None)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(F64).eval()
    dk.apply_adapters(model, dk.AdapterConfig(method="dora", rank=4, alpha=8, targets=["q_proj", "v_proj", "up_proj"]))
    dk.add_adapter(model, dk.AdapterConfig(method="lora", rank=2, alpha=4, targets=["o_proj", "down_proj"]), name="lo")
    perturb_adapters(model, seed=6)
    return model


def _alone(model: nn.Module, ids: Tensor, name: str | None, **kw: object) -> Tensor:
    """Greedy tokens of one unpadded prompt (1, T) with adapter ``name`` active (None: the base)."""
    if name is None:
        with dk.adapter_routing(model, [None] * ids.shape[0] * kw.get("num_beams", 1)):
            return model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    dk.set_adapter(model, name)
    try:
        return model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    finally:
        dk.set_adapter(model, "default")


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_with_adapter_names_equals_each_row_alone(llama: nn.Module, num_beams: int) -> None:
    """Left-padded prompts of different lengths, one adapter (or none) each: each row's greedy tokens (and,
    without beams, each step's scores) are the ones its prompt gets alone with its adapter; PEFT's "__base__"
    means no adapter."""
    kw = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "num_beams": num_beams, "pad_token_id": 1,
          "output_scores": True, "return_dict_in_generate": True}
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(2, 40, (n,), generator=gen) for n in (5, 3, 4, 5)]
    names = ["lo", "default", "__base__", None]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.ones(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.arange(width) >= width - len(p) for p in prompts]).long()
    with torch.no_grad():
        out = dk.generate(llama, ids, attention_mask=mask, adapter_names=names, **kw)
        alone = [_alone(llama, p[None], None if n == "__base__" else n, **kw) for p, n in zip(prompts, names)]
        base = [_alone(llama, p[None], None, **kw) for p in prompts[:2]]
    assert out.sequences.shape == (4, width + 5)
    for i, (p, one) in enumerate(zip(prompts, alone)):
        assert out.sequences[i, width:].tolist() == one.sequences[0, len(p):].tolist()
        if num_beams == 1:
            for step, step_alone in zip(out.scores, one.scores):
                torch.testing.assert_close(step[i], step_alone[0], rtol=1e-9, atol=1e-9)
    for one, plain in zip(alone, base):  # each adapter changes its prompt's scores, so the rows test the routing
        assert not torch.allclose(one.scores[0], plain.scores[0], rtol=1e-3, atol=1e-3)


def test_generate_builds_each_pack_once_per_call(llama: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """dk.generate runs inside dk.cached_norms: each module's mixed-batch pack is built once, not per token."""
    from dorakit.adapters.gathered import GatherPath

    built = []
    build = GatherPath._build_pack
    monkeypatch.setattr(GatherPath, "_build_pack", lambda self, dtype: built.append(id(self)) or build(self, dtype))
    ids = torch.randint(2, 40, (2, 4), generator=torch.Generator().manual_seed(5))
    llama.eval()
    with torch.no_grad():
        dk.generate(llama, ids, adapter_names=["lo", "default"], max_new_tokens=4, min_new_tokens=4, do_sample=False,
                    pad_token_id=1)
    routed = sum(1 for _, layer in dk.adapter_layers(llama) if layer.supports_gather)
    assert routed > 0 and len(built) == routed == len(set(built))


def test_generate_rejects_bad_adapter_names(llama: nn.Module) -> None:
    ids = torch.randint(2, 40, (2, 3))
    with pytest.raises(dk.RoutingError, match="one name per prompt"):
        dk.generate(llama, ids, adapter_names="lo", max_new_tokens=2, pad_token_id=1)
    with pytest.raises(dk.RoutingError, match=r"\['nope'\], which are not adapters"):
        dk.generate(llama, ids, adapter_names=["lo", "nope"], max_new_tokens=2, pad_token_id=1)
    with pytest.raises(dk.RoutingError, match="was given 1 rows but this batch has 2"):
        dk.generate(llama, ids, adapter_names=["lo"], max_new_tokens=2, pad_token_id=1)
