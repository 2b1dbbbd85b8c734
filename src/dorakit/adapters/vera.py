"""VeRA and DVoRA: a direction update built from random matrices that every adapted layer shares.

VeRA (Kopiczko et al. 2024, Eq. 1) freezes one random pair A (r, in_max) and B (out_max, r) for the
whole model and trains two vectors per layer, d (r,) and b (out,):

    ΔW = Λ_b B Λ_d A,   Λ_b = diag(b), Λ_d = diag(d),   y = x (W0 + ΔW)ᵀ + bias   (no alpha: s = 1)

where a layer of (out, in) uses the slices A[:, :in] and B[:out, :]. DVoRA (Liu et al. 2024, the DoRA
paper's DVoRA) puts that update under DoRA's magnitude m (out,):

    W' = m ⊙ (W0 + Λ_b B Λ_d A) / ||W0 + Λ_b B Λ_d A||_c.

Both are LoRA / DoRA with *derived* factors, so AdapterLayer's math (the factored norm, merge,
unmerge, PEFT's dropout formula) runs unchanged on

    A_eff = A[:r, :in]                       (r, in), constant
    B_eff = Λ_b B[:out, :r] Λ_d              (out, r), differentiable in b and d.

Init, exactly PEFT's (peft.tuners.vera): A then B are drawn from one ``torch.Generator`` seeded with
the seed, each Kaiming-uniform U(−bound, bound) with bound = √3·√2/√fan_in, fan_in = its number of
columns, in float32 on the CPU; d = d_initial (0.1), b = 0, so ΔW = 0; DVoRA's m = ||W0||_c, so a new
DVoRA adapter is the identity too.

The shared pair lives in one VeraProjections module that every adapter holds as the *same* submodule:
one copy in memory, moved and cast with the model, kept shared by deepcopy. Its tensors are
non-persistent buffers (never trained, not in ``state_dict()``): they are a function of the seed and the
shape, regenerated on load and checked against a SHA-256 saved with the adapter (see vera_io.py).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import AdapterConfig
from .layers import AdapterLayer, Conv1DAdapter, LinearAdapter, adapter_dtype

VERA_METHODS = ("vera", "dvora")


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """PEFT's VeRA ``_kaiming_init``: U(−√3·√2/√fan_in, +...), fan_in = shape[1], float32, same float ops."""
    std = math.sqrt(2) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def vera_projections(seed: int, rank: int, out_features: int, in_features: int) -> tuple[Tensor, Tensor]:
    """The shared pair (A (rank, in_features), B (out_features, rank)), float32 on the CPU, as PEFT draws it."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    vera_A = _kaiming_uniform((rank, in_features), generator)     # drawn first, as in PEFT
    vera_B = _kaiming_uniform((out_features, rank), generator)
    return vera_A, vera_B


def projection_checksum(vera_A: Tensor, vera_B: Tensor) -> str:
    """SHA-256 over the shapes and the float32 bytes of A and B: what a saved adapter was trained with."""
    digest = hashlib.sha256()
    for t in (vera_A, vera_B):
        t32 = t.detach().to("cpu", torch.float32).contiguous()
        digest.update(repr(tuple(t32.shape)).encode())
        digest.update(t32.numpy().tobytes())
    return digest.hexdigest()


class VeraProjections(nn.Module):
    """The frozen shared matrices of one model: vera_A (r, in_max) and vera_B (out_max, r)."""

    def __init__(self, seed: int, rank: int, out_features: int, in_features: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.seed = int(seed)
        vera_A, vera_B = vera_projections(self.seed, rank, out_features, in_features)
        self.register_buffer("vera_A", vera_A.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("vera_B", vera_B.to(device=device, dtype=dtype), persistent=False)

    @property
    def rank(self) -> int:
        return self.vera_A.shape[0]

    @property
    def shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """((r, in_max), (out_max, r))."""
        return tuple(self.vera_A.shape), tuple(self.vera_B.shape)  # type: ignore[return-value]

    def checksum(self) -> str:
        return projection_checksum(self.vera_A, self.vera_B)

    def matches_seed(self) -> bool:
        """Whether the held matrices are the ones the seed regenerates (not ones loaded from a file)."""
        (rank, in_max), (out_max, _) = self.shapes
        return self.checksum() == projection_checksum(*vera_projections(self.seed, rank, out_max, in_max))

    def extra_repr(self) -> str:
        (rank, in_max), (out_max, _) = self.shapes
        return f"seed={self.seed}, rank={rank}, out_max={out_max}, in_max={in_max}"


class VeraAdapter(AdapterLayer):
    """VeRA (``variant == "lora"``) or DVoRA (``variant == "dora"``) around an ``nn.Linear``.

    Trainable: ``vera_lambda_d`` (r,), ``vera_lambda_b`` (out,) and, for DVoRA, ``magnitude`` (out,).
    ``lora_A`` / ``lora_B`` are None; lora_A_2d() / lora_B_2d() return the derived factors. The fused
    kernels are not used (auto picks the eager path; an explicit "fused" / "triton" raises).
    """

    supports_gather = True  # a mixed batch's gathered forward reads lora_A_2d() / lora_B_2d(), derived or not

    def __init__(self, base_layer: nn.Module, projections: VeraProjections, method: str = "dvora", *,
                 rank: int | None = None, d_initial: float = 0.1, dropout: float = 0.0,
                 norm_grad: str = "detach", backend: str = "auto") -> None:
        if method not in VERA_METHODS:
            raise ValueError(f"method must be one of {VERA_METHODS}, got {method!r}.")
        if not isinstance(d_initial, (int, float)) or isinstance(d_initial, bool) or not math.isfinite(d_initial) \
                or d_initial == 0:
            raise ValueError(f"d_initial must be a nonzero finite number (d = 0 would stall b's gradient), got "
                             f"{d_initial!r}.")
        # AdapterLayer's magnitude-only build is what VeRA adds to: the W0 cache, the dropout, m = ||W0||_c, and
        # no lora_A / lora_B parameters (their role is taken by the derived factors below).
        super().__init__(base_layer, "magnitude", dropout=dropout, norm_grad=norm_grad, backend=backend)
        out_features, in_features = self.weight_2d().shape
        rank = projections.rank if rank is None else rank
        (shared_rank, in_max), (out_max, _) = projections.shapes
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= shared_rank:
            raise ValueError(f"VeRA rank {rank!r} is larger than the shared matrices' rank {shared_rank} (or not a "
                             "positive integer): every layer slices its A, B from the one shared pair.")
        if out_features > out_max or in_features > in_max:
            raise ValueError(f"this {type(base_layer).__name__} of (out, in) = ({out_features}, {in_features}) does not "
                             f"fit the shared VeRA matrices A {(shared_rank, in_max)}, B {(out_max, shared_rank)}; "
                             "build them for the largest adapted layer (as apply_adapters does).")
        self.method = method
        self.variant = "dora" if method == "dvora" else "lora"
        self.rank, self.alpha, self.scaling = rank, 1.0, 1.0       # ΔW = Λ_b B Λ_d A: VeRA has no alpha
        self.vera_shape = (out_features, in_features)
        self.vera_projections = projections                          # the same module in every adapter
        kw = {"device": self.base_layer.weight.device, "dtype": adapter_dtype(self.weight_2d())}
        self.vera_lambda_d = nn.Parameter(torch.full((rank,), float(d_initial), **kw))
        self.vera_lambda_b = nn.Parameter(torch.zeros(out_features, **kw))
        if method == "vera":
            del self.magnitude

    # ---- the derived factors -------------------------------------------------------------------
    def lora_A_2d(self) -> Tensor:
        """A_eff = A[:r, :in], (r, in), constant."""
        vera_A = self.vera_projections.vera_A
        return vera_A[: self.rank, : self.vera_shape[1]].to(self.vera_lambda_d.dtype)

    def lora_B_2d(self) -> Tensor:
        """B_eff = Λ_b B[:out, :r] Λ_d, (out, r)."""
        vera_B = self.vera_projections.vera_B[: self.vera_shape[0], : self.rank].to(self.vera_lambda_d.dtype)
        return self.vera_lambda_b.unsqueeze(1) * vera_B * self.vera_lambda_d   # (out, 1) * (out, r) * (r,)

    def _lora(self, x: Tensor) -> Tensor:
        """x A_effᵀ B_effᵀ, unscaled, in PEFT's order: b ⊙ ((d ⊙ (x Aᵀ)) Bᵀ)."""
        dtype = self.vera_lambda_d.dtype
        vera_B = self.vera_projections.vera_B[: self.vera_shape[0], : self.rank].to(dtype)
        h = self.vera_lambda_d * F.linear(x.to(dtype), self.lora_A_2d())        # (..., r)
        return self.vera_lambda_b * F.linear(h, vera_B)                         # (..., out)

    def _static_unsupported(self, impl: str) -> str | None:
        return "VeRA / DVoRA adapters run on the eager path (their A, B are derived, not parameters)"

    def extra_repr(self) -> str:
        return (f"method={self.method}, rank={self.rank}, seed={self.vera_projections.seed}, "
                f"norm_grad={self.norm_grad}, merged={self.merged}")


