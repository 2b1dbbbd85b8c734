"""The training micro-step (forward + backward) captured in a CUDA graph and replayed.

The eager GPU step of an adapted LLM is host-bound: a LLaMA-1B step launches thousands of small
kernels from Python, and the GPU waits for them. A CUDA graph records the step's kernels once and
launches them all with one call. ``train(TrainConfig(cuda_graph=True))`` uses :class:`GraphedMicroStep`:

* a graph needs fixed shapes, so each micro-batch's sequences are right-padded (``pad_to_width``)
  to a bucket width (``padded_width``: a multiple of 64 tokens, of 1/16 of the next power of two
  above 1024, so at most 12.5% padding there): padded positions carry attention mask 0 and label
  IGNORE_INDEX, so the loss and the gradients are those of the unpadded batch (up to rounding: the
  products run on other shapes). Each width is captured once, when first seen; all graphs share
  one memory pool (they replay one at a time), so memory is that of the widest, not the sum. A
  micro-batch with fewer rows (the last of an epoch) runs eagerly.
* the loss weight (the micro-batch's share of the step's items) is a device tensor the graph
  reads, and the gradients accumulate into ``.grad`` tensors that are allocated before the capture
  and only ever zeroed in place afterwards (``optimizer.zero_grad(set_to_none=False)``).
* the capture recipe warms up on a side stream first; those warm-up passes run with loss weight
  0, so they add exact zeros to the gradients, and the CUDA RNG state is put back after them (their
  dropout draws), so a run's random stream does not depend on when its graphs were captured (a
  resumed run captures again and continues the same stream). Parameters the warm-up did not reach
  get their ``.grad`` back as None, so AdamW skips them as in eager training.
* the optimizer step (clipping, AdamW, the LR schedule, the fp16 scaler's step) stays eager.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, suppress

import torch
from torch import Tensor, nn

WIDTH_MULTIPLE = 64
"""Padded sequence widths are multiples of this (and of 1/16 of the next power of two above 1024 tokens)."""

WARMUP_PASSES = 2
"""Passes on a side stream before a capture (lazy initialisation of cuBLAS, Triton, autograd)."""


class GraphCaptureError(RuntimeError):
    """The model's forward or backward cannot be recorded in a CUDA graph."""


def padded_width(length: int) -> int:
    """The bucket a batch whose longest sequence has ``length`` tokens is padded to: a multiple of
    WIDTH_MULTIPLE, and of 1/16 of the next power of two (so above 1024 tokens at most 12.5% is padding,
    with 8 buckets per doubling of the length)."""
    step = max(WIDTH_MULTIPLE, (1 << max(0, length - 1).bit_length()) // 16)
    return -(-length // step) * step


def pad_to_width(batch: Mapping[str, Tensor], width: int, pad_values: Mapping[str, int]) -> dict[str, Tensor]:
    """``batch`` with each tensor named in ``pad_values`` right-padded along dim 1 to ``width`` with its
    value (e.g. input_ids: the pad id, attention_mask: 0, labels: IGNORE_INDEX); others unchanged.

    Every (batch, length, ...) tensor of ``batch`` must be named (one left at its length would not fit
    the padded ones), and padding needs an attention_mask in the batch (without one an encoder would
    attend to the pad tokens)."""
    if "input_ids" not in batch:
        raise ValueError(f"a CUDA-graph micro-batch needs input_ids (to read the sequence length); it has "
                         f"{sorted(batch)}.")
    rows, length = batch["input_ids"].shape[:2]
    if width < length:
        raise ValueError(f"cannot pad sequences of {length} tokens to a width of {width}.")
    unnamed = sorted(k for k, v in batch.items() if k not in pad_values and v.dim() >= 2
                     and tuple(v.shape[:2]) == (rows, length))
    if unnamed:
        raise ValueError(f"the batch's {unnamed} have the sequence length of input_ids but no pad value; add them to "
                         "pad_values (e.g. position_ids: 0, token_type_ids: 0).")
    if width > length and "attention_mask" not in batch:
        raise ValueError("padding a CUDA-graph micro-batch needs an attention_mask in the batch (so the model ignores "
                         "the pad tokens); have make_batch return one.")
    out = dict(batch)
    for key, value in pad_values.items():
        if key not in batch:
            continue
        tensor = batch[key]
        if tensor.dim() < 2 or tensor.shape[1] != length:
            raise ValueError(f"pad_values names {key!r}, but its shape {tuple(tensor.shape)} is not (batch, "
                             f"{length}, ...) like input_ids; leave it out of pad_values.")
        if width > length:
            pad = tensor.new_full((tensor.shape[0], width - length, *tensor.shape[2:]), value)
            out[key] = torch.cat([tensor, pad], dim=1)
    return out


def _signature(batch: Mapping[str, Tensor]) -> tuple[tuple[str, tuple[int, ...], torch.dtype], ...]:
    return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items()))


