"""Triton kernels for DoRA on a linear layer: the per-step row norm and the fused epilogues.

Shapes: W0 (N, K) = (out, in); A (R, K); B (N, R); x as (M, K) rows; y (M, N). All accumulation is
float32; loads of bf16/fp16 tensors are upcast in registers. Float32 operands use IEEE float32
(epilogues) or three-pass tf32 (the norm) dots, never plain tf32, so a float32 layer keeps float32
accuracy. Importing this module needs triton;
``dorakit.adapters.kernels`` imports it lazily. On a CPU the kernels run under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

TINY = float(torch.finfo(torch.float32).tiny)


MAX_BLOCK_R = 128
"""The widest rank tile: above it the kernels loop over the rank in tiles of this width, so their
shared memory does not grow with the rank (tests/adapters/test_kernels.py compiles them for sm_86)."""


def _block_r(rank: int) -> int:
    """The rank tile: the rank rounded up to a power of two, at least 16 (tl.dot), at most MAX_BLOCK_R."""
    return min(MAX_BLOCK_R, max(16, triton.next_power_of_2(rank)))


@triton.jit
def _lora_tile(H, B, rm, rn, M, N, R, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_R: tl.constexpr):
    """h Bᵀ on rows rm, columns rn: (BLOCK_M, BLOCK_N) float32, summed over the rank in tiles of BLOCK_R
    (one tile, one dot, for R <= BLOCK_R); h (M, R) and B (N, R) row-major."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for r0 in tl.range(0, R, BLOCK_R, num_stages=1):  # not pipelined: one tile of h and B in shared memory
        rr = r0 + tl.arange(0, BLOCK_R)
        h = tl.load(H + rm[:, None] * R + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        b = tl.load(B + rn[:, None] * R + rr[None, :], mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0)
        if IEEE:
            acc += tl.dot(h, tl.trans(b), input_precision="ieee")
        else:
            acc += tl.dot(h, tl.trans(b))
    return acc


@triton.jit
def _prepare_kernel(
    W,
    A,
    B,
    SQ,
    AC,
    AS,
    BC,
    BS,
    N,
    K,
    R,
    stride_wn,
    stride_wk,
    s,
    NPROG_N,
    SPLIT,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Σ_k (w + s·BA)² over one of SPLIT slices of K, for BLOCK_N rows, one pass over that slice of
    W0, and A, s·A, B, s·B in W0's dtype (what the products of the step use). Grid (NPROG_N, SPLIT):
    program (i, j) takes rows i·BLOCK_N… and the K tiles t ≡ j (mod SPLIT), and writes SQ[j, rows].

    Each (BLOCK_N, BLOCK_K) tile of W0 + s·BA is formed in registers (BA from float32 A and B through
    three tf32 passes on the tensor cores, float32-accurate) and squared there: the dense matrix
    never reaches memory, and there is no cancellation as in the factored ||w||² + 2s·(W0Aᵀ ⊙ B)
    + s²·(BAAᵀ ⊙ B). Splitting K fills the GPU when W0 has few row blocks. Each tile of the A copies
    is written by one program (spread over the row blocks), each row of the B copies by slice 0.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    r_copy = R * (pid_k == 0).to(tl.int32)  # slice 0 writes B's copies
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        b_in = (rn[:, None] < N) & (rr[None, :] < R)
        b = tl.load(B + rn[:, None] * R + rr[None, :], mask=b_in, other=0.0).to(tl.float32)  # (BN, BR)
        b_mask = (rn[:, None] < N) & (rr[None, :] < r_copy)
        tl.store(BC + rn[:, None] * R + rr[None, :], b.to(BC.dtype.element_ty), mask=b_mask)
        tl.store(BS + rn[:, None] * R + rr[None, :], (b * s).to(BS.dtype.element_ty), mask=b_mask)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT * BLOCK_K):  # this slice's tiles of W0, one pass
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mine = (((k0 // BLOCK_K) // SPLIT) % NPROG_N == pid).to(tl.int32) * K  # this program writes A's tile
        ba = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for r0 in range(0, R, BLOCK_R):  # BA over the rank, BLOCK_R at a time: no (out, in) temporary
            rr = r0 + tl.arange(0, BLOCK_R)
            b_in = (rn[:, None] < N) & (rr[None, :] < R)
            b = tl.load(B + rn[:, None] * R + rr[None, :], mask=b_in, other=0.0).to(tl.float32)  # (BN, BR)
            a = tl.load(
                A + rr[:, None] * K + rk[None, :], mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0
            ).to(tl.float32)  # (BR, BK)
            a_mask = (rr[:, None] < R) & (rk[None, :] < k_mine)
            tl.store(AC + rr[:, None] * K + rk[None, :], a.to(AC.dtype.element_ty), mask=a_mask)
            tl.store(AS + rr[:, None] * K + rk[None, :], (a * s).to(AS.dtype.element_ty), mask=a_mask)
            ba += tl.dot(b, a, input_precision="tf32x3")
        w = tl.load(
            W + rn[:, None] * stride_wn + rk[None, :] * stride_wk,
            mask=(rn[:, None] < N) & (rk[None, :] < K),
            other=0.0,
        ).to(tl.float32)  # (BN, BK)
        v = (w + s * ba).to(tl.float32)  # W0 + sBA (s may come as fp64)
        acc += v * v
    tl.store(SQ + pid_k * N + rn, tl.sum(acc, axis=1), mask=rn < N)


@triton.jit
def _load_norm(SQ, rn, N, SPLIT, tiny):
    """n = sqrt(max(Σ_j SQ[j, rn], tiny)) for the columns rn, summed in slice order and correctly
    rounded, as norm_from_partials (NaN stays NaN; columns rn ≥ N get sqrt(SPLIT), unused)."""
    sq = tl.zeros(rn.shape, tl.float32)
    for j in range(SPLIT):
        sq += tl.load(SQ + j * N + rn, mask=rn < N, other=1.0)
    floor = tl.cast(tiny, tl.float32)  # tiny may come as fp64 (inductor)
    return tl.sqrt_rn(tl.where(sq < floor, floor, sq))


@triton.jit
def _copies_kernel(A, B, AC, AS, BC, BS, N, K, R, s, NPROG, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_R: tl.constexpr):
    """A, s·A, B, s·B in the output dtype (LoRA's _prepare_kernel: no norm), as _prepare_kernel writes them."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        b_mask = (rn[:, None] < N) & (rr[None, :] < R)
        b = tl.load(B + rn[:, None] * R + rr[None, :], mask=b_mask, other=0.0).to(tl.float32)
        tl.store(BC + rn[:, None] * R + rr[None, :], b.to(BC.dtype.element_ty), mask=b_mask)
        tl.store(BS + rn[:, None] * R + rr[None, :], (b * s).to(BS.dtype.element_ty), mask=b_mask)
        for k0 in range(pid * BLOCK_K, K, NPROG * BLOCK_K):  # A's tiles, spread over the programs
            rk = k0 + tl.arange(0, BLOCK_K)
            a_mask = (rr[:, None] < R) & (rk[None, :] < K)
            a = tl.load(A + rr[:, None] * K + rk[None, :], mask=a_mask, other=0.0).to(tl.float32)
            tl.store(AC + rr[:, None] * K + rk[None, :], a.to(AC.dtype.element_ty), mask=a_mask)
            tl.store(AS + rr[:, None] * K + rk[None, :], (a * s).to(AS.dtype.element_ty), mask=a_mask)


PREPARE_CONFIG = {"block_n": 32, "block_k": 64, "num_warps": 4, "num_stages": 3, "programs": 528}
"""Launch settings of _prepare_kernel: K is split into as many slices (at most one per tile) as it
takes to launch about ``programs`` programs (4 per multiprocessor of an H100). The fastest summed
over the LLaMA-1B / 8B projection shapes at r = 16 in a sweep on an H100 with a bf16 W0
(benchmarks/bench_kernels.py prints what it reaches); a float32 W0 takes it unmeasured. Larger
ranks take a narrower block_k (prepare_config), so that the pipelined fp32 tiles of A fit in
shared memory."""

MAX_SPLIT = 64
"""Slices of K at most: the epilogue kernels sum this many partial norms per column."""

MAX_A_TILE = 4096
"""BLOCK_R × BLOCK_K at most: the norm kernel then needs at most 64 KB of shared memory (bf16 or fp32
W0, a rank tile of 128, 3 stages; the sm_86 test compiles it), under the 99 KB of an sm_86 GPU."""


def prepare_config(rank: int) -> dict[str, int]:
    """PREPARE_CONFIG, with block_k narrowed for ranks above 16."""
    cfg = dict(PREPARE_CONFIG)
    cfg["block_k"] = min(cfg["block_k"], max(16, MAX_A_TILE // _block_r(rank)))
    return cfg


def partial_rows(N: int, K: int, R: int, config: dict | None = None) -> int:
    """S, the slices of K that dora_prepare splits the norm's sums over (the rows of its partials)."""
    cfg = config or prepare_config(R)
    nprog = triton.cdiv(N, cfg["block_n"])
    return max(1, min(triton.cdiv(K, cfg["block_k"]), triton.cdiv(cfg["programs"], nprog), MAX_SPLIT))


def _copy_buffers(lora_A: Tensor, lora_B: Tensor, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """A and B contiguous, and the empty (R, K), (R, K), (N, R), (N, R) outputs for their copies in ``dtype``."""
    A, B = lora_A.contiguous(), lora_B.contiguous()
    (R, K), N = A.shape, B.shape[0]
    a_c, a_s = (torch.empty((R, K), device=A.device, dtype=dtype) for _ in range(2))
    b_c, b_s = (torch.empty((N, R), device=A.device, dtype=dtype) for _ in range(2))
    return A, B, a_c, a_s, b_c, b_s


def dora_prepare(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, config: dict | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(Σ (W0 + sBA)² as (S, N) float32 partial sums over S slices of K, and A, s·A (R, K), B, s·B
    (N, R) in W0's dtype), one launch.

    The partial sums are what dora_linear's Function takes for "triton" (its kernels finish the norm:
    n = sqrt(max(Σ_s, tiny)); norm_from_partials does it in torch). ``config`` overrides the launch
    settings (benchmarks, tests).
    """
    N, K = weight.shape
    R = lora_A.shape[0]
    cfg = config or prepare_config(R)
    A, B, a_c, a_s, b_c, b_s = _copy_buffers(lora_A, lora_B, weight.dtype)
    block_n, block_k = cfg["block_n"], cfg["block_k"]
    nprog = triton.cdiv(N, block_n)
    split = partial_rows(N, K, R, cfg)
    partials = torch.empty((split, N), device=weight.device, dtype=torch.float32)
    _prepare_kernel[(nprog, split)](
        weight,
        A,
        B,
        partials,
        a_c,
        a_s,
        b_c,
        b_s,
        N,
        K,
        R,
        weight.stride(0),
        weight.stride(1),
        scaling,
        nprog,
        split,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BLOCK_R=_block_r(R),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return partials, a_c, a_s, b_c, b_s


def norm_from_partials(partials: Tensor) -> Tensor:
    """||W0 + sBA||_c (N,) float32 from dora_prepare's (S, N) partial sums, as the kernels finish it."""
    total = partials[0].clone()
    for j in range(1, partials.shape[0]):  # slice order, as _load_norm
        total += partials[j]
    return total.clamp_min_(TINY).sqrt_()


def lora_prepare(lora_A: Tensor, lora_B: Tensor, scaling: float, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """(A, s·A (R, K), B, s·B (N, R)) in ``dtype``, one launch (LoRA: no norm)."""
    (N, R), K = lora_B.shape, lora_A.shape[1]
    A, B, a_c, a_s, b_c, b_s = _copy_buffers(lora_A, lora_B, dtype)
    cfg = prepare_config(R)
    nprog = triton.cdiv(N, cfg["block_n"])
    _copies_kernel[(nprog,)](
        A,
        B,
        a_c,
        a_s,
        b_c,
        b_s,
        N,
        K,
        R,
        scaling,
        nprog,
        BLOCK_N=cfg["block_n"],
        BLOCK_K=cfg["block_k"],
        BLOCK_R=_block_r(R),
        num_warps=cfg["num_warps"],
    )
    return a_c, a_s, b_c, b_s


@triton.jit
def _forward_kernel(
    BASE,
    H,
    B,
    MAG,
    SQ,
    BIAS,
    Y,
    M,
    N,
    R,
    SPLIT,
    tiny,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """y = (m / n) ⊙ (base + h Bᵀ) + b on one (BLOCK_M, BLOCK_N) tile; base = x W0ᵀ, h = s·x Aᵀ, and n
    from the (SPLIT, N) partial sums SQ of dora_prepare."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    lora = _lora_tile(H, B, rm, rn, M, N, R, IEEE, BLOCK_M, BLOCK_N, BLOCK_R)  # (BM, BN) fp32
    base = tl.load(BASE + rm[:, None] * N + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(MAG + rn, mask=rn < N, other=0.0).to(tl.float32) / _load_norm(SQ, rn, N, SPLIT, tiny)
    y = g[None, :] * (base + lora)
    if HAS_BIAS:
        y += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None] * N + rn[None, :], y.to(Y.dtype.element_ty), mask=mask)


def dora_forward(
    base: Tensor, h: Tensor, lora_B: Tensor, magnitude: Tensor, partials: Tensor, bias: Tensor | None
) -> Tensor:
    """The fused forward epilogue: (M, N) in base's dtype. h = s·x Aᵀ (M, R) and B (N, R) in base's
    dtype; ``partials``: dora_prepare's (S, N) sums of squares."""
    M, N = base.shape
    R = h.shape[1]
    y = torch.empty_like(base)
    grid = (triton.cdiv(M, 64), triton.cdiv(N, 128))
    _forward_kernel[grid](
        base,
        h,
        lora_B,
        magnitude,
        partials,
        bias if bias is not None else base,
        y,
        M,
        N,
        R,
        partials.shape[0],
        TINY,
        HAS_BIAS=bias is not None,
        IEEE=base.dtype == torch.float32,
        BLOCK_M=64,
        BLOCK_N=128,
        BLOCK_R=_block_r(R),
        num_warps=4,
    )
    return y


@triton.jit
def _backward_kernel(
    DY,
    Y,
    BIAS,
    MAG,
    SQ,
    X,
    W,
    H,
    B,
    DYP,
    GM,
    M,
    N,
    K,
    R,
    stride_wn,
    stride_wk,
    SPLIT,
    tiny,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """dy' = g ⊙ dy and this tile's share of ∂L/∂m = Σ_rows dy ⊙ y_pre / n, with y_pre = (y − b) / g.

    y_pre is recovered from the saved output y wherever m ≠ 0. Where a column of the tile has m = 0
    (y carries no information there) the tile's y_pre is recomputed from x, W0, h = s·x Aᵀ and B, so
    the gradient is exact for every m, with no host sync.
    """
    pid_m = tl.program_id(0)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    mag = tl.load(MAG + rn, mask=rn < N, other=1.0).to(tl.float32)
    norm = _load_norm(SQ, rn, N, SPLIT, tiny)
    dy = tl.load(DY + rm[:, None] * N + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(
        DYP + rm[:, None] * N + rn[None, :], ((mag / norm)[None, :] * dy).to(DYP.dtype.element_ty), mask=mask
    )
    y = tl.load(Y + rm[:, None] * N + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y -= tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    zero = mag == 0.0
    y_over_n = y / tl.where(zero, 1.0, mag)[None, :]  # (y − b) / m = y_pre / n
    if tl.max(zero.to(tl.int32), axis=0) > 0:  # rare: recompute y_pre on this tile
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                X + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0
            )
            w = tl.load(
                W + rn[:, None] * stride_wn + rk[None, :] * stride_wk,
                mask=(rn[:, None] < N) & (rk[None, :] < K),
                other=0.0,
            )
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        base = acc.to(Y.dtype.element_ty).to(tl.float32)  # x W0ᵀ rounded as the forward's was
        lora = _lora_tile(H, B, rm, rn, M, N, R, IEEE, BLOCK_M, BLOCK_N, BLOCK_R)
        y_over_n = tl.where(zero[None, :], (base + lora) / norm[None, :], y_over_n)
    tl.store(GM + pid_m * N + rn, tl.sum(dy * y_over_n, axis=0), mask=rn < N)


def dora_backward(
    dy: Tensor,
    y: Tensor,
    bias: Tensor | None,
    magnitude: Tensor,
    partials: Tensor,
    x: Tensor,
    weight: Tensor,
    h: Tensor,
    lora_B: Tensor,
) -> tuple[Tensor, Tensor]:
    """(g ⊙ dy (M, N) in dy's dtype, ∂L/∂m (N,) float32) from the saved output y (M, N) and dora_prepare's
    (S, N) ``partials``."""
    M, N = dy.shape
    K, R = x.shape[1], h.shape[1]
    dyp = torch.empty_like(dy)
    block_m = 64
    partial = torch.empty((triton.cdiv(M, block_m), N), device=dy.device, dtype=torch.float32)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, 64))
    _backward_kernel[grid](
        dy,
        y,
        bias if bias is not None else y,
        magnitude,
        partials,
        x,
        weight,
        h,
        lora_B,
        dyp,
        partial,
        M,
        N,
        K,
        R,
        weight.stride(0),
        weight.stride(1),
        partials.shape[0],
        TINY,
        HAS_BIAS=bias is not None,
        IEEE=dy.dtype == torch.float32,
        BLOCK_M=block_m,
        BLOCK_N=64,
        BLOCK_K=32,
        BLOCK_R=_block_r(R),
        num_warps=4,
    )
    return dyp, partial.sum(dim=0)
