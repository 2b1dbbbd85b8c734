"""Injection on tiny transformers models: target syntax, the report, freezing, errors that leave the
model untouched, and reversibility (remove, merge / unmerge, merge_and_unload, adapters_disabled).

Invariants, not golden numbers: DoRA and LoRA are the identity at init; merged == unmerged once B
and the magnitude are perturbed (with biases); unmerge and remove give W0 back.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import dorakit as dk
from dorakit.adapters.layers import AdapterLayer, Conv1DAdapter, ConvAdapter, EmbeddingAdapter, LinearAdapter

# Which modules each tiny model adapts in the model-wide tests: every adaptable kind appears
# (nn.Linear, nn.Conv1d, transformers Conv1D; nn.Conv2d in ViT's own test).
TARGETS: dict[str, str | list[str]] = {
    "llama": "all-linear",
    "bert": ["query", "key", "value", "dense"],
    "vit": ["q_proj", "v_proj", "fc1", "pooler.dense"],         # the patch nn.Conv2d: its own test below
    "whisper": ["conv1", "conv2", "q_proj", "v_proj"],          # conv1/conv2: nn.Conv1d
    "gpt2": ["c_attn", "c_proj", "c_fc"],                       # transformers Conv1D
}
KINDS = tuple(TARGETS)
ATOL = 1e-5  # float32, a few layers deep, outputs of order 1
INIT_ATOL = 1e-6


def _layer_names(prefix: str, leaves: list[str], layers: int = 2) -> list[str]:
    return [f"{prefix}.{i}.{leaf}" for i in range(layers) for leaf in leaves]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _is_hf_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return type(module) is Conv1D


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Linear or _is_hf_conv1d(m)]


# ---- target syntax and the report ------------------------------------------------------------------

LLAMA_QV = _layer_names("model.layers", ["self_attn.q_proj", "self_attn.v_proj"])
LLAMA_Q = _layer_names("model.layers", ["self_attn.q_proj"])
LLAMA_LAYER1 = [f"model.layers.1.{leaf}" for leaf in
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


@pytest.mark.parametrize(("targets", "expected"), [
    (["model.layers.1.mlp.down_proj"], ["model.layers.1.mlp.down_proj"]),    # exact full name
    (["q_proj"], LLAMA_Q),                                                   # suffix
    (["self_attn.q_proj"], LLAMA_Q),                                         # dotted suffix
    (["layers.*.self_attn.q_proj"], LLAMA_Q),                                # glob on a suffix
    (["model.layers.?.self_attn.q_proj"], LLAMA_Q),                          # glob on the full name
    (["layers.1.*_proj"], LLAMA_LAYER1),
    (["re:.*\\.[qv]_proj"], LLAMA_QV),                                       # "re:" regex, whole name
    (r"model\.layers\.\d+\.self_attn\.(q|v)_proj", LLAMA_QV),               # a string: a whole-name regex
    (".*q_proj", LLAMA_Q),
    (["v_proj", "q_proj"], LLAMA_QV),                                        # model order, not list order
    (["q_proj", "layers.0.self_attn.q_proj", "re:model\\.layers\\.0\\..*q_proj"], LLAMA_Q),  # once each
])
def test_target_syntax_selects_exactly_the_named_modules(make_tiny: Callable, targets: object,
                                                         expected: list[str]) -> None:
    tiny = make_tiny("llama")
    report = dk.apply_adapters(tiny.model, dk.AdapterConfig(targets=targets, rank=4))
    assert isinstance(report, dk.InjectionReport)
    assert report.names == expected and len(report) == len(expected)
    assert [n for n, _ in dk.adapter_layers(tiny.model)] == expected
    assert [w.variant for w in report.wrapped] == ["dora"] * len(expected)
    for name in expected:
        assert isinstance(tiny.model.get_submodule(name), LinearAdapter)


def test_bert_glob_and_suffix(bert) -> None:
    queries = _layer_names("encoder.layer", ["attention.self.query"])
    report = dk.apply_adapters(bert.model, dk.AdapterConfig(targets=["encoder.layer.*.attention.self.query"]))
    assert report.names == queries
    dk.remove_adapters(bert.model)
    report = dk.apply_adapters(bert.model, dk.AdapterConfig(targets=["value", "query"]))
    assert report.names == _layer_names("encoder.layer", ["attention.self.query", "attention.self.value"])


def test_suffix_matches_whole_dotted_components_only(llama) -> None:
    # "proj" is not a dotted suffix of "...q_proj"; a bare "re:" regex must match the whole name.
    for targets in (["proj"], ["_proj"], ["re:q_proj"], "q_proj"):
        with pytest.raises(dk.TargetError):
            dk.apply_adapters(llama.model, dk.AdapterConfig(targets=targets))
    assert not list(dk.adapter_layers(llama.model))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "vit", "whisper"])
def test_all_linear_wraps_every_linear_but_the_output_head(make_tiny: Callable, kind: str) -> None:
    tiny = make_tiny(kind)
    linear = _linear_names(tiny.model)
    head = tiny.model.get_output_embeddings() if hasattr(tiny.model, "get_output_embeddings") else None
    # Output and classification heads (get_output_embeddings(), lm_head / classifier / score) stay out.
    expected = [n for n in linear if tiny.model.get_submodule(n) is not head
                and n.rpartition(".")[2] not in ("lm_head", "classifier", "score")]
    report = dk.apply_adapters(tiny.model, dk.AdapterConfig(targets="all-linear", rank=2))
    assert report.names == expected
    if kind in ("llama", "gpt2"):
        assert "lm_head" not in report.names and type(tiny.model.lm_head) is nn.Linear
        assert len(expected) == len(linear) - 1
    if kind == "gpt2":
        assert all(isinstance(tiny.model.get_submodule(n), Conv1DAdapter) for n in expected)
        assert {w.base_type for w in report.wrapped} == {"Conv1D"}


def test_report_lists_variants_types_and_shapes_in_model_order(whisper) -> None:
    cfg = dk.AdapterConfig(targets=["v_proj", "conv1", "conv2"], magnitude_only=["q_proj"], rank=4, alpha=8)
    report = dk.apply_adapters(whisper.model, cfg)
    expected = [("encoder.conv1", "Conv1d", "dora", (32, 8 * 3)),     # (out, in · kernel)
                ("encoder.conv2", "Conv1d", "dora", (32, 32 * 3))]
    for i in range(2):
        # WhisperAttention registers k_proj, v_proj, q_proj in that order.
        expected += [(f"encoder.layers.{i}.self_attn.v_proj", "Linear", "dora", (32, 32)),
                     (f"encoder.layers.{i}.self_attn.q_proj", "Linear", "magnitude", (32, 32))]
    assert [(w.name, w.base_type, w.variant, w.shape) for w in report.wrapped] == expected
    assert [(w.rank, w.alpha) for w in report.wrapped if w.variant == "dora"] == [(4, 8.0)] * 4
    assert isinstance(whisper.model.encoder.conv1, ConvAdapter)
    lines = str(report).splitlines()
    assert lines[0] == "dorakit wrapped 6 modules:"
    assert lines[1] == "  encoder.conv1: Conv1d 32x24 -> dora r=4 alpha=8"
    assert lines[4] == "  encoder.layers.0.self_attn.q_proj: Linear 32x32 -> magnitude"


# ---- freezing and identity at init ----------------------------------------------------------------

@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("kind", KINDS)
def test_output_unchanged_at_init_and_only_adapters_train(make_tiny: Callable, kind: str,
                                                          method: str) -> None:
    tiny = make_tiny(kind)
    before = tiny.run()
    report = dk.apply_adapters(tiny.model, dk.AdapterConfig(method=method, targets=TARGETS[kind], rank=4))
    assert len(report) >= 4 and {w.variant for w in report.wrapped} == {method}
    assert _max_diff(tiny.run(), before) <= INIT_ATOL
    adapter_ids = {id(p) for p in dk.adapter_parameters(tiny.model).values()}
    for name, param in tiny.model.named_parameters():
        assert param.requires_grad == (id(param) in adapter_ids), name
    for name, layer in dk.adapter_layers(tiny.model):
        assert not layer.base_layer.weight.requires_grad
        assert layer.lora_A.requires_grad and layer.lora_B.requires_grad, name
        assert (getattr(layer, "magnitude", None) is not None) == (method == "dora")
    if kind == "whisper":
        assert isinstance(tiny.model.encoder.conv2, ConvAdapter)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_vit_patch_projection_conv2d(make_tiny: Callable, perturb, method: str) -> None:
    """ViT's forward reads ``patch_embeddings.projection.weight.dtype``; a wrapped Conv2d must still run."""
    tiny = make_tiny("vit")
    before = tiny.run()
    cfg = dk.AdapterConfig(method=method, targets=["projection", "q_proj"], rank=4)
    report = dk.apply_adapters(tiny.model, cfg)
    assert report.wrapped[0].base_type == "Conv2d" and report.wrapped[0].shape == (32, 3 * 8 * 8)
    assert isinstance(tiny.model.embeddings.patch_embeddings.projection, ConvAdapter)
    assert _max_diff(tiny.run(), before) <= INIT_ATOL
    perturb(tiny.model)
    adapted = tiny.run()
    assert _max_diff(adapted, before) > 1e-3
    dk.merge_and_unload(tiny.model)
    assert type(tiny.model.embeddings.patch_embeddings.projection) is nn.Conv2d
    torch.testing.assert_close(tiny.run(), adapted, rtol=ATOL, atol=ATOL)


