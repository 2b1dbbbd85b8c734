"""Parity with the real PEFT: same W0, A, B and magnitude => same outputs and gradients.

Each test builds one small model (float32 unless it says otherwise) twice from the same weights,
wraps one copy with ``peft.get_peft_model`` and the other with ``dk.apply_adapters``, gives PEFT's
adapter nonzero random A, B and a magnitude scaled by U(0.5, 1.5) (so the adapter is far from its
identity init), copies those tensors into dorakit, and then compares the two models.

Shape map (PEFT -> dorakit): Linear / Conv1D / Conv A (r, in, *k) and B (out, r, *1) are the same;
Embedding ``lora_embedding_A`` (r, vocab) and ``lora_embedding_B`` (dim, r) are dorakit's A and B;
the conv magnitude is (1, out, 1, ...) in PEFT and (out,) in dorakit.

Tolerance: the requirement's float32 bound, max |dorakit - PEFT| <= 1e-5, for outputs and every gradient
(of an O(1) loss, see _forward_backward). A float64 run with a 1e-10 bound checks that what remains in
float32 is rounding (dorakit forms ||W0 + sBA||_c factored, PEFT densely), not different math.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor, nn

import dorakit as dk

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft.tuners.lora import Embedding as PeftEmbedding  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

ATOL = 1e-5           # the requirement: float32, max abs diff <= 1e-5
ATOL_F64 = 1e-10      # float64: the same math in a different order agrees to ~1e-14
ADAPTER = "default"   # PEFT's adapter name
DROPOUT = 0.1
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---- the models --------------------------------------------------------------------------------------
def _linear_model() -> nn.Module:
    # non-square, with and without bias
    return nn.Sequential(OrderedDict(up=nn.Linear(12, 20, bias=True), act=nn.Tanh(),
                                     down=nn.Linear(20, 7, bias=False)))


def _hf_conv1d_model() -> nn.Module:
    # GPT-2's Conv1D(nf=out, nx=in): weight (in, out)
    return nn.Sequential(OrderedDict(up=Conv1D(20, 12), act=nn.Tanh(), down=Conv1D(7, 20)))


def _conv1d_model() -> nn.Module:
    return nn.Sequential(OrderedDict(c1=nn.Conv1d(4, 6, 3, stride=1, padding=1), act=nn.Tanh(),
                                     c2=nn.Conv1d(6, 5, 3, stride=2, padding=1, bias=False)))


def _conv2d_model() -> nn.Module:
    return nn.Sequential(OrderedDict(c1=nn.Conv2d(3, 8, 3, stride=1, padding=1), act=nn.Tanh(),
                                     c2=nn.Conv2d(8, 6, 3, stride=2, padding=1, bias=False)))


def _embedding_model() -> nn.Module:
    # padding_idx=0 appears in the input: its row of A (a column of A as stored) must get no gradient in both.
    return nn.Sequential(OrderedDict(emb=nn.Embedding(50, 16, padding_idx=0), head=nn.Linear(16, 5)))


def _llama_model() -> nn.Module:
    # initializer_range=0.2 (not 0.02) gives O(1) sublayer outputs, so the adapters visibly move the logits
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
        attn_implementation="eager", initializer_range=0.2)
    return transformers.LlamaForCausalLM(config)


def _call(model: nn.Module, x: Tensor) -> Tensor:
    return model(x)


def _call_llama(model: nn.Module, x: Tensor) -> Tensor:
    return model(inputs_embeds=x).logits                          # (B, T, vocab)


@dataclass(frozen=True)
class Case:
    """One model family: how to build it, what to target, and what to feed it."""

    build: Callable[[], nn.Module]
    targets: tuple[str, ...]
    make_input: Callable[[torch.Generator], Tensor]
    forward: Callable[[nn.Module, Tensor], Tensor] = _call
    rank: int = 4
    alpha: float = 6.0                                            # s = 1.5 (rslora: 3.0), never 1
    peft_kwargs: dict = field(default_factory=dict)


CASES = {
    "linear": Case(_linear_model, ("up", "down"), lambda g: torch.randn(3, 5, 12, generator=g)),
    "hf_conv1d": Case(_hf_conv1d_model, ("up", "down"), lambda g: torch.randn(3, 5, 12, generator=g),
                      peft_kwargs={"fan_in_fan_out": True}),
    "conv1d": Case(_conv1d_model, ("c1", "c2"), lambda g: torch.randn(2, 4, 11, generator=g)),
    "conv2d": Case(_conv2d_model, ("c1", "c2"), lambda g: torch.randn(2, 3, 9, 9, generator=g)),
    "embedding": Case(_embedding_model, ("emb",),
                      lambda g: torch.cat([torch.zeros(3, 1, dtype=torch.long),
                                           torch.randint(0, 50, (3, 6), generator=g)], dim=1)),
    "llama": Case(_llama_model, LLAMA_TARGETS, lambda g: torch.randn(2, 7, 32, generator=g), _call_llama,
                  rank=4, alpha=8.0),
}
DROPOUT_CASES = ["linear", "hf_conv1d", "conv1d", "conv2d", "llama"]  # PEFT applies no dropout to embeddings
METHODS = ["lora", "dora"]


# ---- building the pair -------------------------------------------------------------------------------
def _peft_params(layer: nn.Module) -> dict[str, nn.Parameter]:
    """PEFT's A, B (and magnitude) of one adapted module, under dorakit's names."""
    if isinstance(layer, PeftEmbedding):
        params = {"lora_A": layer.lora_embedding_A[ADAPTER], "lora_B": layer.lora_embedding_B[ADAPTER]}
    else:
        params = {"lora_A": layer.lora_A[ADAPTER].weight, "lora_B": layer.lora_B[ADAPTER].weight}
    if ADAPTER in layer.lora_magnitude_vector:
        params["magnitude"] = layer.lora_magnitude_vector[ADAPTER].weight
    return params


def _dk_params(layer: dk.AdapterLayer) -> dict[str, nn.Parameter]:
    names = ("lora_A", "lora_B", "magnitude") if layer.variant == "dora" else ("lora_A", "lora_B")
    return {name: getattr(layer, name) for name in names}


def _to_dk_layout(name: str, t: Tensor) -> Tensor:
    """A PEFT tensor in dorakit's layout: only the magnitude differs ((1, out, 1, ..) for convs -> (out,))."""
    return t.reshape(-1) if name == "magnitude" else t


