"""RMSNorm, optionally fused with the residual add that precedes it (torch reference), and its FP8 form."""

from __future__ import annotations

import torch

from engine_builder.kernels.dispatch import use_triton
from engine_builder.kernels.fp8 import Fp8Activations, quantize_activations


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x), computed in float32 like transformers; returns x's dtype."""
    if use_triton(x):
        from engine_builder.kernels.triton_elementwise import rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    if x.dtype == torch.float32 and weight.dtype == torch.float32:  # one aten call, bit-identical to the steps below
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)
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


def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                 ) -> tuple[Fp8Activations, torch.Tensor | None]:
    """rms_norm(x (+ residual)) quantized per token for an FP8 linear (one pass on GPUs), and x + residual.

    Args:
        x: [..., H] in the model dtype (the FP8 rows come out [M, H]).
        weight: [H].
        eps: the norm's epsilon.
        residual: [M, H] added to x first, or None.

    Returns:
        (the normed rows as Fp8Activations, x + residual or None without a residual).
    """
    if use_triton(x) and x.dim() == 2 and x.stride(1) == 1:
        from engine_builder.kernels.triton_fp8 import rms_norm_fp8_triton

        data, scale, summed = rms_norm_fp8_triton(x, weight, eps, residual)
        return Fp8Activations(data, scale, x.dtype), summed
    summed = x if residual is None else x + residual
    return quantize_activations(rms_norm(summed, weight, eps)), None if residual is None else summed
