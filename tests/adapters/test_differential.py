"""A randomized differential test against PEFT: same weights in dorakit and PEFT => same numbers.

Each case draws (from its own seed) a tiny model -- LLaMA, GPT-2-style Conv1D, or an Embedding + Conv1d +
Conv2d + Conv3d + Linear stack -- and a config: targets, LoRA or DoRA, rank / alpha with rank_pattern and
alpha_pattern, rsLoRA, every bias mode, dropout. PEFT's adapter gets random nonzero tensors that are
copied into dorakit; then outputs, the input gradient, every adapter gradient and every trained bias's
gradient are compared in eval and (with dropout, same seed) train mode, after merge / unmerge /
merge_and_unload, after each file direction (PEFT saves -> dorakit loads, and back), and after one AdamW
step (fused / foreach / for-loop, train and eval mode, no_grad forwards around the step).

A float32 case that disagrees beyond 1e-5 (relative to the output's scale) is run again in float64, and
fails only if it also disagrees there beyond 1e-10: rounding is told apart from different math.
"""

from __future__ import annotations

import copy
import random
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

import dorakit as dk

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from test_peft_parity import (  # noqa: E402  (helpers shared with the fixed-case parity tests)
    LLAMA_TARGETS,
    _call_llama,
    _hf_conv1d_model,
    _llama_model,
    _paired_tensors,
    _to_dk_layout,
)

ATOL_F32, ATOL_F64 = 1e-5, 1e-10
N_CASES = 200


class _Stack(nn.Module):
    """Embedding -> Conv1d -> Conv2d -> Conv3d -> Linear over a (B, T) batch of token ids."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.c1 = nn.Conv1d(6, 5, 3, padding=1)
        self.c2 = nn.Conv2d(5, 4, 3, padding=1, bias=False)
        self.c3 = nn.Conv3d(4, 3, (3, 3, 1), padding=(1, 1, 0))
        self.head = nn.Linear(3, 4)

    def forward(self, ids: Tensor) -> Tensor:
        h = torch.tanh(self.c1(self.emb(ids).transpose(1, 2)))                         # (B, 5, T)
        h = torch.tanh(self.c2(h.unsqueeze(-1).expand(-1, -1, -1, 3)))                  # (B, 4, T, 3)
        h = torch.tanh(self.c3(h.unsqueeze(-1).expand(-1, -1, -1, -1, 2)))              # (B, 3, T, 3, 2)
        return self.head(h.mean(dim=(3, 4)).transpose(1, 2))                            # (B, T, 4)


def _gpt2_style() -> nn.Module:
    return _hf_conv1d_model()


@dataclass(frozen=True)
class Family:
    build: Callable[[], nn.Module]
    targets: tuple[str, ...]
    make_input: Callable[[torch.Generator, torch.dtype], Tensor]
    forward: Callable[[nn.Module, Tensor], Tensor]
    peft_kwargs: dict


FAMILIES = {
    "llama": Family(_llama_model, LLAMA_TARGETS + ("lm_head",),
                    lambda g, dt: torch.randn(2, 5, 32, generator=g, dtype=torch.float64).to(dt), _call_llama, {}),
    "gpt2": Family(_gpt2_style, ("up", "down"),
                   lambda g, dt: torch.randn(3, 5, 12, generator=g, dtype=torch.float64).to(dt),
                   lambda m, x: m(x), {"fan_in_fan_out": True}),
    "stack": Family(_Stack, ("emb", "c1", "c2", "c3", "head"),
                    lambda g, dt: torch.randint(0, 20, (2, 7), generator=g), lambda m, x: m(x), {}),
}


@dataclass(frozen=True)
class Spec:
    """One drawn case."""

    family: str
    method: str
    targets: tuple[str, ...]
    rank: int
    alpha: float
    rank_pattern: dict
    alpha_pattern: dict
    use_rslora: bool
    bias: str
    dropout: float
    seed: int


def draw(seed: int, family: str | None = None, method: str | None = None) -> Spec:
    rng = random.Random(seed)
    family = family or rng.choice(sorted(FAMILIES))
    pool = FAMILIES[family].targets
    targets = tuple(sorted(rng.sample(pool, rng.randint(1, len(pool)))))
    special = rng.choice(targets)
    rank_pattern = {special: rng.choice([1, 3, 5])} if rng.random() < 0.5 else {}
    alpha_pattern = {special: rng.choice([2.0, 5.0])} if rng.random() < 0.5 else {}
    dropout = 0.0 if "emb" in targets or rng.random() < 0.5 else 0.1  # no dropout on embeddings (PEFT, dorakit)
    return Spec(family, method or rng.choice(["lora", "dora"]), targets, rng.choice([1, 2, 4]),
                rng.choice([1.0, 3.0, 8.0]), rank_pattern, alpha_pattern, rng.random() < 0.5,
                rng.choice(["none", "all", "lora_only"]), dropout, seed)


def build(spec: Spec, dtype: torch.dtype) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(base, PEFT model, dorakit model) with the same base weights and the same random adapter tensors."""
    fam = FAMILIES[spec.family]
    torch.manual_seed(spec.seed)
    base = fam.build().to(dtype)
    cfg = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets),
                          lora_dropout=spec.dropout, use_rslora=spec.use_rslora, use_dora=spec.method == "dora",
                          bias=spec.bias, rank_pattern=spec.rank_pattern, alpha_pattern=spec.alpha_pattern,
                          **fam.peft_kwargs)
    dk_model = copy.deepcopy(base)
    with warnings.catch_warnings():  # both warn about a rank above min(out, in) on the tiny convolutions
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(copy.deepcopy(base), cfg)
        dk.apply_adapters(dk_model, dk.AdapterConfig(
            method=spec.method, rank=spec.rank, alpha=spec.alpha, targets=list(spec.targets), dropout=spec.dropout,
            use_rslora=spec.use_rslora, bias=spec.bias, rank_pattern=spec.rank_pattern,
            alpha_pattern=spec.alpha_pattern, norm_grad="detach"))
    g = torch.Generator().manual_seed(spec.seed + 1)
    with torch.no_grad():
        for name, p, d in _paired_tensors(peft_model, dk_model):
            if name.endswith("magnitude"):
                p.mul_(torch.empty(p.shape, dtype=torch.float64).uniform_(0.5, 1.5, generator=g).to(dtype))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype))
            d.copy_(_to_dk_layout(name.rpartition(".")[2], p))
    return base, peft_model, dk_model


