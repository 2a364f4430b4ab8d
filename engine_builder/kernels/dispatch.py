"""Choose between a Triton kernel and the torch reference for one call."""

from __future__ import annotations

import os

import torch

# read once: use_triton runs for every op of every step (on a CPU the environment lookup cost 0.2 ms a step)
_DISABLED = os.environ.get("INFLIGHT_DISABLE_TRITON", "") not in ("", "0")
_FORCED = os.environ.get("INFLIGHT_FORCE_TRITON", "") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_AVAILABLE = triton_available()


def use_triton(tensor: torch.Tensor) -> bool:
    """Triton runs CUDA tensors (unless INFLIGHT_DISABLE_TRITON=1); CPU tensors take the torch reference.

    INFLIGHT_FORCE_TRITON=1 with TRITON_INTERPRET=1 runs the kernels on CPU through Triton's interpreter (tests).
    Both variables are read when this module is imported.
    """
    if _DISABLED or not _AVAILABLE:
        return False
    return tensor.is_cuda or _FORCED