def test_adapted_embedding_is_identity_at_init(make_tiny: Callable) -> None:
    tiny = make_tiny("llama", tie=False)
    before = tiny.run()
    dk.apply_adapters(tiny.model, dk.AdapterConfig(targets=["embed_tokens", "q_proj"], rank=4))
    assert isinstance(tiny.model.model.embed_tokens, EmbeddingAdapter)
    assert _max_diff(tiny.run(), before) <= INIT_ATOL


def test_magnitude_only_targets_train_only_a_magnitude(llama) -> None:
    before = llama.run()
    cfg = dk.AdapterConfig(targets=["q_proj", "v_proj"], magnitude_only=["o_proj", "down_proj"], rank=4)
    report = dk.apply_adapters(llama.model, cfg)
    variants = {w.name.split(".", 3)[3]: w.variant for w in report.wrapped}
    assert variants == {"self_attn.q_proj": "dora", "self_attn.v_proj": "dora",
                        "self_attn.o_proj": "magnitude", "mlp.down_proj": "magnitude"}
    o_proj = llama.model.model.layers[0].self_attn.o_proj
    assert o_proj.variant == "magnitude" and o_proj.lora_A is None and o_proj.lora_B is None
    assert [n for n, p in o_proj.named_parameters() if p.requires_grad] == ["magnitude"]
    assert o_proj.magnitude.shape == (32,)
    assert sorted(k for k in dk.adapter_parameters(llama.model) if ".o_proj." in k) == [
        "model.layers.0.self_attn.o_proj.magnitude", "model.layers.1.self_attn.o_proj.magnitude"]
    assert _max_diff(llama.run(), before) <= INIT_ATOL