class Checker:
    """Collects every disagreement beyond atol * max(1, |expected|_max)."""

    def __init__(self, atol: float) -> None:
        self.atol, self.failures = atol, []

    def close(self, actual: Tensor, expected: Tensor, what: str) -> None:
        if actual.shape != expected.shape:
            self.failures.append(f"{what}: shapes {tuple(actual.shape)} vs {tuple(expected.shape)}")
            return
        diff = (actual.double() - expected.double()).abs().max().item()
        if not diff <= self.atol * max(1.0, expected.abs().max().item()):
            self.failures.append(f"{what}: max |dorakit - PEFT| = {diff:.3e}")


def _forward(spec: Spec, model: nn.Module, x: Tensor, *, grad: bool) -> tuple[Tensor, Tensor | None]:
    """Output and (with grad) input gradient of an O(1) loss <y, u>, |u| = 1; the RNG is seeded right
    before the forward so both models draw the same dropout masks."""
    x = x.clone().requires_grad_(grad and x.is_floating_point())
    torch.manual_seed(99)
    with torch.set_grad_enabled(grad):
        y = FAMILIES[spec.family].forward(model, x)
        if grad:
            u = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
            (y * (u / u.norm()).to(y.dtype)).sum().backward()
    return y.detach(), x.grad


def _trained_biases(peft_model: nn.Module, dk_model: nn.Module) -> list[tuple[str, Tensor, Tensor]]:
    """(name, PEFT bias, dorakit bias) for every trained bias: PEFT's key is dorakit's under base_model.model."""
    peft_params = dict(peft_model.named_parameters())
    return [(n, peft_params["base_model.model." + n], p) for n, p in dk_model.named_parameters()
            if p.requires_grad and n.rpartition(".")[2] == "bias"]


def compare_step(spec: Spec, peft_model: nn.Module, dk_model: nn.Module, x: Tensor, check: Checker, tag: str) -> None:
    """Outputs, input gradient, adapter and bias gradients of one forward / backward."""
    for model in (peft_model, dk_model):
        model.zero_grad(set_to_none=True)
    y_p, gx_p = _forward(spec, peft_model, x, grad=True)
    y_d, gx_d = _forward(spec, dk_model, x, grad=True)
    check.close(y_d, y_p, f"{tag} output")
    if gx_p is not None:
        check.close(gx_d, gx_p, f"{tag} input gradient")
    for name, p, d in _paired_tensors(peft_model, dk_model):
        check.close(d.grad, _to_dk_layout(name.rpartition(".")[2], p.grad), f"{tag} gradient of {name}")
    biases = _trained_biases(peft_model, dk_model)
    peft_biases = {n.removeprefix("base_model.model.") for n, p in peft_model.named_parameters()
                   if p.requires_grad and n.rpartition(".")[2] == "bias"}
    assert peft_biases == {n for n, _, _ in biases}, f"{spec}: trained biases differ"
    for name, p, d in biases:
        check.close(d.grad, p.grad, f"{tag} gradient of {name}")


def _outputs(spec: Spec, a: nn.Module, b: nn.Module, x: Tensor, check: Checker, what: str) -> None:
    check.close(_forward(spec, a, x, grad=False)[0], _forward(spec, b, x, grad=False)[0], what)


