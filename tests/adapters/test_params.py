"""Which parameters train and how many: counts in PEFT's format (and equal to PEFT's own counts),
the adapter state dict / parameter names, and a short training run that must lower the loss."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import pytest
import torch
from torch import nn

import dorakit as dk

SUMMARY = re.compile(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}")


def test_count_parameters_and_summary_on_a_hand_counted_model() -> None:
    model = nn.Sequential(nn.Linear(1000, 3), nn.Linear(3, 2))  # 3003 + 8 parameters
    model[0].weight.requires_grad_(False)                       # 3000 frozen
    assert dk.count_parameters(model) == (11, 3011)
    assert dk.trainable_summary(model) == "trainable params: 11 || all params: 3,011 || trainable%: 0.3653"
    model[0].weight.requires_grad_(True)
    assert dk.trainable_summary(model) == ("trainable params: 3,011 || all params: 3,011 || "
                                           "trainable%: 100.0000")


def test_summary_of_a_model_without_parameters() -> None:
    assert dk.count_parameters(nn.ReLU()) == (0, 0)
    assert dk.trainable_summary(nn.ReLU()) == "trainable params: 0 || all params: 0 || trainable%: 0.0000"


def test_shared_parameters_count_once(gpt2) -> None:
    model = gpt2.model
    assert model.lm_head.weight is model.transformer.wte.weight
    unique = {id(p): p.numel() for m in model.modules() for p in m.parameters(recurse=False)}
    assert dk.count_parameters(model)[1] == sum(unique.values())
    with_duplicates = sum(p.numel() for m in model.modules() for p in m._parameters.values() if p is not None)
    assert dk.count_parameters(model)[1] < with_duplicates


def test_counts_after_injection_are_the_adapter_sizes(llama) -> None:
    total = sum(p.numel() for p in llama.model.parameters())
    cfg = dk.AdapterConfig(targets=["q_proj", "k_proj"], magnitude_only=["o_proj"], rank=4)
    dk.apply_adapters(llama.model, cfg)
    # q_proj (32, 32), k_proj (16, 32), o_proj (32, 32) per layer; DoRA: r·(in + out) + out; magnitude: out.
    per_layer = (4 * (32 + 32) + 32) + (4 * (32 + 16) + 16) + 32
    assert dk.count_parameters(llama.model) == (2 * per_layer, total + 2 * per_layer)


PEFT_CASES = [
    # (dorakit kwargs, peft LoraConfig kwargs, tiny LLaMA overrides)
    ({"method": "lora", "targets": ["q_proj", "v_proj"], "rank": 4},
     {"r": 4, "target_modules": ["q_proj", "v_proj"]}, {}),
    ({"method": "dora", "targets": ["q_proj", "v_proj"], "rank": 4},
     {"r": 4, "target_modules": ["q_proj", "v_proj"], "use_dora": True}, {}),
    ({"method": "dora", "targets": "all-linear", "rank": 2},
     {"r": 2, "target_modules": "all-linear", "use_dora": True}, {}),
    ({"method": "lora", "targets": "all-linear", "rank": 8},
     {"r": 8, "target_modules": "all-linear"}, {"tie": True}),
    ({"method": "dora", "targets": ["q_proj", "v_proj", "down_proj"], "rank": 4,
      "rank_pattern": {"v_proj": 2, "layers.1.mlp.down_proj": 8}},
     {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], "use_dora": True,
      "rank_pattern": {"v_proj": 2, "layers.1.mlp.down_proj": 8}}, {}),
    ({"method": "dora", "targets": ["q_proj", "v_proj"], "rank": 4, "bias": "lora_only"},
     {"r": 4, "target_modules": ["q_proj", "v_proj"], "use_dora": True, "bias": "lora_only"}, {"bias": True}),
    ({"method": "lora", "targets": ["o_proj"], "rank": 4, "bias": "all"},
     {"r": 4, "target_modules": ["o_proj"], "bias": "all"}, {"bias": True}),
]


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize(("ours", "theirs", "overrides"), PEFT_CASES)
def test_counts_and_summary_equal_peft(make_tiny: Callable, capsys: pytest.CaptureFixture[str], ours: dict,
                                       theirs: dict, overrides: dict) -> None:
    import peft

    tiny = make_tiny("llama", **overrides)
    twin = copy.deepcopy(tiny.model)
    dk.apply_adapters(tiny.model, dk.AdapterConfig(**ours))
    peft_model = peft.get_peft_model(twin, peft.LoraConfig(**theirs))
    assert dk.count_parameters(tiny.model) == peft_model.get_nb_trainable_parameters()
    peft_model.print_trainable_parameters()
    printed = capsys.readouterr().out.strip()
    assert dk.trainable_summary(tiny.model) == printed
    assert SUMMARY.fullmatch(printed)


def test_adapter_state_dict_and_parameters_keys(llama) -> None:
    cfg = dk.AdapterConfig(targets=["q_proj"], magnitude_only=["o_proj"], rank=4, bias="lora_only")
    dk.apply_adapters(llama.model, cfg)
    expected = []
    for i in range(2):
        q, o = f"model.layers.{i}.self_attn.q_proj", f"model.layers.{i}.self_attn.o_proj"
        expected += [f"{q}.lora_A", f"{q}.lora_B", f"{q}.magnitude", f"{o}.magnitude"]
    params = dk.adapter_parameters(llama.model)
    state = dk.adapter_state_dict(llama.model)
    assert list(params) == expected and list(state) == expected
    for name, param in params.items():
        module_name, _, tensor_name = name.rpartition(".")
        assert param is getattr(llama.model.get_submodule(module_name), tensor_name)
        assert isinstance(param, nn.Parameter) and param.requires_grad
        assert not state[name].requires_grad and torch.equal(state[name], param)
    assert params["model.layers.0.self_attn.q_proj.lora_A"].shape == (4, 32)
    assert params["model.layers.0.self_attn.q_proj.lora_B"].shape == (32, 4)
    assert params["model.layers.0.self_attn.o_proj.magnitude"].shape == (32,)


def test_adapter_state_dict_lora_has_no_magnitude(llama) -> None:
    dk.apply_adapters(llama.model, dk.AdapterConfig(method="lora", targets=["v_proj"], rank=2))
    assert list(dk.adapter_state_dict(llama.model)) == [
        f"model.layers.{i}.self_attn.v_proj.{t}" for i in range(2) for t in ("lora_A", "lora_B")]


def test_adapter_parameters_are_exactly_the_trainable_ones(whisper) -> None:
    dk.apply_adapters(whisper.model, dk.AdapterConfig(targets="all-linear", rank=2))
    trainable = {id(p) for p in whisper.model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in dk.adapter_parameters(whisper.model).values()}


def test_a_few_adamw_steps_of_dora_reduce_the_loss(make_tiny: Callable) -> None:
    tiny = make_tiny("llama")
    model = tiny.model
    cfg = dk.AdapterConfig(method="dora", targets="all-linear", rank=4, alpha=8)
    dk.apply_adapters(model, cfg)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in dk.adapter_parameters(model).items()}
    # Every parameter goes to the optimizer: a base weight that moved would mean it was not frozen.
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    ids = tiny.inputs["input_ids"]
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.2, losses
    for name, param in model.named_parameters():
        if name in base:
            assert param.grad is None, name
            assert torch.equal(param, base[name]), name
    for name, param in dk.adapter_parameters(model).items():
        assert not torch.equal(param, start[name]), f"{name} did not move"