def test_magnitude_only_with_lora_targets(llama) -> None:
    cfg = dk.AdapterConfig(method="lora", targets=["q_proj"], magnitude_only=["o_proj"], rank=4)
    report = dk.apply_adapters(llama.model, cfg)
    assert sorted({w.variant for w in report.wrapped}) == ["lora", "magnitude"]
    assert not hasattr(llama.model.model.layers[0].self_attn.q_proj, "magnitude")


def test_overlapping_targets_and_magnitude_only_raise(llama, model_snapshot) -> None:
    before = model_snapshot(llama.model)
    cfg = dk.AdapterConfig(targets=["q_proj", "o_proj"], magnitude_only=["layers.1.self_attn.o_proj"])
    with pytest.raises(dk.TargetError, match=r"model\.layers\.1\.self_attn\.o_proj"):
        dk.apply_adapters(llama.model, cfg)
    assert model_snapshot(llama.model)[:2] == before[:2]


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_modes(bert, bias: str) -> None:
    dk.apply_adapters(bert.model, dk.AdapterConfig(targets=["query", "value"], bias=bias, rank=4))
    trainable_biases = sorted(n for n, p in bert.model.named_parameters()
                              if p.requires_grad and n.endswith("bias"))
    all_biases = sorted(n for n, _ in bert.model.named_parameters() if n.endswith("bias"))
    adapted = sorted(f"{n}.base_layer.bias" for n, _ in dk.adapter_layers(bert.model))
    expected = {"none": [], "all": all_biases, "lora_only": adapted}[bias]
    assert trainable_biases == expected
    assert len(all_biases) > len(adapted) == 4  # LayerNorm and other Linear biases exist too
    # Nothing but adapters and the chosen biases trains.
    others = [n for n, p in bert.model.named_parameters() if p.requires_grad and not n.endswith("bias")]
    assert sorted(others) == sorted(dk.adapter_parameters(bert.model))


