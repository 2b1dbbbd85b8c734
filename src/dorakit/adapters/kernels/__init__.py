"""Fused DoRA paths: a custom autograd Function in torch ops ("fused") and Triton kernels ("triton").

A leaf package: it imports only ``dorakit.adapters.functional`` (the math it must agree with), never the
layers. The eager reference lives in ``dorakit.adapters.layers``; ``AdapterLayer(backend=...)`` chooses.
Under torch.compile the same math runs as the ``dorakit::`` custom ops of ``ops.py`` (one opaque op
per adapted linear). Triton is optional: it ships with CUDA builds of torch; on a CPU the kernels run only under
``TRITON_INTERPRET=1`` (how the tests cover them).
"""

from __future__ import annotations

import importlib.util
import os

from .dora_linear import IMPLS, DoRALinearFunction, dora_linear, dora_norm, dora_prepare, lora_prepare
from .ops import adapter_linear, dora_prepare_op, lora_prepare_op  # importing ops registers the dorakit:: ops

BACKENDS = ("auto", "torch", "fused", "triton")
"""auto: the fastest path that supports the call; torch: the eager reference; fused, triton: dora_linear."""


DECODE_MAX_ROWS = 64
"""The most rows triton_decode's one-launch kernel takes (one row tile; a decode step's batch)."""
DECODE_MAX_RANK = 128
"""The largest rank it takes (one rank tile)."""

_TRITON = importlib.util.find_spec("triton") is not None  # looked up once: torch.compile traces the check


def triton_available() -> bool:
    """True if triton can be imported (it is not a dependency of dorakit)."""
    return _TRITON


def triton_interpreted() -> bool:
    """True under TRITON_INTERPRET=1, where the kernels run on CPU tensors (slowly; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


__all__ = [
    "DECODE_MAX_RANK",
    "DECODE_MAX_ROWS",
    "BACKENDS",
    "IMPLS",
    "DoRALinearFunction",
    "adapter_linear",
    "dora_linear",
    "dora_norm",
    "dora_prepare",
    "dora_prepare_op",
    "lora_prepare",
    "lora_prepare_op",
    "triton_available",
    "triton_interpreted",
]
