"""Training settings that the command line also needs, free of torch so ``dorakit --help`` stays fast.

``TrainConfig`` (the optimisation flags of ``dorakit finetune``) and the allowed values of the
``--schedule``, ``--precision`` and ``--strategy`` flags; ``train`` and ``distributed`` import them from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
STRATEGIES = ("none", "ddp", "fsdp")


class TrainConfigError(ValueError):
    """A TrainConfig field (a ``dorakit finetune`` flag) has a value training cannot use."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; every field is also a ``dorakit finetune`` flag."""

    lr: float = 2e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr over this many optimizer steps."""
    schedule: str = "linear"
    """After warmup: "linear" decay to 0, "cosine" decay to 0, or "constant"."""
    max_steps: int = 100
    """Optimizer steps in total (each one is grad_accum micro-batches)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 turns clipping off."""
    precision: str = "fp32"
    """"fp32", or autocast to "bf16" / "fp16" (fp16 uses a gradient scaler; GPU only)."""
    seed: int = 0
    """Seeds torch, Python's random and the data order."""
    log_every: int = 1
    """Write a metrics line every this many steps."""
    eval_every: int = 0
    """Run the evaluation every this many steps (0: only at the end)."""
    save_every: int = 0
    """Write a checkpoint every this many steps (0: only at the end and on Ctrl-C)."""
    cuda_graph: bool = False
    """Replay each micro-batch's forward + backward from a CUDA graph (dorakit.training.graphs): one CUDA
    process, sequences right-padded to bucket widths (one graph each); the eager GPU step is host-bound."""

    keep_checkpoints: int = 2
    """Keep the newest this many checkpoints (the one ``latest`` names among them) and delete older ones:
    the newest resumes the run, one more allows going back one save interval, and the disk a run takes
    stays bounded (a full fine-tuning checkpoint is about three times the model: weights and AdamW's moments)."""

    def __post_init__(self) -> None:
        for name, low, example in (("max_steps", 1, 100), ("grad_accum", 1, 4), ("log_every", 1, 10),
                                   ("keep_checkpoints", 1, 2), ("warmup_steps", 0, 100), ("eval_every", 0, 200),
                                   ("save_every", 0, 200), ("seed", 0, 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                kind = "a positive integer" if low == 1 else "a non-negative integer"
                raise TrainConfigError(f"{name} must be {kind}, got {value!r}; e.g. {name}={example} "
                                       f"(--{name.replace('_', '-')} {example}).")
        for name, positive, example in (("lr", True, 2e-4), ("weight_decay", False, 0.01),
                                        ("max_grad_norm", False, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (positive and value == 0):
                kind = "a positive number" if positive else "a finite number >= 0"
                raise TrainConfigError(f"{name} must be {kind}, got {value!r}; e.g. {name}={example} "
                                       f"(--{name.replace('_', '-')} {example}).")
        if self.schedule not in SCHEDULES:
            raise TrainConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        if self.precision not in PRECISIONS:
            raise TrainConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}.")
        if not isinstance(self.cuda_graph, bool):
            raise TypeError(f"cuda_graph must be True or False, got {self.cuda_graph!r}.")
