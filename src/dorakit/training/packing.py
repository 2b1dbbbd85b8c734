"""Sequence packing (``dorakit finetune --pack``): short examples share a row of up to ``max_len`` tokens.

Each row concatenates whole examples (first-fit decreasing by length, so rows are nearly full); a
batch right-pads its rows to the longest. Attention never crosses examples: each row gets
``position_ids`` that restart at 0 for every example (so RoPE sees the positions it would see alone)
and a 4D block-diagonal causal ``attention_mask`` of shape (B, 1, T, T), True / 0.0 where token q may
attend to token k (same example, k <= q). The first label of every example is ``IGNORE_INDEX``, so
the last token of one example is never trained to predict the first token of the next. Packed and
unpacked batches of the same examples therefore have the same logits and the same loss (float tolerance).

Why an explicit mask: transformers 5 also detects packing from ``position_ids`` alone, but only
when ``attention_mask`` is None *and* no KV cache exists; a LLaMA with ``use_cache=True`` in its
config (the default) builds a cache even in training, and then examples attend to each other
silently. The 4D mask isolates examples under the ``sdpa`` and ``eager`` attention implementations;
others (flash-attention, flex) take no 4D mask and are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .data import IGNORE_INDEX, CausalExample, DataError

MaskKind = Literal["bool", "additive"]
MASK_KINDS: dict[str, MaskKind] = {"sdpa": "bool", "eager": "additive"}


def pack_examples(examples: Sequence[CausalExample], max_len: int) -> list[list[int]]:
    """Rows of example indices, each row's lengths summing to at most ``max_len`` (first-fit decreasing).

    Deterministic: longest first (ties by index), each into the first row it fits, else a new row.
    """
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise DataError(f"max_len (--max-len) must be a positive integer, got {max_len!r}; e.g. --max-len 256.")
    too_long = [i for i, ex in enumerate(examples) if len(ex.input_ids) > max_len]
    if too_long:
        raise DataError(f"examples {too_long[:5]} are longer than max_len {max_len}; truncate them first.")
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        slot = next((r for r, free in enumerate(room) if free >= n), None)
        if slot is None:
            rows.append([i])
            room.append(max_len - n)
        else:
            rows[slot].append(i)
            room[slot] -= n
    return rows


def collate_packed(rows: Sequence[Sequence[CausalExample]], pad_id: int, mask: MaskKind = "bool",
                   dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """A batch of packed rows: ``input_ids``, ``labels``, ``position_ids`` (B, T) and ``attention_mask``
    (B, 1, T, T): bool (True = attend) for sdpa, or additive (0 / finfo(dtype).min) for eager attention.

    Padding after a row's last example is its own segment (it attends only to itself), label IGNORE_INDEX.
    """
    if not rows or any(not row for row in rows):
        raise ValueError("collate_packed needs at least one row, each of at least one example.")
    width = max(sum(len(ex.input_ids) for ex in row) for row in rows)
    b = len(rows)
    ids = torch.full((b, width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((b, width), dtype=torch.long)
    segment = torch.full((b, width), -1, dtype=torch.long)  # -1: padding
    for r, row in enumerate(rows):
        at = 0
        for s, ex in enumerate(row):
            n = len(ex.input_ids)
            ids[r, at:at + n] = torch.tensor(ex.input_ids, dtype=torch.long)
            labels[r, at + 1:at + n] = torch.tensor(ex.labels[1:], dtype=torch.long)  # first: never a target
            positions[r, at:at + n] = torch.arange(n)
            segment[r, at:at + n] = s
            at += n
        positions[r, at:] = torch.arange(width - at)
    causal = torch.ones((width, width), dtype=torch.bool).tril()  # (T, T): k <= q
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal  # (B, T, T)
    allowed = allowed[:, None]  # (B, 1, T, T)
    if mask == "additive":
        attention = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    elif mask == "bool":
        attention = allowed
    else:
        raise ValueError(f"mask must be 'bool' or 'additive', got {mask!r}.")
    return {"input_ids": ids, "attention_mask": attention, "position_ids": positions, "labels": labels}


def mask_kind(model: nn.Module) -> MaskKind:
    """The 4D mask a transformers model's attention implementation takes; an error where isolation is not possible."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl not in MASK_KINDS:
        raise DataError(f"--pack needs the model's attention to take a 4D block-diagonal mask (attn_implementation "
                        f"'sdpa' or 'eager'); this model uses {impl!r}, under which packed examples could attend to "
                        "each other. Load it with attn_implementation='sdpa', or drop --pack.")
    return MASK_KINDS[impl]


def packed_batches(examples: Sequence[CausalExample], max_len: int, pad_id: int, model: nn.Module
                   ) -> tuple[Callable[[list[int]], dict[str, Tensor]], int, Callable[[list[int]], int], Any]:
    """(make_batch over row indices, number of rows, input tokens of some rows, the rows) for the loop."""
    kind = mask_kind(model)
    rows = [[examples[i] for i in row] for row in pack_examples(examples, max_len)]
    sizes = [sum(len(ex.input_ids) for ex in row) for row in rows]

    def make_batch(idx: list[int]) -> dict[str, Tensor]:
        return collate_packed([rows[i] for i in idx], pad_id, kind)

    def tokens(idx: list[int]) -> int:
        return sum(sizes[i] for i in idx)
    return make_batch, len(rows), tokens, rows