class VeraLinearAdapter(VeraAdapter):
    """VeRA / DVoRA around ``nn.Linear``: W0 (out, in)."""


class VeraConv1DAdapter(VeraAdapter, Conv1DAdapter):
    """VeRA / DVoRA around transformers' ``Conv1D`` (weight stored (in, out)), as PEFT's fan_in_fan_out."""


VERA_CLASSES: dict[type[AdapterLayer], type[VeraAdapter]] = {
    LinearAdapter: VeraLinearAdapter, Conv1DAdapter: VeraConv1DAdapter}
"""The dorakit layer kind inject.DISPATCH picks -> its VeRA class. PEFT's VeRA adapts these two only."""


def _shape_2d(base: nn.Module, cls: type[VeraAdapter]) -> tuple[int, int]:
    out_in = tuple(base.weight.shape)
    return out_in[::-1] if issubclass(cls, Conv1DAdapter) else out_in  # type: ignore[return-value]


def build_vera_adapters(bases: Mapping[str, nn.Module], cfg: AdapterConfig,
                        adapter_class: Callable[[nn.Module], type[AdapterLayer] | None]) -> dict[str, VeraAdapter]:
    """Wrap every module of ``bases`` (name -> module) with one shared VeraProjections sized to the largest.

    As PEFT: A is (r, max in), B is (max out, r) over all the modules, drawn from ``cfg.vera_seed``.

    Raises:
        ValueError: a module that is not an nn.Linear / transformers Conv1D (the module is named).
    """
    classes: dict[str, type[VeraAdapter]] = {}
    for name, base in bases.items():
        cls = VERA_CLASSES.get(adapter_class(base))  # type: ignore[arg-type]
        if cls is None:
            raise ValueError(f"module {name!r}: method={cfg.method!r} adapts nn.Linear and transformers Conv1D "
                             f"only (as PEFT's VeRA), not {type(base).__name__}; leave it out of targets.")
        classes[name] = cls
    shapes = [_shape_2d(base, classes[name]) for name, base in bases.items()]
    first = next(iter(bases.values())).weight
    projections = VeraProjections(cfg.vera_seed, cfg.rank, max(s[0] for s in shapes), max(s[1] for s in shapes),
                                  dtype=adapter_dtype(first), device=first.device)
    wrappers: dict[str, VeraAdapter] = {}
    for name, base in bases.items():
        try:
            wrappers[name] = classes[name](base, projections, cfg.method, d_initial=cfg.vera_d_initial,
                                           dropout=cfg.dropout, norm_grad=cfg.norm_grad, backend=cfg.backend)
        except (ValueError, TypeError) as e:
            raise type(e)(f"module {name!r}: {e}") from None
    return wrappers