def run_case(spec: Spec, dtype: torch.dtype, atol: float) -> list[str]:
    """Every comparison except the optimizer step; returns the disagreements."""
    base, peft_model, dk_model = build(spec, dtype)
    x = FAMILIES[spec.family].make_input(torch.Generator().manual_seed(spec.seed), dtype)
    check = Checker(atol)
    peft_model.eval(), dk_model.eval()
    compare_step(spec, peft_model, dk_model, x, check, "eval")
    if spec.dropout:
        peft_model.train(), dk_model.train()
        compare_step(spec, peft_model, dk_model, x, check, "train (dropout)")
        peft_model.eval(), dk_model.eval()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(f"{tmp}/peft")
        from_peft = copy.deepcopy(base)
        dk.load_adapter(from_peft, f"{tmp}/peft")
        _outputs(spec, from_peft.eval(), peft_model, x, check, "dorakit loading PEFT's file")
        dk.save_adapter(dk_model, f"{tmp}/dk")
        from_dk = peft.PeftModel.from_pretrained(copy.deepcopy(base), f"{tmp}/dk").eval()
        _outputs(spec, dk_model, from_dk, x, check, "PEFT loading dorakit's file")
    peft_model.merge_adapter()
    dk.merge_adapters(dk_model)
    _outputs(spec, dk_model, peft_model, x, check, "merged")
    peft_model.unmerge_adapter()
    dk.unmerge_adapters(dk_model)
    compare_step(spec, peft_model, dk_model, x, check, "unmerged")
    _outputs(spec, dk.merge_and_unload(dk_model), peft_model.merge_and_unload(), x, check, "merge_and_unload")
    return check.failures


OPTIMIZERS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


def run_optimizer_step(spec: Spec, optimizer: str, mode: str, dtype: torch.dtype, atol: float) -> list[str]:
    """no_grad forward, forward + backward, one AdamW step, no_grad forward: outputs and parameters agree."""
    _, peft_model, dk_model = build(spec, dtype)
    x = FAMILIES[spec.family].make_input(torch.Generator().manual_seed(spec.seed), dtype)
    check = Checker(atol)
    opts = []
    for model in (peft_model, dk_model):
        model.train(mode == "train")
        params = [p for p in model.parameters() if p.requires_grad]
        opts.append(torch.optim.AdamW(params, lr=0.05, weight_decay=0.01, **OPTIMIZERS[optimizer]))
    _outputs(spec, dk_model, peft_model, x, check, "no_grad forward before the step")
    compare_step(spec, peft_model, dk_model, x, check, "before the step")
    for opt in opts:
        opt.step()
    _outputs(spec, dk_model, peft_model, x, check, f"no_grad forward after a {optimizer} AdamW step ({mode} mode)")
    for name, p, d in _paired_tensors(peft_model, dk_model):
        check.close(d, _to_dk_layout(name.rpartition(".")[2], p), f"{name} after the step")
    compare_step(spec, peft_model, dk_model, x, check, "after the step")
    return check.failures


def assert_agrees(run: Callable[[torch.dtype, float], list[str]], spec: Spec) -> None:
    """float32 first; on a disagreement, float64 decides whether it is rounding or a bug."""
    failures = run(torch.float32, ATOL_F32)
    if failures:
        failures64 = run(torch.float64, ATOL_F64)
        assert not failures64, f"{spec}: disagrees with PEFT in float64 too: {failures64[:4]}"


@pytest.mark.parametrize("seed", range(N_CASES))
def test_random_case_matches_peft(seed: int) -> None:
    spec = draw(seed)
    assert_agrees(lambda dtype, atol: run_case(spec, dtype, atol), spec)


# In eval mode a no_grad forward between steps used to cache the norm of nn.Linear DoRA modules, keyed on
# version counters that a fused AdamW step does not bump (the DoRA-fused-eval cases caught it); norms are
# now cached only inside dk.cached_norms.


def _step_params() -> list:
    out = []
    for i, (family, method, optimizer, mode) in enumerate(
            (f, m, o, md) for f in sorted(FAMILIES) for m in ("lora", "dora") for o in OPTIMIZERS
            for md in ("train", "eval")):
        out.append(pytest.param(family, method, optimizer, mode, 1000 + i,
                                id=f"{family}-{method}-{optimizer}-{mode}"))
    return out


@pytest.mark.parametrize(("family", "method", "optimizer", "mode", "seed"), _step_params())
def test_optimizer_step_matches_peft(family: str, method: str, optimizer: str, mode: str, seed: int) -> None:
    spec = draw(seed, family, method)
    assert_agrees(lambda dtype, atol: run_optimizer_step(spec, optimizer, mode, dtype, atol), spec)
