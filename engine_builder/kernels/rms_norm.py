"""RMSNorm, optionally fused with the residual add that precedes it (torch reference)."""

from __future__ import annotations

import torch

from engine_builder.kernels.dispatch import use_triton


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x), computed in float32 like transformers; returns x's dtype."""
    if use_triton(x):
        from engine_builder.kernels.triton_elementwise import rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (rms_norm(x + residual), x + residual): the next layer's input and its new residual."""
    if use_triton(x):
        from engine_builder.kernels.triton_elementwise import rms_norm_triton

        return rms_norm_triton(x, weight, eps, residual)
    summed = x + residual
    return rms_norm(summed, weight, eps), summed
