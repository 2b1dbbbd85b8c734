"""Named adapters on disk (multi_io.py): PEFT's layout both ways, same logits per adapter; hot-swap in place."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import dorakit as dk

transformers = pytest.importorskip("transformers")

ATOL = 1e-5        # float32 logits, as tests/formats/test_io.py
MOVED = 1e-3


def _perturb_every_adapter(model: nn.Module, seed: int = 0) -> None:
    """Move every adapter tensor (dorakit's or PEFT's, active or not) away from its init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "magnitude" in name:
                p.mul_(torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5)
            elif "lora_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _close(a: Tensor, b: Tensor, what: str) -> None:
    diff = (a - b).abs().max().item()
    assert diff <= ATOL, f"{what}: max |diff| = {diff:.3e}"


def _dk_model(base: nn.Module) -> nn.Module:
    model = copy.deepcopy(base)
    dk.apply_adapters(model, dk.AdapterConfig(method="dora", rank=4, alpha=8, targets=["q_proj", "v_proj"]))
    dk.add_adapter(model, dk.AdapterConfig(method="lora", rank=2, alpha=4, targets=["q_proj", "up_proj"]), name="math")
    dk.add_adapter(model, dk.AdapterConfig(method="dora", rank=3, alpha=3, use_rslora=True,
                                           targets=["k_proj", "down_proj"]), name="code")
    _perturb_every_adapter(model)
    return model


def test_dorakit_writes_peft_layout_and_peft_reads_it(llama, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    base, ids = llama.model, llama.inputs["input_ids"]
    model = _dk_model(base)
    expected = {}
    for name in dk.list_adapters(model):
        dk.set_adapter(model, name)
        expected[name] = _logits(model, ids)
        assert (expected[name] - _logits(base, ids)).abs().max() > MOVED, name
    dk.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    assert json.loads((tmp_path / "math" / "adapter_config.json").read_text())["use_dora"] is False
    assert (tmp_path / "code" / "adapter_model.safetensors").is_file() and not (tmp_path / "default").exists()
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    for name in ("math", "code"):
        peft_model.load_adapter(tmp_path / name, adapter_name=name)
    for name in expected:
        peft_model.set_adapter(name)
        _close(_logits(peft_model, ids), expected[name], f"PEFT, adapter {name!r}")
    dk.save_adapter(model, tmp_path / "one", name="code")          # one adapter: its sub-folder only
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["code"]


def test_peft_multi_adapter_dir_loads_into_dorakit(llama, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    base, ids = llama.model, llama.inputs["input_ids"]
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
    peft_model.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["o_proj", "q_proj"]))
    _perturb_every_adapter(peft_model)
    peft_model.eval()
    expected = {}
    for name in ("default", "b"):
        peft_model.set_adapter(name)
        expected[name] = _logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    dk.load_adapter(model, tmp_path)
    dk.load_adapter(model, tmp_path / "b", name="b")
    assert dk.list_adapters(model) == ["default", "b"]
    for name in expected:
        dk.set_adapter(model, name)
        _close(_logits(model, ids), expected[name], f"dorakit, adapter {name!r}")
    with dk.adapter_routing(model, ["b", "default"]):
        mixed = _logits(model, ids)
    _close(mixed[0], expected["b"][0], "routed row 0")
    _close(mixed[1], expected["default"][1], "routed row 1")


def test_generate_with_mixed_adapters_equals_each_alone(llama) -> None:
    base = llama.model
    model = _dk_model(base)
    prompt = llama.inputs["input_ids"][:1, :4].repeat(4, 1)
    rows = ["code", None, "default", "math"]
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad(), dk.adapter_routing(model, rows):
        mixed = model.generate(prompt, **kw)
    for i, name in enumerate(rows):
        with torch.no_grad():
            if name is None:
                alone = base.generate(prompt[i:i + 1], **kw)
            else:
                dk.set_adapter(model, name)
                alone = model.generate(prompt[i:i + 1], **kw)
        assert torch.equal(mixed[i], alone[0]), (name, mixed[i], alone[0])


def test_named_load_refuses_what_it_cannot_hold(llama, tmp_path: Path) -> None:
    base = llama.model
    trained = copy.deepcopy(base)
    dk.apply_adapters(trained, dk.AdapterConfig(targets=["q_proj"], bias="all"))
    dk.save_adapter(trained, tmp_path)
    model = _dk_model(base)
    with pytest.raises(dk.AdapterFileError, match="modules_to_save / biases"):
        dk.load_adapter(model, tmp_path, name="x")
    assert dk.list_adapters(model) == ["default", "math", "code"]


def _hot_swap_model(base: nn.Module, rank: int) -> nn.Module:
    model = copy.deepcopy(base)
    dk.apply_adapters(model, dk.AdapterConfig(method="dora", rank=rank, alpha=2 * rank, targets=["q_proj", "v_proj"]))
    return model


@pytest.mark.parametrize("rank", [4, 2])
def test_hot_swap_pads_rank_and_equals_the_new_adapter(llama, tmp_path: Path, rank: int) -> None:
    base, ids = llama.model, llama.inputs["input_ids"]
    new = _hot_swap_model(base, rank)                       # the adapter to swap in (rank 4, or 2 padded to 4)
    _perturb_every_adapter(new, seed=1)
    dk.save_adapter(new, tmp_path)
    model = _hot_swap_model(base, 4)
    _perturb_every_adapter(model, seed=2)
    params = {k: p for k, p in model.named_parameters()}
    dk.hot_swap_adapter(model, tmp_path)
    assert all(p is params[k] for k, p in model.named_parameters())      # in place: the same Parameter objects
    _close(_logits(model, ids), _logits(new, ids), "after hot-swap")
    if rank == 2:   # the padded norm ||W0 + s·B_pad·A_pad||_c is the file adapter's own
        for name, layer in dk.adapter_layers(model):
            torch.testing.assert_close(layer._norm(grad=False), new.get_submodule(name)._norm(grad=False))
    with pytest.raises(dk.AdapterFileError, match="pads up to the model's rank, never down"):
        dk.hot_swap_adapter(_hot_swap_model(base, 1), tmp_path)


def test_hot_swap_inside_a_compiled_model_does_not_recompile(llama, tmp_path: Path) -> None:
    from torch._dynamo.testing import CompileCounter

    base, ids = llama.model, llama.inputs["input_ids"]
    files = []
    for seed in (1, 2):
        other = _hot_swap_model(base, 4)
        _perturb_every_adapter(other, seed=seed)
        dk.save_adapter(other, tmp_path / str(seed))
        files.append((tmp_path / str(seed), _logits(other, ids)))
    model = _hot_swap_model(base, 4)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    _logits(compiled, ids)
    frames = counter.frame_count
    assert frames >= 1, "torch.compile traced nothing"
    for directory, want in files:
        dk.hot_swap_adapter(model, directory)
        _close(_logits(compiled, ids), want, f"compiled model after swapping in {directory.name}")
    assert counter.frame_count == frames, "hot-swap recompiled"
    torch._dynamo.reset()