def _paired_tensors(peft_model: nn.Module, dk_model: nn.Module) -> list[tuple[str, Tensor, Tensor]]:
    """(module.tensor, PEFT parameter, dorakit parameter) for every adapter tensor, matched by module name."""
    inner = peft_model.get_base_model()
    peft_layers = {n: m for n, m in inner.named_modules() if isinstance(m, LoraLayer)}
    dk_layers = dict(dk.adapter_layers(dk_model))
    assert peft_layers and sorted(peft_layers) == sorted(dk_layers), \
        f"PEFT adapted {sorted(peft_layers)}, dorakit {sorted(dk_layers)}"
    pairs = []
    for name, peft_layer in peft_layers.items():
        p_params, d_params = _peft_params(peft_layer), _dk_params(dk_layers[name])
        assert p_params.keys() == d_params.keys(), \
            f"{name}: PEFT has {list(p_params)}, dorakit {list(d_params)}"
        for tensor_name, p in p_params.items():
            d = d_params[tensor_name]
            assert _to_dk_layout(tensor_name, p).shape == d.shape, \
                f"{name}.{tensor_name}: PEFT {tuple(p.shape)} vs dorakit {tuple(d.shape)}"
            pairs.append((f"{name}.{tensor_name}", p, d))
    return pairs


def _build_pair(case: Case, method: str, *, use_rslora: bool = False, dropout: float = 0.0,
                perturb: bool = True, dtype: torch.dtype = torch.float32,
                ) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(base, PEFT model, dorakit model) from one set of base weights in ``dtype`` and, if ``perturb``, one
    set of nonzero adapter tensors (PEFT's, copied into dorakit)."""
    torch.manual_seed(0)
    base = case.build().to(dtype)                                # cast before wrapping: no stale caches
    assert all(p.dtype == dtype for p in base.parameters())
    peft_cfg = peft.LoraConfig(r=case.rank, lora_alpha=case.alpha, target_modules=list(case.targets),
                               lora_dropout=dropout, use_rslora=use_rslora, use_dora=method == "dora",
                               **case.peft_kwargs)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft_cfg)
    dk_model = copy.deepcopy(base)
    dk.apply_adapters(dk_model, dk.AdapterConfig(method=method, rank=case.rank, alpha=case.alpha,
                                                 targets=list(case.targets), dropout=dropout,
                                                 use_rslora=use_rslora, norm_grad="detach"))
    if perturb:
        g = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for name, p, d in _paired_tensors(peft_model, dk_model):
                assert p.dtype == dtype, f"{name}: PEFT's adapter is {p.dtype}, not {dtype}"
                if name.endswith("magnitude"):
                    p.mul_(torch.empty(p.shape, dtype=dtype).uniform_(0.5, 1.5, generator=g))
                else:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=dtype))
                d.copy_(_to_dk_layout(name.rpartition(".")[2], p))
    return base, peft_model, dk_model