def test_modules_to_save_unfreezes_the_head_in_place(whisper) -> None:
    head = whisper.model.classifier
    cfg = dk.AdapterConfig(targets=["q_proj", "v_proj"], modules_to_save=["classifier"], rank=4)
    dk.apply_adapters(whisper.model, cfg)
    assert whisper.model.classifier is head and type(head) is nn.Linear
    assert head.weight.requires_grad and head.bias.requires_grad
    assert not whisper.model.projector.weight.requires_grad
    trainable = {n for n, p in whisper.model.named_parameters() if p.requires_grad}
    assert trainable == set(dk.adapter_parameters(whisper.model)) | {"classifier.weight", "classifier.bias"}


def test_modules_to_save_that_matches_nothing_raises(whisper, model_snapshot) -> None:
    before = model_snapshot(whisper.model)
    with pytest.raises(dk.TargetError, match="classifer"):
        dk.apply_adapters(whisper.model, dk.AdapterConfig(targets=["q_proj"], modules_to_save=["classifer"]))
    assert model_snapshot(whisper.model)[:2] == before[:2]


def test_rank_pattern_and_alpha_pattern_give_per_module_ranks(llama) -> None:
    cfg = dk.AdapterConfig(targets=["q_proj", "v_proj"], rank=4, alpha=8,
                           rank_pattern={"layers.1.self_attn.q_proj": 2, "v_proj": 8},
                           alpha_pattern={"v_proj": 4, "q_proj": 1})
    report = dk.apply_adapters(llama.model, cfg)
    got = {w.name: (w.rank, w.alpha) for w in report.wrapped}
    assert got == {"model.layers.0.self_attn.q_proj": (4, 1.0), "model.layers.0.self_attn.v_proj": (8, 4.0),
                   "model.layers.1.self_attn.q_proj": (2, 1.0), "model.layers.1.self_attn.v_proj": (8, 4.0)}
    for name, layer in dk.adapter_layers(llama.model):
        rank, alpha = got[name]
        assert layer.lora_A.shape == (rank, 32) and layer.lora_B.shape == (layer.weight_2d().shape[0], rank)
        assert layer.scaling == pytest.approx(alpha / rank)


def test_use_rslora_scaling_reaches_the_layers(llama) -> None:
    dk.apply_adapters(llama.model, dk.AdapterConfig(targets=["q_proj"], rank=4, alpha=8, use_rslora=True))
    for _, layer in dk.adapter_layers(llama.model):
        assert layer.scaling == pytest.approx(8 / 2)


# ---- errors --------------------------------------------------------------------------------------

def test_nothing_matches_suggests_close_names_and_leaves_model_untouched(llama, model_snapshot) -> None:
    before = model_snapshot(llama.model)
    with pytest.raises(dk.TargetError, match="q_proj") as info:
        dk.apply_adapters(llama.model, dk.AdapterConfig(targets=["qproj", "v_proj"]))
    assert "'qproj'" in str(info.value)
    assert model_snapshot(llama.model)[:2] == before[:2]
    assert not list(dk.adapter_layers(llama.model))


@pytest.mark.parametrize("targets", [
    r"model\.layers\.\d+\.attn\.q_proj", ["re:.*\\.qproj"], ["layers.*.q_prj"]])
