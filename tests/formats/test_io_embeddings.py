"""PEFT files that carry the base's embedding weights (save_embedding_layers), both ways, with real PEFT.

PEFT's save_pretrained (default save_embedding_layers="auto") writes the full base weight of the input
and output embeddings when ``embed_tokens`` / ``lm_head`` is targeted (``<e>.base_layer.weight``) or when
the vocabulary was resized (``<e>.weight``); its loader copies them over the base's weights. Each round
trip below loads onto a base whose embeddings were scrambled, so the logits agree only if the file's
weights were really copied in; each save is compared key for key with PEFT's own file of the same model.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import dorakit as dk

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ATOL = 1e-5
VOCAB, RESIZED = 64, 70
TARGETS = ["embed_tokens", "lm_head", "q_proj", "v_proj"]
IDS = torch.randint(0, RESIZED, (2, 7), generator=torch.Generator().manual_seed(1))
WEIGHTS = "adapter_model.safetensors"


def _llama(tie: bool = False) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def _resized(base: nn.Module, scramble: bool = False) -> nn.Module:
    """A copy of ``base`` with RESIZED tokens (new rows random), its embeddings scrambled if asked."""
    model = copy.deepcopy(base)
    model.resize_token_embeddings(RESIZED, mean_resizing=False)
    if scramble:
        _scramble(model)
    return model


def _scramble(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            weight = getattr(emb, "base_layer", emb).weight
            weight.copy_(torch.randn(weight.shape, generator=gen))


def _logits(model: nn.Module) -> Tensor:
    with torch.no_grad():
        return model(input_ids=IDS % model.config.vocab_size).logits


def _perturb(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "magnitude" in name:
                p.mul_(torch.rand(p.shape, generator=gen) + 0.5) if "magnitude" in name else \
                    p.add_(0.2 * torch.randn(p.shape, generator=gen))


def _peft_model(base: nn.Module, method: str, targets: list[str]) -> nn.Module:
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=method == "dora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), cfg)
    _perturb(model)
    return model


def _peft_save(model: nn.Module, directory: Path, **kwargs: object) -> set[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(directory, **kwargs)
    return set(load_file(directory / WEIGHTS))


def _dk_model(base: nn.Module, method: str, targets: list[str]) -> nn.Module:
    model = copy.deepcopy(base)
    dk.apply_adapters(model, dk.AdapterConfig(method=method, rank=4, alpha=8, targets=targets))
    _perturb(model)
    return model


def _assert_close(actual: Tensor, expected: Tensor, what: str) -> None:
    diff = (actual - expected).abs().max().item()
    assert diff <= ATOL, f"{what}: max diff {diff:.3e}"


def _embedding_keys(keys: set[str]) -> set[str]:
    return {k for k in keys if "lora_" not in k}


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_file_with_resized_embeddings_loads_with_same_logits(tmp_path: Path, method: str) -> None:
    base = _llama()
    peft_model = _peft_model(_resized(base), method, TARGETS)
    keys = _peft_save(peft_model, tmp_path)
    assert _embedding_keys(keys) == {"base_model.model.model.embed_tokens.base_layer.weight",
                                     "base_model.model.lm_head.base_layer.weight"}
    expected = _logits(peft_model)
    model = _resized(base, scramble=True)
    assert (_logits(model) - expected).abs().max() > 1e-2      # the scrambled base is far off
    dk.load_adapter(model, tmp_path)
    _assert_close(_logits(model), expected, "dorakit after loading PEFT's file")
    dk.load_adapter(model, tmp_path)                              # onto matching adapters: same again
    _assert_close(_logits(model), expected, "dorakit after loading PEFT's file twice")


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_dorakit_file_with_resized_embeddings_loads_in_peft(tmp_path: Path, method: str) -> None:
    base = _llama()
    model = _dk_model(_resized(base), method, TARGETS)
    dk.save_adapter(model, tmp_path / "dk")
    peft_keys = _peft_save(_peft_model(_resized(base), method, TARGETS), tmp_path / "peft")
    assert set(load_file(tmp_path / "dk" / WEIGHTS)) == peft_keys
    loaded = peft.PeftModel.from_pretrained(_resized(base, scramble=True), tmp_path / "dk").eval()
    _assert_close(_logits(loaded), _logits(model), "PEFT after loading dorakit's file")


def test_vocab_resize_without_embedding_targets_follows_peft_auto_rule(tmp_path: Path) -> None:
    """No embedding targeted: PEFT's "auto" writes <e>.weight when config.vocab_size differs from the base's
    config.json; dorakit writes the same keys and loads PEFT's file onto a scrambled base."""
    _llama().save_pretrained(tmp_path / "base")
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    peft_model = _peft_model(_resized(base), "dora", ["q_proj"])
    keys = _peft_save(peft_model, tmp_path / "peft")
    assert _embedding_keys(keys) == {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"}
    dk_model = _dk_model(_resized(base), "dora", ["q_proj"])
    dk.save_adapter(dk_model, tmp_path / "dk")                    # base_model_name_or_path: config._name_or_path
    assert set(load_file(tmp_path / "dk" / WEIGHTS)) == keys
    model = _resized(base, scramble=True)
    dk.load_adapter(model, tmp_path / "peft")
    _assert_close(_logits(model), _logits(peft_model), "dorakit after loading PEFT's resized file")
    not_resized = _dk_model(base, "dora", ["q_proj"])             # same vocabulary: nothing extra
    dk.save_adapter(not_resized, tmp_path / "same")
    assert not _embedding_keys(set(load_file(tmp_path / "same" / WEIGHTS)))


@pytest.mark.parametrize("choice", [True, False])
def test_save_embedding_layers_choice_matches_peft(tmp_path: Path, choice: bool) -> None:
    base = _llama()
    for targets in (TARGETS, ["q_proj"]):
        peft_keys = _peft_save(_peft_model(base, "lora", targets), tmp_path / "p", save_embedding_layers=choice)
        dk.save_adapter(_dk_model(base, "lora", targets), tmp_path / "d", save_embedding_layers=choice)
        assert set(load_file(tmp_path / "d" / WEIGHTS)) == peft_keys, targets
        assert bool(_embedding_keys(peft_keys)) == choice


def test_bad_save_embedding_layers_is_refused(tmp_path: Path) -> None:
    model = _dk_model(_llama(), "lora", ["q_proj"])
    with pytest.raises(ValueError, match="save_embedding_layers"):
        dk.save_adapter(model, tmp_path, save_embedding_layers="yes")  # type: ignore[arg-type]
    plain = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 4))
    dk.apply_adapters(plain, dk.AdapterConfig(method="lora", rank=2, alpha=4, targets=["1"]))
    with pytest.raises(dk.AdapterFileError, match="get_input_embeddings"):
        dk.save_adapter(plain, tmp_path, save_embedding_layers=True)