# ---- running and comparing ---------------------------------------------------------------------------
def _assert_close(actual: Tensor, expected: Tensor, what: str, atol: float = ATOL) -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtypes {actual.dtype} vs {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shapes {tuple(actual.shape)} vs {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f"{what}: max |dorakit - PEFT| = {diff:.3e} > {atol:g}"


def _forward_backward(case: Case, model: nn.Module, x: Tensor, seed: int) -> tuple[Tensor, Tensor | None]:
    """Output and input gradient of loss = <y, u> for a fixed random unit vector u.

    A unit-norm u keeps the loss and the gradients O(1), where an absolute 1e-5 is a meaningful float32
    bound; with u ~ N(0, 1) the LLaMA gradients are O(50) and PEFT's own float32 result is then 3e-5
    away from float64. Seeds the RNG right before the forward, so both models draw the same dropout masks.
    """
    x = x.clone().requires_grad_(x.is_floating_point())
    torch.manual_seed(seed)                                      # the same dropout masks for both models
    y = case.forward(model, x)
    u = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (y * (u / u.norm()).to(y.dtype)).sum().backward()
    return y.detach(), x.grad


def _compare_training_step(case: Case, peft_model: nn.Module, dk_model: nn.Module, x: Tensor,
                           atol: float = ATOL) -> Tensor:
    """Compare outputs, the input gradient and every adapter gradient; returns the PEFT output."""
    y_peft, gx_peft = _forward_backward(case, peft_model, x, seed=99)
    y_dk, gx_dk = _forward_backward(case, dk_model, x, seed=99)
    _assert_close(y_dk, y_peft, "output", atol)
    if gx_peft is not None:
        assert gx_dk is not None and gx_peft.abs().max() > 0
        _assert_close(gx_dk, gx_peft, "input gradient", atol)
    for name, p, d in _paired_tensors(peft_model, dk_model):
        assert p.grad is not None and d.grad is not None, f"{name}: missing gradient"
        assert p.grad.abs().max() > 0, f"{name}: PEFT's gradient is zero, the test would test nothing"
        _assert_close(d.grad, _to_dk_layout(name.rpartition(".")[2], p.grad), f"gradient of {name}", atol)
    return y_peft


# ---- the tests ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_rslora", [False, True], ids=["s=alpha/r", "rslora"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_outputs_and_gradients_match_peft(case_name: str, method: str, use_rslora: bool) -> None:
    case = CASES[case_name]
    base, peft_model, dk_model = _build_pair(case, method, use_rslora=use_rslora)
    for model in (base, peft_model, dk_model):
        model.train()
    x = case.make_input(torch.Generator().manual_seed(3))
    y_peft = _compare_training_step(case, peft_model, dk_model, x)
    with torch.no_grad():
        y_base = case.forward(base, x)
    assert (y_peft - y_base).abs().max() > 1e-2, "the perturbed adapter barely changes the output"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_float64_outputs_and_gradients_match_peft_to_rounding(case_name: str, method: str) -> None:
    """In float64 the two agree to ~1e-14: the float32 differences above are rounding, not different math."""
    case = CASES[case_name]
    _, peft_model, dk_model = _build_pair(case, method, use_rslora=True, dtype=torch.float64)
    peft_model.train()
    dk_model.train()
    x = case.make_input(torch.Generator().manual_seed(3))
    _compare_training_step(case, peft_model, dk_model, x.double() if x.is_floating_point() else x, ATOL_F64)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case_name", DROPOUT_CASES)
def test_dropout_in_train_mode_matches_peft(case_name: str, method: str) -> None:
    """p=0.1 in train mode: both draw one mask per adapted layer, in the same order, from the same seed."""
    case = CASES[case_name]
    _, peft_model, dk_model = _build_pair(case, method, dropout=DROPOUT)
    peft_model.train()
    dk_model.train()
    x = case.make_input(torch.Generator().manual_seed(3))
    y_peft = _compare_training_step(case, peft_model, dk_model, x)
    peft_model.eval()
    with torch.no_grad():
        y_eval = case.forward(peft_model, x)
    assert (y_peft - y_eval).abs().max() > 1e-3, "dropout was not active, so the masks were not compared"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_merged_outputs_and_weights_match_peft(case_name: str, method: str) -> None:
    case = CASES[case_name]
    base, peft_model, dk_model = _build_pair(case, method)
    for model in (base, peft_model, dk_model):
        model.eval()
    x = case.make_input(torch.Generator().manual_seed(3))
    with torch.no_grad():
        y_unmerged = case.forward(peft_model, x)
        peft_model.merge_adapter()
        dk.merge_adapters(dk_model)
        y_peft, y_dk = case.forward(peft_model, x), case.forward(dk_model, x)
        y_base = case.forward(base, x)
    _assert_close(y_dk, y_peft, "merged output")
    assert (y_peft - y_unmerged).abs().max() <= ATOL, "PEFT's own merge changed the output (bad reference)"
    assert (y_peft - y_base).abs().max() > 1e-2, "the merged adapter barely changes the output"
    peft_layers = dict(peft_model.get_base_model().named_modules())
    for name, layer in dk.adapter_layers(dk_model):
        peft_weight = peft_layers[name].get_base_layer().weight
        _assert_close(layer.base_layer.weight, peft_weight, f"merged weight of {name}")


@pytest.mark.parametrize("case_name", list(CASES))
def test_dora_magnitude_init_matches_peft(case_name: str) -> None:
    """With each library's own init (B = 0, or A = 0 for embeddings) both start at m = ||W0||_c."""
    _, peft_model, dk_model = _build_pair(CASES[case_name], "dora", perturb=False)
    for name, p, d in _paired_tensors(peft_model, dk_model):
        if name.endswith("magnitude"):
            _assert_close(d, _to_dk_layout("magnitude", p), f"initial {name}")