def test_regex_and_glob_that_match_nothing_raise(llama, targets: object) -> None:
    with pytest.raises(dk.TargetError):
        dk.apply_adapters(llama.model, dk.AdapterConfig(targets=targets))
    assert not list(dk.adapter_layers(llama.model))


@pytest.mark.parametrize(("kind", "targets", "type_name"), [
    ("llama", ["self_attn"], "LlamaAttention"),
    ("llama", ["input_layernorm"], "LlamaRMSNorm"),
    ("gpt2", ["ln_1"], "LayerNorm"),
    ("bert", ["re:.*attention\\.self"], "BertSelfAttention"),
])
def test_unsupported_module_type_raises_naming_supported_types(make_tiny: Callable, model_snapshot, kind: str,
                                                               targets: list[str], type_name: str) -> None:
    tiny = make_tiny(kind)
    before = model_snapshot(tiny.model)
    with pytest.raises(dk.TargetError) as info:
        dk.apply_adapters(tiny.model, dk.AdapterConfig(targets=targets))
    message = str(info.value)
    assert type_name in message
    for supported in ("nn.Linear", "nn.Conv1d", "nn.Conv2d", "nn.Embedding", "Conv1D"):
        assert supported in message
    assert model_snapshot(tiny.model)[:2] == before[:2]


def test_applying_twice_raises(llama) -> None:
    dk.apply_adapters(llama.model, dk.AdapterConfig(targets=["q_proj"]))
    flags = {n: p.requires_grad for n, p in llama.model.named_parameters()}
    with pytest.raises(RuntimeError, match="adapters"):
        dk.apply_adapters(llama.model, dk.AdapterConfig(targets=["v_proj"]))
    assert {n: p.requires_grad for n, p in llama.model.named_parameters()} == flags
    assert len(list(dk.adapter_layers(llama.model))) == 2


def test_rank_above_min_dim_warns_naming_the_module(llama) -> None:
    # k_proj is (16, 32) with 2 key/value heads of size 8: rank 20 > 16. PEFT allows this, so dorakit does too.
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.self_attn\.k_proj.*exceeds min"):
        dk.apply_adapters(llama.model, dk.AdapterConfig(targets=["q_proj", "k_proj"], rank=20))
    assert {layer.rank for _, layer in dk.adapter_layers(llama.model)} == {20}


def test_per_layer_error_names_the_module_and_leaves_model_untouched(model_snapshot) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Conv2d(4, 4, 3, groups=2))  # the Linear fits, the conv cannot
    before = model_snapshot(model)
    with pytest.raises(ValueError, match=r"module '1'.*groups=2"):
        dk.apply_adapters(model, dk.AdapterConfig(targets=["0", "1"], rank=2))
    types, flags, state = model_snapshot(model)
    assert types == before[0] and flags == before[1]
    assert state.keys() == before[2].keys()
    assert all(torch.equal(state[k], before[2][k]) for k in state)


@pytest.mark.parametrize(("kind", "targets"), [
    ("gpt2", ["lm_head"]), ("gpt2", ["wte"]), ("gpt2", ["c_attn", "transformer.wte"]),
    ("llama", ["embed_tokens"]), ("llama", ["lm_head"]),
])
def test_tied_weights_raise(make_tiny: Callable, model_snapshot, kind: str, targets: list[str]) -> None:
    tiny = make_tiny(kind, tie=True) if kind == "llama" else make_tiny(kind)
    assert tiny.model.lm_head.weight is tiny.model.get_input_embeddings().weight
    before = model_snapshot(tiny.model)
    with pytest.raises(dk.TargetError, match="tied"):
        dk.apply_adapters(tiny.model, dk.AdapterConfig(targets=targets, rank=4))
    assert model_snapshot(tiny.model)[:2] == before[:2]


def test_untied_lm_head_can_be_targeted_explicitly(make_tiny: Callable) -> None:
    tiny = make_tiny("llama", tie=False)
    report = dk.apply_adapters(tiny.model, dk.AdapterConfig(targets=["lm_head"], rank=4))
    assert report.names == ["lm_head"]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecation inside peft
