"""The fast forward of a mixed-adapter batch at inference: one base product for every row, the low-rank
products gathered by adapter, DoRA's per-row scale in the epilogue.

For batch row b running adapter i (or none), with s_i, A_i (r_i, in), B_i (out, r_i) and

    g_i = m_i / ||W0 + s_i B_i A_i||_c   (DoRA, DVoRA)     g_i = m_i / ||W0||_c   (magnitude-only)
    g_i = 1                              (LoRA, VeRA, no adapter; no adapter has A_i = B_i = 0)

every token row of b gets  y = g_i ⊙ (x W0ᵀ + s_i·x A_iᵀ B_iᵀ) + bias  (paper Eq. 5 with the bias outside the
scale), which is each adapter's own eval-mode forward. x W0ᵀ is computed once for the whole batch
(instead of once per adapter group, as the reference routing in slots.py does).

Two implementations, chosen per call by ``GatherPath._gather_impl`` (explicit, never a silent swap):

* ``"torch"``: rows grouped by adapter: for each adapter present, h = x_rows (s_i A_i)ᵀ and
  x_rows W0ᵀ += h B_iᵀ (index_add), then one gathered multiply by g[seg] and the bias. Any device
  and float dtype; float64 on CPU is the reference the tests hold it to.
* ``"triton"``: kernels/triton_gather.py, the gathered (BGMV / SGMV) low-rank product and the epilogue
  in two launches, over a pack of every adapter padded to the largest rank (zeros add nothing). Calls
  of at most DECODE_MAX_ROWS rows take kernels/triton_decode.py instead where ``_decode_allowed`` says so
  (backend "triton"; "auto" once fast_path.DECODE_AUTO is set): the base product too, in one launch.

The pack (s_i A_i, B_i, g_i of every adapter on the module) is rebuilt on every call, except inside
``dk.cached_norms(model)`` where it is kept while a key of every tensor it reads (version counters,
storages, s_i) holds, and dropped on entry, exit, ``train()`` / ``eval()`` and any optimizer step
(the same contract as the single adapter's norm cache, fast_path.cached_norms).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .fast_path import _autocast_dtype, _has_hooks
from .kernels import DECODE_MAX_ROWS, triton_available, triton_interpreted

GATHER_MAX_RANK = 128
"""The largest rank the gathered Triton kernels take (kernels/triton_gather.py); above it "auto" runs the
torch path and an explicit "triton" runs each group through its adapter's own Triton path."""


class AdapterPack(NamedTuple):
    """Every adapter of one module, stacked; slot ``len(names)`` is "no adapter" (zeros, g = 1)."""

    names: tuple[str, ...]
    ranks: tuple[int, ...]
    """r_i of each slot (0 for magnitude-only and for the empty slot)."""
    a: Tensor
    """s_i·A_i, (n + 1, R, in), zero-padded to the largest rank R, in the layer's dtype."""
    b: Tensor
    """B_i, (n + 1, out, R), zero-padded, in the layer's dtype."""
    g: Tensor
    """g_i, (n + 1, out), in the accumulation dtype (float32; float64 for float64 layers)."""


