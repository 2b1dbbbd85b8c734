"""Fused DoRA paths: a custom autograd Function in torch ops ("fused") and Triton kernels ("triton").

A leaf package: it imports only ``dorakit.adapters.functional`` (the math it must agree with), never the
layers. The eager reference lives in ``dorakit.adapters.layers``; ``AdapterLayer(backend=...)`` chooses.
Triton is optional: it ships with CUDA builds of torch; on a CPU the kernels run only under
``TRITON_INTERPRET=1`` (how the tests cover them).
"""

from __future__ import annotations

import importlib.util
import os

from . import ops  # noqa: F401  (registers the dorakit:: custom ops that torch.compile sees)
from .dora_linear import IMPLS, DoRALinearFunction, dora_linear, dora_norm, dora_prepare, lora_prepare

BACKENDS = ("auto", "torch", "fused", "triton")
"""auto: the fastest path that supports the call; torch: the eager reference; fused, triton: dora_linear."""


_TRITON = importlib.util.find_spec("triton") is not None  # looked up once: torch.compile traces the check


def triton_available() -> bool:
    """True if triton can be imported (it is not a dependency of dorakit)."""
    return _TRITON


def triton_interpreted() -> bool:
    """True under TRITON_INTERPRET=1, where the kernels run on CPU tensors (slowly; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


__all__ = [
    "BACKENDS",
    "IMPLS",
    "DoRALinearFunction",
    "dora_linear",
    "dora_norm",
    "dora_prepare",
    "lora_prepare",
    "triton_available",
    "triton_interpreted",
]