def test_model_with_peft_modules_raises(llama) -> None:
    import peft

    peft_model = peft.get_peft_model(llama.model, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(RuntimeError, match="PEFT"):
        dk.apply_adapters(peft_model, dk.AdapterConfig(targets=["v_proj"]))
    with pytest.raises(RuntimeError, match="PEFT"):
        dk.apply_adapters(llama.model, dk.AdapterConfig(targets=["v_proj"]))  # the wrapped model itself
    assert not list(dk.adapter_layers(llama.model))


def test_state_errors(llama) -> None:
    model = llama.model
    for op in (dk.merge_adapters, dk.unmerge_adapters, dk.merge_and_unload, dk.remove_adapters):
        with pytest.raises(RuntimeError, match="adapters"):
            op(model)
    with pytest.raises(RuntimeError, match="adapters"), dk.adapters_disabled(model):
        pass
    dk.apply_adapters(model, dk.AdapterConfig(targets=["q_proj"]))
    with pytest.raises(RuntimeError, match="not merged"):
        dk.unmerge_adapters(model)
    dk.merge_adapters(model)
    weights = [layer.base_layer.weight.clone() for _, layer in dk.adapter_layers(model)]
    with pytest.raises(RuntimeError, match="merged"):
        dk.merge_adapters(model)
    with pytest.raises(RuntimeError, match="merged"):
        dk.remove_adapters(model)
    with pytest.raises(RuntimeError, match="merged"), dk.adapters_disabled(model):
        pass
    # None of the refused operations changed a weight or unwrapped a module.
    layers = [layer for _, layer in dk.adapter_layers(model)]
    assert all(torch.equal(w, layer.base_layer.weight) for w, layer in zip(weights, layers))
    assert all(layer.merged for _, layer in dk.adapter_layers(model))
    assert len(list(dk.adapter_layers(model))) == 2


def test_adapter_state_error_is_a_runtime_error() -> None:
    assert issubclass(dk.AdapterStateError, RuntimeError)


# ---- reversibility -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_remove_adapters_restores_the_original_modules(make_tiny: Callable, perturb, kind: str) -> None:
    tiny = make_tiny(kind)
    before = tiny.run()
    originals = dict(tiny.model.named_modules())
    weights = {n: m.weight.detach().clone() for n, m in originals.items()
               if isinstance(getattr(m, "weight", None), torch.Tensor)}
    report = dk.apply_adapters(tiny.model, dk.AdapterConfig(targets=TARGETS[kind], rank=4))
    perturb(tiny.model)
    assert _max_diff(tiny.run(), before) > 1e-3
    assert dk.remove_adapters(tiny.model) is tiny.model
    for name in report.names:
        assert tiny.model.get_submodule(name) is originals[name]
    assert {n: type(m) for n, m in tiny.model.named_modules()} == {n: type(m) for n, m in originals.items()}
    for name, weight in weights.items():
        assert torch.equal(tiny.model.get_submodule(name).weight, weight), name
    assert torch.equal(tiny.run(), before)


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_gives_plain_modules_with_the_adapted_output(make_tiny: Callable, perturb, kind: str,
                                                                      method: str) -> None:
    # LLaMA with q/k/v/o and MLP biases, so that every model here has biased adapted modules.
    tiny = make_tiny(kind, bias=True) if kind == "llama" else make_tiny(kind)
    before = tiny.run()
    base_types = {n: type(m) for n, m in tiny.model.named_modules()}
    report = dk.apply_adapters(tiny.model, dk.AdapterConfig(method=method, targets=TARGETS[kind], rank=4))
    assert any(tiny.model.get_submodule(n).base_layer.bias is not None for n in report.names)
    perturb(tiny.model)
    adapted = tiny.run()
    assert _max_diff(adapted, before) > 1e-3
    plain = dk.merge_and_unload(tiny.model)
    assert plain is tiny.model
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert {n: type(m) for n, m in plain.named_modules()} == base_types
    torch.testing.assert_close(tiny.run(plain), adapted, rtol=ATOL, atol=ATOL)
    assert not any(p.requires_grad for p in plain.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_merge_then_unmerge_restores_base_weights(make_tiny: Callable, perturb, kind: str) -> None:
    tiny = make_tiny(kind)
    before = tiny.run()
    cfg = dk.AdapterConfig(targets=TARGETS[kind], rank=4)
    dk.apply_adapters(tiny.model, cfg)
    perturb(tiny.model)
    w0 = {n: layer.base_layer.weight.detach().clone() for n, layer in dk.adapter_layers(tiny.model)}
    adapted = tiny.run()
    dk.merge_adapters(tiny.model)
    assert all(layer.merged for _, layer in dk.adapter_layers(tiny.model))
    merged = tiny.run()
    torch.testing.assert_close(merged, adapted, rtol=ATOL, atol=ATOL)
    assert _max_diff(merged, before) > 1e-3
    assert any(not torch.equal(layer.base_layer.weight, w0[n]) for n, layer in dk.adapter_layers(tiny.model))
    dk.unmerge_adapters(tiny.model)
    for name, layer in dk.adapter_layers(tiny.model):
        assert not layer.merged
        torch.testing.assert_close(layer.base_layer.weight, w0[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tiny.run(), adapted, rtol=ATOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["llama", "whisper", "gpt2"])
def test_adapters_disabled_gives_the_base_output_and_restores(make_tiny: Callable, perturb,
                                                              kind: str) -> None:
    tiny = make_tiny(kind)
    before = tiny.run()
    dk.apply_adapters(tiny.model, dk.AdapterConfig(targets=TARGETS[kind], rank=4))
    perturb(tiny.model)
    adapted = tiny.run()
    assert _max_diff(adapted, before) > 1e-3
    with dk.adapters_disabled(tiny.model):
        torch.testing.assert_close(tiny.run(), before, rtol=0, atol=0)  # the base modules' own forward
    torch.testing.assert_close(tiny.run(), adapted, rtol=0, atol=0)
    with pytest.raises(KeyError), dk.adapters_disabled(tiny.model):
        raise KeyError("an error inside the block")
    torch.testing.assert_close(tiny.run(), adapted, rtol=0, atol=0)
    assert not any(layer.disabled for _, layer in dk.adapter_layers(tiny.model))


def test_adapters_apply_again_after_remove_and_unload(llama, perturb) -> None:
    before = llama.run()
    dk.apply_adapters(llama.model, dk.AdapterConfig(targets=["q_proj"]))
    dk.remove_adapters(llama.model)
    report = dk.apply_adapters(llama.model, dk.AdapterConfig(targets=["v_proj"]))
    assert report.names == _layer_names("model.layers", ["self_attn.v_proj"])
    perturb(llama.model)
    dk.merge_and_unload(llama.model)
    assert _max_diff(llama.run(), before) > 1e-3
    report = dk.apply_adapters(llama.model, dk.AdapterConfig(targets=["q_proj"]))
    assert len(report) == 2


def test_wrappers_follow_the_models_eval_mode(llama, perturb) -> None:
    """A model in eval() before apply_adapters stays deterministic: new wrappers must not be in train mode."""
    assert not llama.model.training
    dk.apply_adapters(llama.model, dk.AdapterConfig(targets=["q_proj", "v_proj"], dropout=0.5, rank=4))
    assert not any(m.training for m in llama.model.modules()), \
        [n for n, m in llama.model.named_modules() if m.training]
    perturb(llama.model)
    torch.testing.assert_close(llama.run(), llama.run(), rtol=0, atol=0)


# ---- the real pretrained MiniLM -------------------------------------------------------------------

SENTENCES = ["A man is playing a guitar.", "The cat sleeps on the sofa.", "Stock markets fell sharply today."]


def test_dora_on_pretrained_minilm(minilm_path, perturb) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model = AutoModel.from_pretrained(minilm_path).eval()
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))

    def run() -> torch.Tensor:
        with torch.no_grad():
            return model(**batch).last_hidden_state  # (B, T, 384)

    base = run()
    total_before = sum(p.numel() for p in model.parameters())
    cfg = dk.AdapterConfig(method="dora", rank=8, alpha=16, targets=["query", "value"])
    report = dk.apply_adapters(model, cfg)
    expected = _layer_names("encoder.layer", ["attention.self.query", "attention.self.value"], layers=6)
    assert report.names == expected
    at_init = run()
    assert _max_diff(at_init, base) <= ATOL  # hidden states of order 5; float32 rounding of the bias add

    trainable = 12 * (8 * (384 + 384) + 384)  # A (8, 384) + B (384, 8) + m (384,) per module
    summary = dk.trainable_summary(model)
    assert summary == (f"trainable params: {trainable:,d} || all params: {total_before + trainable:,d} || "
                       f"trainable%: {100 * trainable / (total_before + trainable):.4f}")
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}",
                        summary)

    perturb(model, std=0.02)
    adapted = run()
    assert _max_diff(adapted, base) > 1e-2
    dk.merge_adapters(model)
    torch.testing.assert_close(run(), adapted, rtol=ATOL, atol=ATOL)
    dk.unmerge_adapters(model)
    torch.testing.assert_close(run(), adapted, rtol=ATOL, atol=ATOL)
    dk.merge_and_unload(model)
    assert {type(model.get_submodule(n)) for n in report.names} == {nn.Linear}
    torch.testing.assert_close(run(), adapted, rtol=ATOL, atol=ATOL)


