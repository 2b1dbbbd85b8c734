"""Bad adapter files, mismatched models, .bin conversion and atomic saves (io.py, loading.py).

Every refused load asserts three things: dk.AdapterFileError, a message that names the file or the
module (and the shapes, for a shape mismatch), and a model left exactly as it was (module types,
requires_grad flags and every state-dict value, via the model_snapshot fixture).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import dorakit as dk

transformers = pytest.importorskip("transformers")


def _peft() -> ModuleType:
    """peft, imported on first use (the test skips if it is missing). Not at module level: importing peft
    imports triton, which must not happen during collection, before tests/test_kernels.py sets
    TRITON_INTERPRET=1 on machines without CUDA."""
    return pytest.importorskip("peft")


ATOL = 1e-5
LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
Q0 = "model.layers.0.self_attn.q_proj"


def _llama(hidden: int = 32, layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def _logits(model: nn.Module) -> Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _perturbed(base: nn.Module, cfg: dk.AdapterConfig) -> nn.Module:
    model = copy.deepcopy(base)
    dk.apply_adapters(model, cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.mul_(torch.rand(p.shape, generator=gen) + 0.5) if "magnitude" in name else \
                    p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


DORA = dk.AdapterConfig(method="dora", rank=4, alpha=8, targets=LLAMA)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[nn.Module, Path, Tensor]:
    """(plain base LLaMA, a directory with a perturbed dorakit DoRA adapter for it, that adapter's logits)."""
    base = _llama()
    model = _perturbed(base, DORA)
    dk.save_adapter(model, tmp_path / "adapter")
    expected = _logits(model)
    assert (expected - _logits(base)).abs().max() > 1e-3
    return base, tmp_path / "adapter", expected


def _assert_same(before: tuple, after: tuple) -> None:
    assert before[0] == after[0], "module types changed"
    assert before[1] == after[1], "requires_grad flags changed"
    assert before[2].keys() == after[2].keys(), "state dict keys changed"
    for key, value in before[2].items():
        assert torch.equal(value, after[2][key]), f"{key} changed"


def _refused(model: nn.Module, directory: Path, snapshot: Callable, *fragments: str) -> str:
    """load_adapter must raise AdapterFileError naming every fragment and leave ``model`` untouched."""
    before = snapshot(model)
    with pytest.raises(dk.AdapterFileError) as info:
        dk.load_adapter(model, directory)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in the message: {message}"
    _assert_same(before, snapshot(model))
    return message


def _edit_config(directory: Path, **changes: object) -> None:
    path = directory / CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _rewrite_weights(directory: Path, edit: Callable[[dict[str, Tensor]], None]) -> None:
    """Re-save the safetensors after ``edit`` (metadata kept, so the dorakit checks still apply)."""
    path = directory / WEIGHTS
    with safe_open(str(path), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 (not iterable)
    edit(tensors)
    save_file(tensors, str(path), metadata)


def _nan(tensors: dict[str, Tensor]) -> None:
    tensors[f"base_model.model.{Q0}.lora_B.weight"][0, 0] = float("nan")


def _corrupt_header(directory: Path) -> None:
    data = bytearray((directory / WEIGHTS).read_bytes())
    data[8:40] = b"\xff" * 32                                    # inside the JSON header
    (directory / WEIGHTS).write_bytes(bytes(data))


# name -> (how to break the saved directory, fragments the message must contain)
CORRUPTIONS: dict[str, tuple[Callable[[Path], object], tuple[str, ...]]] = {
    "missing config": (lambda d: (d / CONFIG).unlink(), (CONFIG, "missing")),
    "missing weights": (lambda d: (d / WEIGHTS).unlink(), (WEIGHTS, "missing")),
    "invalid json": (lambda d: (d / CONFIG).write_text('{"peft_type": "LORA", "r": 4,'), (CONFIG, "not valid JSON")),
    "json list": (lambda d: (d / CONFIG).write_text("[]"), (CONFIG, "JSON object")),
    "truncated weights": (lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[: (d / WEIGHTS).stat().st_size // 2]),
                          (WEIGHTS, "truncated or corrupt")),
    "corrupt header": (_corrupt_header, (WEIGHTS, "truncated or corrupt")),
    "empty weights": (lambda d: (d / WEIGHTS).write_bytes(b""), (WEIGHTS, "truncated or corrupt")),
    "nan tensor": (lambda d: _rewrite_weights(d, _nan), (WEIGHTS, f"{Q0}.lora_B.weight", "NaN")),
    "prefix tuning": (lambda d: _edit_config(d, peft_type="PREFIX_TUNING"), (CONFIG, "'PREFIX_TUNING'", "peft")),
    "unknown peft_type": (lambda d: _edit_config(d, peft_type="SOMETHING_NEW"), (CONFIG, "'SOMETHING_NEW'")),
    "no peft_type": (lambda d: _edit_config(d, peft_type=None), (CONFIG, "peft_type is None")),
    "layers_to_transform": (lambda d: _edit_config(d, layers_to_transform=[0]), (CONFIG, "layers_to_transform=[0]")),
    "lora_bias": (lambda d: _edit_config(d, lora_bias=True), (CONFIG, "lora_bias")),
    "r from another save": (lambda d: _edit_config(d, r=8), (CONFIG, WEIGHTS, "different saves", "r is 8")),
    "alpha from another save": (lambda d: _edit_config(d, lora_alpha=32), (CONFIG, "different saves", "lora_alpha")),
    "use_dora from another save": (lambda d: _edit_config(d, use_dora=False), ("different saves", "use_dora")),
    "string r": (lambda d: _edit_config(d, r="4"), (CONFIG, "'r'", "wrong type")),
    "no target_modules": (lambda d: _edit_config(d, target_modules=[]), (CONFIG, "target_modules")),
    "lora_B missing": (lambda d: _rewrite_weights(d, lambda t: t.pop(f"base_model.model.{Q0}.lora_B.weight")),
                       (Q0, "lora_A and lora_B")),
    "late wrong shape": (  # the last module only: everything before it already checked and built
        lambda d: _rewrite_weights(d, lambda t: t.update({"base_model.model.model.layers.1.mlp.down_proj.lora_B.weight":
                                                          torch.ones(32, 5)})),
        ("model.layers.1.mlp.down_proj", "(32, 5)", "(32, 4)")),
    "stray tensor": (lambda d: _rewrite_weights(d, lambda t: t.update({"base_model.model.lm_head.weight": torch.ones(64, 32)})),
                     ("'lm_head.weight'", "unexpected")),
    "no prefix": (lambda d: _rewrite_weights(d, lambda t: t.update({"model.norm.weight": torch.ones(32)})),
                  ("'model.norm.weight'", "base_model.model.")),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_bad_file_is_refused_and_the_model_is_untouched(saved, model_snapshot, corruption: str) -> None:
    base, directory, _ = saved
    corrupt, fragments = CORRUPTIONS[corruption]
    corrupt(directory)
    _refused(copy.deepcopy(base), directory, model_snapshot, *fragments)
    on_adapted = copy.deepcopy(base)                             # also onto a model with matching adapters
    dk.apply_adapters(on_adapted, DORA)
    _refused(on_adapted, directory, model_snapshot)


def test_missing_directory(tmp_path: Path, model_snapshot) -> None:
    _refused(_llama(), tmp_path / "nowhere", model_snapshot, str(tmp_path / "nowhere"), "no such adapter directory")


def test_config_r_disagreeing_with_the_tensors(tmp_path: Path, model_snapshot) -> None:
    """A PEFT file (no dorakit metadata): the config's rank is checked against lora_A's rows, per module."""
    base = _llama()
    peft_model = _peft().get_peft_model(copy.deepcopy(base), _peft().LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA,
                                                                          rank_pattern={"v_proj": 2}))
    peft_model.save_pretrained(tmp_path)
    _edit_config(tmp_path, r=8)
    _refused(copy.deepcopy(base), tmp_path, model_snapshot, "module 'model.layers.", "rank 8", "4 rows")
    _edit_config(tmp_path, r=4, rank_pattern={})
    _refused(copy.deepcopy(base), tmp_path, model_snapshot, ".self_attn.v_proj", "rank 4", "2 rows")


def test_adapter_for_a_bigger_model_names_the_missing_module(tmp_path: Path, model_snapshot) -> None:
    dk.save_adapter(_perturbed(_llama(layers=3), DORA), tmp_path)
    _refused(_llama(layers=2), tmp_path, model_snapshot, str(tmp_path), "'model.layers.2.", "different base model")


def test_adapter_for_a_wider_model_names_module_and_shapes(tmp_path: Path, model_snapshot) -> None:
    dk.save_adapter(_perturbed(_llama(hidden=48), DORA), tmp_path)
    _refused(_llama(hidden=32), tmp_path, model_snapshot, "model.layers.0.", "(4, 48)", "(4, 32)", "different base")


def test_bias_of_the_wrong_shape_is_refused(tmp_path: Path, model_snapshot) -> None:
    """A failure in the non-adapter tensors (bias="lora_only") also leaves the model untouched."""
    base = _llama()
    dk.save_adapter(_perturbed(base, dk.AdapterConfig(rank=4, targets=LLAMA, bias="lora_only")), tmp_path)
    assert not any(k.endswith(".bias") for k in load_file(tmp_path / WEIGHTS))  # LLaMA has none: add one by hand
    _rewrite_weights(tmp_path, lambda t: t.update({f"base_model.model.{Q0}.base_layer.bias": torch.ones(3)}))
    _refused(copy.deepcopy(base), tmp_path, model_snapshot, f"{Q0}.base_layer.bias")


# ---- loading onto a model whose adapters do not match ---------------------------------------------------
MISMATCHED = {
    "rank": (dk.AdapterConfig(method="dora", rank=2, alpha=8, targets=LLAMA), ("(rank, alpha, use_rslora)", "(2, 8.0")),
    "alpha": (dk.AdapterConfig(method="dora", rank=4, alpha=4, targets=LLAMA), ("(4, 4.0, False)", "(4, 8.0, False)")),
    "rslora": (dk.AdapterConfig(method="dora", rank=4, alpha=8, targets=LLAMA, use_rslora=True), ("True",)),
    "variant": (dk.AdapterConfig(method="lora", rank=4, alpha=8, targets=LLAMA), ("is lora in the model but dora",)),
    "module set": (dk.AdapterConfig(method="dora", rank=4, alpha=8, targets=["q_proj"]), ("only in the file",)),
    "bias": (dk.AdapterConfig(method="dora", rank=4, alpha=8, targets=LLAMA, bias="all"), ("bias",)),
}


@pytest.mark.parametrize("mismatch", list(MISMATCHED))
def test_mismatching_existing_adapters_are_refused(saved, model_snapshot, mismatch: str) -> None:
    base, directory, _ = saved
    cfg, fragments = MISMATCHED[mismatch]
    model = _perturbed(base, cfg)
    _refused(model, directory, model_snapshot, str(directory), *fragments)


def test_merged_existing_adapters_are_refused(saved, model_snapshot) -> None:
    base, directory, _ = saved
    model = _perturbed(base, DORA)
    dk.merge_adapters(model)
    _refused(model, directory, model_snapshot, "merged", "unmerge_adapters")


# ---- pickled .bin adapters -------------------------------------------------------------------------------
def test_bin_adapter_is_refused_then_converted(tmp_path: Path, model_snapshot) -> None:
    base = _llama()
    peft_model = _peft().get_peft_model(copy.deepcopy(base), _peft().LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA,
                                                                          use_dora=True))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.mul_(1.5) if "magnitude" in name else p.add_(0.1 * torch.randn(p.shape))
    peft_model.eval().save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / WEIGHTS).exists()
    _refused(copy.deepcopy(base), tmp_path, model_snapshot, "adapter_model.bin", "never unpickles", "convert_bin_adapter")
    assert dk.convert_bin_adapter(tmp_path) == tmp_path / WEIGHTS
    model = copy.deepcopy(base)
    dk.load_adapter(model, tmp_path)
    expected = _logits(peft_model)
    assert (expected - _logits(base)).abs().max() > 1e-3
    assert (_logits(model) - expected).abs().max() <= ATOL
    good = (tmp_path / WEIGHTS).read_bytes()
    with pytest.raises(FileExistsError, match=WEIGHTS):          # never overwrites an existing safetensors
        dk.convert_bin_adapter(tmp_path)
    assert (tmp_path / WEIGHTS).read_bytes() == good


class _Payload:
    """Unpickling this would create a directory: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def test_convert_refuses_pickled_code(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    torch.save({"base_model.model.x.lora_A.weight": torch.zeros(2, 2), "x": _Payload(marker)},
               tmp_path / "adapter_model.bin")
    with pytest.raises(dk.AdapterFileError, match="adapter_model.bin"):
        dk.convert_bin_adapter(tmp_path)
    assert not marker.exists() and not (tmp_path / WEIGHTS).exists()


def test_convert_without_a_bin_file(tmp_path: Path) -> None:
    with pytest.raises(dk.AdapterFileError, match="adapter_model.bin: missing"):
        dk.convert_bin_adapter(tmp_path)


# ---- atomic saves ------------------------------------------------------------------------------------------
@pytest.fixture
def overwrite(saved) -> tuple[nn.Module, Path, Tensor, nn.Module, dict[str, bytes]]:
    """``saved`` plus a user file in the adapter directory, a different adapter to save over it, and the bytes
    of every file before the overwrite."""
    base, directory, expected = saved
    (directory / "README.md").write_text("my notes\n")
    other = _perturbed(base, dk.AdapterConfig(method="lora", rank=2, alpha=3, targets=["q_proj", "v_proj"]))
    return base, directory, expected, other, {p.name: p.read_bytes() for p in directory.iterdir()}


def _failing_after(calls: int, real: Callable, exc: type[BaseException] = OSError) -> Callable:
    """``real`` for the first ``calls`` calls, then raise ``exc``."""
    count = {"n": 0}

    def wrapper(*args: object, **kwargs: object) -> object:
        count["n"] += 1
        if count["n"] > calls:
            raise exc("simulated crash")
        return real(*args, **kwargs)
    return wrapper


CRASHES = {  # (what to patch, after how many successful calls it fails)
    "serialising the tensors": ("dorakit.formats.io.save_safetensors_bytes", 0),
    "writing the weights": ("os.fsync", 0),
    "writing the config": ("os.fsync", 1),
    "renaming the weights into place": ("os.replace", 0),
    "keyboard interrupt while writing": ("os.fsync", 0),
}


@pytest.mark.parametrize("crash", list(CRASHES))
def test_crash_mid_save_keeps_the_previous_adapter(overwrite, monkeypatch, crash: str) -> None:
    base, directory, expected, other, before = overwrite
    target, calls = CRASHES[crash]
    module, _, attr = target.rpartition(".")
    real = getattr(sys.modules[module], attr)
    exc = KeyboardInterrupt if "interrupt" in crash else OSError
    monkeypatch.setattr(sys.modules[module], attr, _failing_after(calls, real, exc))
    with pytest.raises(exc, match="simulated crash"):
        dk.save_adapter(other, directory)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before    # no temp files, nothing changed
    model = copy.deepcopy(base)
    dk.load_adapter(model, directory)
    assert (_logits(model) - expected).abs().max() <= ATOL


def test_crash_between_the_two_renames_is_caught_on_load(overwrite, monkeypatch, model_snapshot) -> None:
    """Two files cannot be renamed at once: if the process dies after the weights are in place, the new
    weights' metadata no longer matches the old config, and loading says so instead of mixing them."""
    base, directory, _, other, before = overwrite
    monkeypatch.setattr(os, "replace", _failing_after(1, os.replace))
    with pytest.raises(OSError, match="simulated crash"):
        dk.save_adapter(other, directory)
    monkeypatch.undo()
    assert sorted(p.name for p in directory.iterdir()) == sorted(before)
    assert (directory / CONFIG).read_bytes() == before[CONFIG] and (directory / "README.md").read_bytes() == before["README.md"]
    _refused(copy.deepcopy(base), directory, model_snapshot, "different saves", "Save the adapter again")


def test_process_killed_mid_save_keeps_the_previous_adapter(saved) -> None:
    """A real abrupt exit (os._exit: no cleanup runs) while the new weights are being written."""
    base, directory, expected = saved
    script = f"""
import os, sys, torch, transformers, dorakit as dk
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_io_errors import _llama, _perturbed
other = _perturbed(_llama(), dk.AdapterConfig(method="lora", rank=2, targets=["q_proj"]))
os.fsync = lambda fd: os._exit(9)
dk.save_adapter(other, {str(directory)!r})
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], check=False, env=env, capture_output=True, timeout=120)
    assert result.returncode == 9, result.stderr.decode()[-2000:]
    model = copy.deepcopy(base)
    dk.load_adapter(model, directory)                             # a leftover hidden temp file is ignored
    assert (_logits(model) - expected).abs().max() <= ATOL


def test_saving_over_an_adapter_replaces_it_and_keeps_other_files(overwrite) -> None:
    base, directory, expected, other, before = overwrite
    dk.save_adapter(other, directory)
    assert sorted(p.name for p in directory.iterdir()) == sorted(before)
    assert (directory / "README.md").read_bytes() == before["README.md"]
    mode = (directory / "README.md").stat().st_mode & 0o777      # the mode open() gives, not mkstemp's 0600
    assert {(directory / name).stat().st_mode & 0o777 for name in (CONFIG, WEIGHTS)} == {mode}
    model = copy.deepcopy(base)
    dk.load_adapter(model, directory)
    assert (_logits(model) - _logits(other)).abs().max() <= ATOL
    assert (_logits(model) - expected).abs().max() > 1e-3