@contextmanager
def _rng_kept(device: torch.device) -> Iterator[None]:
    """Puts the CUDA RNG state of ``device`` back as it was on entry."""
    state = torch.cuda.get_rng_state(device)
    try:
        yield
    finally:
        torch.cuda.set_rng_state(state, device)


def _end_failed_capture(device: torch.device) -> None:
    """After a capture that failed, capture and drop a one-kernel graph: a failed capture leaves the CUDA
    RNG believing it is still capturing (every later random op would raise), and a capture that ends
    normally resets it."""
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.zeros(1, device=device).add_(1)
    del graph


class GraphedMicroStep:
    """Forward + backward of one micro-batch of ``rows`` examples, replayed from a CUDA graph.

    ``step(batch, weight)`` pads ``batch`` (CPU or device tensors), copies it into the graph's
    static inputs, sets the loss weight and replays; the gradients of ``loss × weight`` are added to
    ``.grad``. It returns the unweighted loss as a device tensor that the next call overwrites.
    ``fits(batch)`` says whether a batch can run here (its row count is ``rows``).
    """

    def __init__(self, model: nn.Module, params: list[Tensor], rows: int, pad_values: Mapping[str, int],
                 amp: Callable[[], AbstractContextManager], scaler: torch.amp.GradScaler | None,
                 device: torch.device, max_width: int | None = None) -> None:
        if "input_ids" not in pad_values:
            raise ValueError("pad_values must name input_ids (the pad token id to pad it with).")
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}; drop cuda_graph.")
        self.model, self.params, self.rows, self.pad_values = model, params, rows, dict(pad_values)
        self.max_width = max_width
        """A batch no longer than this is padded to at most this (a model's learned position limit)."""
        self.amp, self.scaler, self.device = amp, scaler, device
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, Tensor], Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()  # shared: the graphs replay one at a time
        self._weight = torch.zeros((), device=device, dtype=torch.float32)

    @property
    def captures(self) -> int:
        """Graphs captured so far (one per padded width)."""
        return len(self._graphs)

    def fits(self, batch: Mapping[str, Tensor]) -> bool:
        return batch["input_ids"].shape[0] == self.rows

    def __call__(self, batch: Mapping[str, Tensor], weight: float) -> Tensor:
        length = batch["input_ids"].shape[1]
        width = padded_width(length)
        if self.max_width is not None and length <= self.max_width:
            width = min(width, self.max_width)
        padded = pad_to_width(batch, width, self.pad_values)
        key = _signature(padded)
        if key not in self._graphs:
            self._graphs[key] = self._capture(padded)
        graph, static, loss = self._graphs[key]
        for name, tensor in padded.items():
            static[name].copy_(tensor, non_blocking=True)
        self._weight.fill_(weight)
        graph.replay()
        return loss

    def _pass(self, static: Mapping[str, Tensor]) -> Tensor:
        with self.amp():
            loss = self.model(**static).loss
            weighted = loss * self._weight
        (self.scaler.scale(weighted) if self.scaler is not None else weighted).backward()
        return loss.detach()

    def _capture(self, batch: Mapping[str, Tensor]) -> tuple[torch.cuda.CUDAGraph, dict[str, Tensor], Tensor]:
        """(the graph, its static inputs, its loss output) for batches shaped like ``batch``."""
        static = {k: v.to(self.device, copy=True) for k, v in batch.items()}
        created = [p for p in self.params if p.grad is None]
        for p in created:  # the graph adds into these tensors; they are only zeroed in place from now on
            p.grad = torch.zeros_like(p)
        versions = [p.grad._version for p in created]
        self._weight.zero_()  # the warm-up passes add exact zeros to the gradients
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with _rng_kept(self.device), torch.cuda.stream(side):  # ... and draw dropout masks: not from the run's stream
            for _ in range(WARMUP_PASSES):
                self._pass(static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        for p, version in zip(created, versions):
            if p.grad._version == version:  # the loss does not reach it: no gradient, as in eager training
                p.grad = None
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                loss = self._pass(static)
        except RuntimeError as err:
            with suppress(RuntimeError):  # best effort: the capture's own error is the one to report
                _end_failed_capture(self.device)
            # capture_end's "previous error during capture" hides the op that failed: report that one
            first = (err.__context__ if "during capture" in str(err) and isinstance(err.__context__, RuntimeError)
                     else err)
            reason = str(first).strip().splitlines()[0] if str(first).strip() else type(first).__name__
            raise GraphCaptureError(f"this model's forward or backward cannot be captured in a CUDA graph ({reason}); "
                                    "it synchronizes with the host or changes shape with the data. Train without "
                                    "cuda_graph (--cuda-graph).") from err
        return graph, static, loss