# ---- regressions from the independent review ------------------------------------------------

def _tiny_classifier(num_labels: int) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=32, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def test_all_linear_leaves_classification_heads_out_and_modules_to_save_work() -> None:
    model = _tiny_classifier(num_labels=2)  # a 2-row head: rank 8 would not even fit it
    report = dk.apply_adapters(model, dk.AdapterConfig(modules_to_save=["classifier"]))
    assert "classifier" not in report.names and type(model.classifier) is nn.Linear
    assert any(n.endswith("attention.self.query") for n in report.names)
    trainable = dk.trainable_parameters(model)
    assert {"classifier.weight", "classifier.bias"} <= set(trainable)
    assert set(dk.adapter_parameters(model)) < set(trainable)


def test_all_linear_skips_multihead_attention_projections() -> None:
    model = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=24, batch_first=True)
    report = dk.apply_adapters(model, dk.AdapterConfig(rank=2))
    assert report.names == ["linear1", "linear2"]
    assert type(model.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    with pytest.raises(dk.TargetError, match="MultiheadAttention"):
        dk.apply_adapters(nn.TransformerEncoderLayer(16, 2, 24), dk.AdapterConfig(rank=2, targets=["out_proj"]))


def test_parametrized_linear_is_not_adapted() -> None:
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(8, 8)), nn.Linear(8, 4))
    assert dk.apply_adapters(model, dk.AdapterConfig(rank=2)).names == ["1"]
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(8, 8)))
    with pytest.raises(dk.TargetError, match="cannot adapt"):
        dk.apply_adapters(model, dk.AdapterConfig(rank=2, targets=["0"]))


def test_failed_unmerge_changes_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    dk.apply_adapters(model, dk.AdapterConfig(rank=2))
    dk.merge_adapters(model)
    with torch.no_grad():
        model[1].magnitude[0] = 0.0
    before = [layer.base_layer.weight.clone() for _, layer in dk.adapter_layers(model)]
    with pytest.raises(RuntimeError, match="zero magnitude"):
        dk.unmerge_adapters(model)
    assert all(layer.merged for _, layer in dk.adapter_layers(model))
    for w, (_, layer) in zip(before, dk.adapter_layers(model)):
        assert torch.equal(w, layer.base_layer.weight)


def test_adapters_disabled_warns_about_parameters_trained_in_place() -> None:
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    dk.apply_adapters(model, dk.AdapterConfig(rank=2, targets=["0"], bias="all"))
    with pytest.warns(UserWarning, match="bias"):
        with dk.adapters_disabled(model):
            pass
    clean = nn.Sequential(nn.Linear(6, 6))
    dk.apply_adapters(clean, dk.AdapterConfig(rank=2, targets=["0"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with dk.adapters_disabled(clean):
            pass