def _unchanged_after_refusal(model: nn.Module, directory: Path, snapshot: Callable, *fragments: str) -> None:
    before = snapshot(model)
    with pytest.raises(dk.AdapterFileError) as info:
        dk.load_adapter(model, directory)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    after = snapshot(model)
    assert before[0] == after[0] and before[1] == after[1] and before[2].keys() == after[2].keys()
    assert all(torch.equal(v, after[2][k]) for k, v in before[2].items()), "a refused load changed the model"


def test_vocab_mismatch_is_refused_with_the_resize_hint(tmp_path: Path, model_snapshot: Callable) -> None:
    base = _llama()
    _peft_save(_peft_model(_resized(base), "dora", TARGETS), tmp_path)
    _unchanged_after_refusal(copy.deepcopy(base), tmp_path, model_snapshot, "(70, 32)", "(64, 32)",
                             "resize_token_embeddings(70)")
    adapted = _dk_model(base, "dora", TARGETS)                    # existing adapters, unresized base
    _unchanged_after_refusal(adapted, tmp_path, model_snapshot, "resize_token_embeddings(70)")


def test_embedding_weight_of_another_module_is_refused(tmp_path: Path, model_snapshot: Callable) -> None:
    base = _llama()
    _peft_save(_peft_model(base, "lora", TARGETS), tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] = torch.zeros(32, 32)
    save_file(tensors, tmp_path / WEIGHTS, {"format": "pt"})
    _unchanged_after_refusal(copy.deepcopy(base), tmp_path, model_snapshot, "unexpected tensor",
                             "q_proj.base_layer.weight")


def test_differing_copies_of_a_tied_weight_are_refused(tmp_path: Path, model_snapshot: Callable) -> None:
    """A resized-vocabulary file holds embed_tokens.weight and lm_head.weight; a tied model takes them
    only when they are equal (otherwise which one wins would depend on key order)."""
    tied = _llama(tie=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    model = _dk_model(tied, "lora", ["q_proj"])
    dk.save_adapter(model, tmp_path, save_embedding_layers=True)
    tensors = load_file(tmp_path / WEIGHTS)
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= set(tensors)
    fresh = _llama(tie=True)
    _scramble(fresh)
    dk.load_adapter(fresh, tmp_path)
    _assert_close(_logits(fresh), _logits(model), "tied model after loading its own file")
    tensors["base_model.model.lm_head.weight"] = tensors["base_model.model.lm_head.weight"] + 1
    save_file(tensors, tmp_path / WEIGHTS, {"format": "pt"})
    _unchanged_after_refusal(_llama(tie=True), tmp_path, model_snapshot, "ties them")


def test_tied_embedding_target_stays_refused_where_peft_warns(tmp_path: Path, model_snapshot: Callable) -> None:
    """PEFT adapts embed_tokens of a tied model (warning that merging then also changes lm_head);
    dorakit refuses it, on apply and on load, and leaves the model unchanged."""
    tied = _llama(tie=True)
    with pytest.warns(UserWarning, match="tie_word_embeddings"):
        peft_model = peft.get_peft_model(copy.deepcopy(tied), peft.LoraConfig(r=4, lora_alpha=8,
                                                                               target_modules=["embed_tokens"]))
    _peft_save(peft_model, tmp_path)
    with pytest.raises(dk.TargetError, match="tied"):
        dk.apply_adapters(copy.deepcopy(tied), dk.AdapterConfig(method="lora", rank=4, alpha=8,
                                                                targets=["embed_tokens"]))
    _unchanged_after_refusal(copy.deepcopy(tied), tmp_path, model_snapshot, "tied")
