"""Adapters on disk (io.py, loading.py, peft_format.py): PEFT's format, both ways, with the same logits.

Every round trip perturbs every trainable tensor away from its init (A and B get N(0, 0.1²) noise, the
magnitude is scaled by U(0.5, 1.5) per entry, trained biases and modules_to_save get noise too) and
asserts that the adapter moves the logits, so a load that silently did nothing cannot pass. Bound: the
issue's float32 max |a - b| <= 1e-5. Bad files, atomic writes and .bin conversion: test_io_errors.py.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

import dorakit as dk

transformers = pytest.importorskip("transformers")


def _peft() -> ModuleType:
    """peft, imported on first use (the test skips if it is missing). Not at module level: importing peft
    imports triton, which must not happen during collection, before tests/test_kernels.py sets
    TRITON_INTERPRET=1 on machines without CUDA."""
    return pytest.importorskip("peft")


ATOL = 1e-5                # the float32 bound
MOVED = 1e-3               # the perturbed adapter must move the logits by more than this
LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
Run = Callable[[nn.Module], Tensor]


# ---- models --------------------------------------------------------------------------------------
class ConvEmbedNet(nn.Module):
    """Token ids (B, 16) -> nn.Embedding (B, 16, 12) -> a 12-channel 4x4 image -> nn.Conv2d -> head (B, 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 12)
        self.conv = nn.Conv2d(12, 8, 3, padding=1)
        self.head = nn.Linear(8 * 16, 5)

    def forward(self, input_ids: Tensor) -> Tensor:
        h = self.emb(input_ids).transpose(1, 2).reshape(-1, 12, 4, 4)  # (B, C, H, W)
        return self.head(torch.tanh(self.conv(h)).flatten(1))


def _runner(inputs: dict[str, Tensor], field: str | None = "logits") -> Run:
    def run(model: nn.Module) -> Tensor:
        with torch.no_grad():
            out = model(**inputs)
        return out if field is None else getattr(out, field)
    return run


def _conv_embed() -> tuple[nn.Module, Run]:
    torch.manual_seed(0)
    ids = torch.randint(0, 40, (3, 16), generator=torch.Generator().manual_seed(1))
    return ConvEmbedNet().eval(), _runner({"input_ids": ids}, field=None)