class GatherPath:
    """Mixin of the adapter wrappers (via slots.MultiAdapter): the mixed batch's gathered forward."""

    supports_gather: bool = False
    """Whether this layer type (x (..., in) -> (..., out), one W0 product) has the gathered forward."""
    _gather_cache: tuple[tuple, AdapterPack] | None = None
    _seg_cache: tuple[object, tuple[str, ...], torch.device, Tensor, list[tuple[int, Tensor]]] | None = None

    def _gather_impl(self, x: Tensor) -> str | None:
        """"triton" / "torch" for this routed call, or None for the reference routing (slots.py).

        The gathered forward serves inference only: eval mode, no grad, no autocast, x in W0's dtype, no
        hooks on the base layer, not while torch.compile traces. backend "torch" always takes the
        reference routing; "auto" takes the Triton kernel on CUDA (triton installed, rank <= 128), else the
        torch path; "triton" takes the kernel (also under TRITON_INTERPRET=1), else the reference routing
        (each group through its adapter's own Triton path); "fused" takes the torch path."""
        if not self.supports_gather or self.backend == "torch" or self.training or torch.is_grad_enabled():
            return None
        weight = self.base_layer.weight
        if (torch.compiler.is_compiling() or _autocast_dtype(x) is not None or x.dtype != weight.dtype
                or not x.is_floating_point() or x.dim() < 2 or x.numel() == 0 or _has_hooks(self.base_layer)):
            return None
        kernel = (triton_available() and self._max_rank() <= GATHER_MAX_RANK
                  and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
                  and (x.is_cuda or (self.backend == "triton" and triton_interpreted())))
        if self.backend == "triton":  # asked for: the kernel, or each group through its own Triton path
            return "triton" if kernel else None
        return "triton" if kernel and self.backend == "auto" else "torch"

    def _max_rank(self) -> int:
        return max([self.rank, *(slot.rank for slot in self.slots().values())])

    # ---- the pack --------------------------------------------------------------------------------
    def _pack_key(self, dtype: torch.dtype) -> tuple:
        """Everything the pack reads: W0's storage and version, each adapter's tensors and s."""
        weight = self.base_layer.weight  # the parameters' dicts, not parameters(): this runs on every decode call
        own = tuple((p._version, p.data_ptr()) for p in self._parameters.values() if p is not None)
        slots = tuple((name, slot.scaling, tuple((p._version, p.data_ptr()) for p in slot._parameters.values()
                                                 if p is not None))
                      for name, slot in self.slots().items())
        return (dtype, self._cache_key(weight), self.adapter_name, self.scaling, own, slots)

    def _pack(self, dtype: torch.dtype) -> AdapterPack:
        """The pack for this call: cached only inside cached_norms() (see _may_cache_pack)."""
        if not self._may_cache_pack():
            return self._build_pack(dtype)
        key = self._pack_key(dtype)
        if self._gather_cache is not None and self._gather_cache[0] == key:
            return self._gather_cache[1]
        pack = self._build_pack(dtype)
        self._gather_cache = (key, pack)
        return pack

    def _may_cache_pack(self) -> bool:
        return self._cache_depth > 0 and self.cache_norm and not self.training and not torch.is_grad_enabled()

    @torch.no_grad()
    def _build_pack(self, dtype: torch.dtype) -> AdapterPack:
        names = tuple(self.hosted_names())
        out_features, in_features = self.weight_2d().shape
        parts = []
        for name in names:
            with self.bound(name):
                parts.append(self._pack_part(dtype))
        R = max(1, *(r for r, _, _, _ in parts))
        device = self.base_layer.weight.device
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        a = torch.zeros((len(names) + 1, R, in_features), device=device, dtype=dtype)
        b = torch.zeros((len(names) + 1, out_features, R), device=device, dtype=dtype)
        g = torch.ones((len(names) + 1, out_features), device=device, dtype=acc)
        for i, (r, a_s, b_i, g_i) in enumerate(parts):
            if r:
                a[i, :r], b[i, :, :r] = a_s, b_i
            if g_i is not None:
                g[i] = g_i
        return AdapterPack(names, (*(r for r, _, _, _ in parts), 0), a, b, g)

    def _pack_part(self, dtype: torch.dtype) -> tuple[int, Tensor | None, Tensor | None, Tensor | None]:
        """(r, s·A (r, in), B (out, r) in ``dtype``, g (out,) or None for g = 1) of the bound adapter."""
        g = None if self.variant == "lora" else self.dora_scale()
        if self.variant == "magnitude":
            return 0, None, None, g
        A, B = self.lora_A_2d(), self.lora_B_2d()
        return A.shape[0], (A * self.scaling).to(dtype), B.to(dtype), g

    # ---- the rows --------------------------------------------------------------------------------
    def _segments(self, names: tuple[str, ...],
                  device: torch.device) -> tuple[Tensor, list[tuple[int, Tensor]]]:
        """(seg (Bt,) int32: each batch row's pack slot, [(slot, its rows on ``device``)] for the adapters
        present), kept for the routing in force (set_route), so a decode loop builds them once."""
        cached = self._seg_cache
        if cached is not None and cached[0] is self._route and cached[1] == names and cached[2] == device:
            return cached[3], cached[4]
        slot_of = {name: i for i, name in enumerate(names)}
        seg = torch.full((self._route_rows,), len(names), dtype=torch.int32)
        groups = []
        for name, rows in self._route.items():
            slot = slot_of.get(name, len(names))
            seg[rows] = slot
            if slot < len(names):
                groups.append((slot, rows.to(device)))
        seg = seg.to(device)
        self._seg_cache = (self._route, names, device, seg, groups)
        return seg, groups

    def _gathered_forward(self, x: Tensor, impl: str) -> Tensor:
        """y = g_seg ⊙ (x W0ᵀ + s·x Aᵀ Bᵀ) + bias, each batch row through its own adapter (module doc)."""
        pack = self._pack(x.dtype)
        seg, groups = self._segments(pack.names, x.device)
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])                              # (Bt, T, in)
        bias = getattr(self.base_layer, "bias", None)
        rows = x3.shape[0] * x3.shape[1]
        if impl == "triton" and rows <= DECODE_MAX_ROWS and self._decode_allowed(x, self._max_rank()):
            from .kernels.triton_decode import decode_linear  # one launch: base, every row's adapter, scale, bias

            row_seg = seg if x3.shape[1] == 1 else seg.repeat_interleave(x3.shape[1])
            y = decode_linear(x3.reshape(rows, -1).contiguous(), self.weight_2d(), pack.a, pack.b,
                              pack.g.float(), bias, row_seg)
            return y.view(*x.shape[:-1], y.shape[-1])
        base = self._base(x3)                                                    # (Bt, T, out)
        if impl == "triton":
            from .kernels.triton_gather import gathered_linear

            y = gathered_linear(x3, base, pack.a, pack.b, pack.g.float(), seg, bias)
        else:
            y = gathered_torch(x3, base, pack, seg, groups, bias)
        return y.view(*x.shape[:-1], y.shape[-1])


def gathered_torch(x3: Tensor, base: Tensor, pack: AdapterPack, seg: Tensor, groups: list[tuple[int, Tensor]],
                   bias: Tensor | None) -> Tensor:
    """The torch path: rows grouped by adapter, then y = g[seg] ⊙ y_pre + bias; (Bt, T, out) in x's dtype."""
    y = base.clone()                                                             # y_pre, (Bt, T, out)
    for slot, rows in groups:
        r = pack.ranks[slot]
        if r:
            h = F.linear(x3.index_select(0, rows), pack.a[slot, :r])              # (n_i, T, r) = s·x Aᵀ
            y.index_add_(0, rows, F.linear(h, pack.b[slot, :, :r]))             # += s·x Aᵀ Bᵀ
    g = pack.g.to(y.dtype).index_select(0, seg.long())                            # (Bt, out)
    y = y * g.unsqueeze(1)
    return y if bias is None else y + bias.to(y.dtype)
