"""Choose between a Triton kernel and the torch reference for one call."""

from __future__ import annotations

import os

import torch

_DISABLED = os.environ.get("INFLIGHT_DISABLE_TRITON", "") not in ("", "0")


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
    """
    if _DISABLED or not _AVAILABLE:
        return False
    return tensor.is_cuda or os.environ.get("INFLIGHT_FORCE_TRITON", "") not in ("", "0")