def _minilm_classifier(path: Path) -> tuple[nn.Module, Run]:
    """The real pretrained all-MiniLM-L6-v2 encoder under a fresh 3-way classifier head, fp32."""
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification.from_pretrained(path, num_labels=3, dtype=torch.float32)
    ids = torch.randint(1000, 30000, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return model.eval(), _runner({"input_ids": ids, "attention_mask": mask})


# ---- helpers -------------------------------------------------------------------------------------
def _perturb(model: nn.Module, seed: int = 0) -> None:
    """Move every trainable tensor (dorakit's or PEFT's) away from its initial value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if "magnitude" in name:
                p.mul_(torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5)
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    assert any(p.requires_grad for p in model.parameters())


def _close(actual: Tensor, expected: Tensor, what: str) -> float:
    assert actual.dtype == expected.dtype == torch.float32 and actual.shape == expected.shape, what
    diff = (actual - expected).abs().max().item()
    assert diff <= ATOL, f"{what}: max |diff| = {diff:.3e} > {ATOL:g}"
    return diff


def _moved(adapted: Tensor, base: Tensor) -> None:
    assert (adapted - base).abs().max() > MOVED, "the perturbed adapter does not change the logits"


def _dk_to_peft(base: nn.Module, run: Run, cfg: dk.AdapterConfig, directory: Path) -> nn.Module:
    """Apply, perturb and save with dorakit; PEFT and a fresh dorakit model both load it: same logits."""
    model = copy.deepcopy(base)
    dk.apply_adapters(model, cfg)
    _perturb(model)
    expected = run(model)
    _moved(expected, run(base))
    dk.save_adapter(model, directory)
    peft_model = _peft().PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
    _close(run(peft_model), expected, "PEFT loading dorakit's file")
    fresh = copy.deepcopy(base)
    assert dk.load_adapter(fresh, directory) is not None
    _close(run(fresh), expected, "dorakit reloading its file")
    return model


def _peft_to_dk(base: nn.Module, run: Run, peft_cfg: object, directory: Path) -> nn.Module:
    """Perturb and save with PEFT; dorakit loads it (same logits) and re-saves it for PEFT (same logits)."""
    peft_model = _peft().get_peft_model(copy.deepcopy(base), peft_cfg)
    _perturb(peft_model)
    peft_model.eval()
    expected = run(peft_model)
    _moved(expected, run(base))
    peft_model.save_pretrained(directory)
    model = copy.deepcopy(base)
    dk.load_adapter(model, directory)
    _close(run(model), expected, "dorakit loading PEFT's file")
    dk.save_adapter(model, directory / "resaved")
    again = _peft().PeftModel.from_pretrained(copy.deepcopy(base), directory / "resaved").eval()
    _close(run(again), expected, "PEFT loading dorakit's re-save")
    return model


def _file(directory: Path) -> tuple[dict[str, object], dict[str, Tensor]]:
    return json.loads((directory / "adapter_config.json").read_text()), load_file(directory / "adapter_model.safetensors")


# ---- round trips: LLaMA ----------------------------------------------------------------------------
OPTIONS = {
    "plain": ({}, {}),
    "rslora+patterns": ({"use_rslora": True, "rank_pattern": {"v_proj": 2, "down_proj": 6}, "alpha_pattern": {"o_proj": 3.0}},
                        {"use_rslora": True, "rank_pattern": {"v_proj": 2, "down_proj": 6}, "alpha_pattern": {"o_proj": 3}}),
    "bias=all": ({"bias": "all"}, {"bias": "all"}),
}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_llama_dorakit_to_peft(make_tiny, tmp_path: Path, method: str, option: str) -> None:
    tiny = make_tiny("llama", bias=option == "bias=all")
    cfg = dk.AdapterConfig(method=method, rank=4, alpha=8, targets=LLAMA, **OPTIONS[option][0])
    _dk_to_peft(tiny.model, tiny.run, cfg, tmp_path)
    config, tensors = _file(tmp_path)
    assert config["peft_type"] == "LORA" and config["use_dora"] == (method == "dora")
    assert config["use_rslora"] == (option == "rslora+patterns")
    ranks = {k: v.shape[0] for k, v in tensors.items() if k.endswith("lora_A.weight")}
    if option == "rslora+patterns":
        assert ranks["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"] == 2
        assert ranks["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"] == 6
    assert (sum(k.endswith(".bias") for k in tensors) > 0) == (option == "bias=all")


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_llama_peft_to_dorakit(make_tiny, tmp_path: Path, method: str, option: str) -> None:
    tiny = make_tiny("llama", bias=option == "bias=all")
    peft_cfg = _peft().LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA, use_dora=method == "dora",
                               **OPTIONS[option][1])
    model = _peft_to_dk(tiny.model, tiny.run, peft_cfg, tmp_path)
    layers = dict(dk.adapter_layers(model))
    assert len(layers) == 14 and {layer.variant for layer in layers.values()} == {method}
    if option == "rslora+patterns":
        v, o = layers["model.layers.0.self_attn.v_proj"], layers["model.layers.0.self_attn.o_proj"]
        assert (v.rank, v.alpha, o.rank, o.alpha, o.use_rslora) == (2, 8.0, 4, 3.0, True)


def test_file_keys_and_shapes_equal_peft_own_save(make_tiny, tmp_path: Path) -> None:
    """Same adapter, saved by PEFT and by dorakit: the same tensor names and shapes, and PEFT's config fields."""
    tiny = make_tiny("llama")
    options = {"r": 4, "lora_alpha": 8, "use_dora": True, "rank_pattern": {"v_proj": 2}, "bias": "lora_only"}
    _peft().get_peft_model(copy.deepcopy(tiny.model), _peft().LoraConfig(target_modules=LLAMA, **options)) \
        .save_pretrained(tmp_path / "peft")
    model = copy.deepcopy(tiny.model)
    dk.apply_adapters(model, dk.AdapterConfig(method="dora", rank=4, alpha=8, targets=LLAMA, bias="lora_only",
                                              rank_pattern={"v_proj": 2}))
    dk.save_adapter(model, tmp_path / "dk", task_type="CAUSAL_LM")
    (peft_config, peft_tensors), (dk_config, dk_tensors) = _file(tmp_path / "peft"), _file(tmp_path / "dk")
    assert {k: tuple(v.shape) for k, v in dk_tensors.items()} == {k: tuple(v.shape) for k, v in peft_tensors.items()}
    assert set(dk_config) <= set(peft_config)
    for key in ("peft_type", "r", "lora_alpha", "use_dora", "use_rslora", "bias", "fan_in_fan_out"):
        assert dk_config[key] == peft_config[key], key
    assert dk_config["task_type"] == "CAUSAL_LM"
    loaded = _peft().LoraConfig.from_pretrained(tmp_path / "dk")
    assert loaded.r == 4 and loaded.use_dora and loaded.rank_pattern


# ---- round trips: the real MiniLM with a classifier head (bias, modules_to_save) --------------------------
@pytest.mark.parametrize("bias", ["lora_only", "all"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_minilm_dorakit_to_peft(minilm_path: Path, tmp_path: Path, method: str, bias: str) -> None:
    base, run = _minilm_classifier(minilm_path)
    cfg = dk.AdapterConfig(method=method, rank=4, alpha=8, targets=["query", "value"], bias=bias,
                           modules_to_save=["classifier"])
    model = _dk_to_peft(base, run, cfg, tmp_path)
    config, tensors = _file(tmp_path)
    assert config["modules_to_save"] == ["classifier"]
    assert torch.equal(tensors["base_model.model.classifier.weight"], model.classifier.weight)
    peft_model = _peft().PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    head = peft_model.base_model.model.classifier
    assert type(head).__name__ == "ModulesToSaveWrapper"          # PEFT really treats it as modules_to_save
    assert torch.equal(head.modules_to_save["default"].weight, model.classifier.weight)
    assert not torch.equal(model.classifier.weight, base.classifier.weight)


@pytest.mark.parametrize("bias", ["lora_only", "all"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_minilm_peft_to_dorakit(minilm_path: Path, tmp_path: Path, method: str, bias: str) -> None:
    base, run = _minilm_classifier(minilm_path)
    peft_cfg = _peft().LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], use_dora=method == "dora",
                               bias=bias, modules_to_save=["classifier"])
    model = _peft_to_dk(base, run, peft_cfg, tmp_path)
    _, tensors = _file(tmp_path)
    # PEFT's quirk with bias="all": the head's bias is also written under its wrapper's inner names.
    quirky = {"base_model.model.classifier.original_module.bias", "base_model.model.classifier.modules_to_save.bias"}
    assert quirky <= set(tensors) if bias == "all" else not quirky & set(tensors)
    assert torch.equal(model.classifier.bias, tensors["base_model.model.classifier.bias"])
    assert model.classifier.weight.requires_grad and not model.bert.encoder.layer[0].output.dense.weight.requires_grad


# ---- round trips: Conv2d + Embedding, GPT-2 Conv1D -------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_conv2d_and_embedding_both_ways(tmp_path: Path, method: str) -> None:
    base, run = _conv_embed()
    cfg = dk.AdapterConfig(method=method, rank=3, alpha=5, targets=["emb", "conv"])
    _dk_to_peft(base, run, cfg, tmp_path / "dk")
    _, tensors = _file(tmp_path / "dk")
    prefix = "base_model.model."
    assert tensors[prefix + "emb.lora_embedding_A"].shape == (3, 40)
    assert tensors[prefix + "emb.lora_embedding_B"].shape == (12, 3)
    assert tensors[prefix + "conv.lora_A.weight"].shape == (3, 12, 3, 3)
    assert tensors[prefix + "conv.lora_B.weight"].shape == (8, 3, 1, 1)
    if method == "dora":
        assert tensors[prefix + "conv.lora_magnitude_vector"].shape == (1, 8, 1, 1)
        assert tensors[prefix + "emb.lora_magnitude_vector"].shape == (12,)
    peft_cfg = _peft().LoraConfig(r=3, lora_alpha=5, target_modules=["emb", "conv"], use_dora=method == "dora")
    _peft_to_dk(base, run, peft_cfg, tmp_path / "peft")


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_gpt2_conv1d_both_ways(make_tiny, tmp_path: Path, method: str) -> None:
    tiny = make_tiny("gpt2")
    targets = ["c_attn", "c_proj", "c_fc"]
    _dk_to_peft(tiny.model, tiny.run, dk.AdapterConfig(method=method, rank=4, alpha=8, targets=targets), tmp_path / "dk")
    assert _file(tmp_path / "dk")[0]["fan_in_fan_out"] is True
    peft_cfg = _peft().LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=method == "dora",
                               fan_in_fan_out=True)
    model = _peft_to_dk(tiny.model, tiny.run, peft_cfg, tmp_path / "peft")
    assert all(isinstance(layer, dk.Conv1DAdapter) for _, layer in dk.adapter_layers(model))


# ---- magnitude-only modules ----------------------------------------------------------------------------
def test_magnitude_only_is_saved_as_rank1_dora_and_restored(make_tiny, tmp_path: Path) -> None:
    tiny = make_tiny("llama")
    cfg = dk.AdapterConfig(method="dora", rank=4, alpha=8, targets=["q_proj", "v_proj"], magnitude_only=["o_proj"])
    _dk_to_peft(tiny.model, tiny.run, cfg, tmp_path)
    config, tensors = _file(tmp_path)
    o_proj = "model.layers.0.self_attn.o_proj"
    assert config["use_dora"] is True and config["rank_pattern"][o_proj] == 1
    assert tensors[f"base_model.model.{o_proj}.lora_A.weight"].shape == (1, 32)
    assert not tensors[f"base_model.model.{o_proj}.lora_B.weight"].any()
    fresh = copy.deepcopy(tiny.model)
    dk.load_adapter(fresh, tmp_path)
    layer = fresh.get_submodule(o_proj)
    assert layer.variant == "magnitude" and layer.lora_A is None and layer.magnitude.requires_grad
    assert torch.equal(layer.magnitude, tensors[f"base_model.model.{o_proj}.lora_magnitude_vector"])


def test_lora_with_magnitude_only_refuses_to_save(make_tiny, tmp_path: Path) -> None:
    model = make_tiny("llama").model
    dk.apply_adapters(model, dk.AdapterConfig(method="lora", targets=["q_proj"], magnitude_only=["o_proj"]))
    with pytest.raises(dk.AdapterFileError, match="magnitude_only.*method='dora'"):
        dk.save_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- transformers' load_adapter --------------------------------------------------------------------------
def _transformers_load(make_tiny, tmp_path: Path, method: str) -> None:
    tiny = make_tiny("llama")
    model = _dk_to_peft(tiny.model, tiny.run, dk.AdapterConfig(method=method, rank=4, alpha=8, targets=LLAMA), tmp_path)
    hf = copy.deepcopy(tiny.model)
    hf.load_adapter(str(tmp_path))                               # a local directory: no hub access
    _close(tiny.run(hf), tiny.run(model), "transformers' load_adapter")


def test_transformers_load_adapter_lora(make_tiny, tmp_path: Path) -> None:
    _transformers_load(make_tiny, tmp_path, "lora")


@pytest.mark.xfail(strict=True, reason="transformers 5.x load_adapter drops every `lora_magnitude_vector` key, "
                   "PEFT's own DoRA files included (it expects `...lora_magnitude_vector.default.weight`)")
def test_transformers_load_adapter_dora(make_tiny, tmp_path: Path) -> None:
    _transformers_load(make_tiny, tmp_path, "dora")


# ---- onto matching adapters, merged export, training, bf16 ---------------------------------------------------
def test_load_onto_matching_adapters_overwrites_their_tensors(make_tiny, tmp_path: Path) -> None:
    tiny = make_tiny("llama")
    cfg = dk.AdapterConfig(method="dora", rank=4, alpha=8, targets=LLAMA, magnitude_only=["embed_tokens"],
                           rank_pattern={"v_proj": 2})
    saved = _dk_to_peft(tiny.model, tiny.run, cfg, tmp_path)
    target = copy.deepcopy(tiny.model)
    dk.apply_adapters(target, cfg)                               # same layout, fresh (identity) tensors
    _moved(tiny.run(saved), tiny.run(target))
    adapters_before = {n: id(layer) for n, layer in dk.adapter_layers(target)}
    assert dk.load_adapter(target, tmp_path) is None
    assert {n: id(layer) for n, layer in dk.adapter_layers(target)} == adapters_before  # filled in place
    _close(tiny.run(target), tiny.run(saved), "loaded onto matching adapters")


def test_merged_export_loads_with_auto_model(make_tiny, tmp_path: Path) -> None:
    tiny = make_tiny("llama")
    model = copy.deepcopy(tiny.model)
    dk.apply_adapters(model, dk.AdapterConfig(method="dora", rank=4, alpha=8, targets=LLAMA,
                                              magnitude_only=["embed_tokens"]))
    _perturb(model)
    expected = tiny.run(model)
    _moved(expected, tiny.run(tiny.model))
    dk.merge_and_unload(model).save_pretrained(tmp_path)
    assert not list(tmp_path.glob("adapter_*"))
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert not list(dk.adapter_layers(plain)) and type(plain) is type(tiny.model)
    _close(tiny.run(plain), expected, "merged export reloaded with AutoModelForCausalLM")


def test_trained_adapter_round_trips(make_tiny, tmp_path: Path) -> None:
    tiny = make_tiny("llama")
    model = copy.deepcopy(tiny.model)
    dk.apply_adapters(model, dk.AdapterConfig(method="dora", rank=4, alpha=8, targets=LLAMA, dropout=0.1))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(**tiny.inputs, labels=tiny.inputs["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    expected = tiny.run(model)
    _moved(expected, tiny.run(tiny.model))
    dk.save_adapter(model, tmp_path)
    assert _file(tmp_path)[0]["lora_dropout"] == 0.1
    peft_model = _peft().PeftModel.from_pretrained(copy.deepcopy(tiny.model), tmp_path).eval()
    _close(tiny.run(peft_model), expected, "PEFT loading a trained adapter")
    fresh = copy.deepcopy(tiny.model)
    dk.load_adapter(fresh, tmp_path)
    _close(tiny.run(fresh.eval()), expected, "dorakit loading a trained adapter")


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_bf16_base_with_fp32_adapters_loads_in_peft(make_tiny, tmp_path: Path, method: str) -> None:
    tiny = make_tiny("llama")
    base = tiny.model.to(torch.bfloat16)
    model = copy.deepcopy(base)
    dk.apply_adapters(model, dk.AdapterConfig(method=method, rank=4, alpha=8, targets=["q_proj", "v_proj"]))
    _perturb(model)
    dk.save_adapter(model, tmp_path)
    _, tensors = _file(tmp_path)
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    peft_model = _peft().PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    peft_params = dict(peft_model.named_parameters())
    for key, tensor in tensors.items():                          # PEFT holds exactly the saved fp32 tensors
        name = key.replace(".weight", ".default.weight") if "lora_magnitude" not in key else key + ".default.weight"
        assert torch.equal(peft_params[name], tensor), key
    got = tiny.run(peft_model)
    assert got.dtype == torch.bfloat16
    _moved(got.float(), tiny.run(base).float())
    # bf16 outputs differ by bf16 rounding (different op order); in fp32 the two models are the same function.
    _close(tiny.run(peft_model.float()), tiny.run(model.float()), "PEFT's load of a bf16-base adapter, in fp32")
