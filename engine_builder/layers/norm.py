"""RMSNorm module."""

from __future__ import annotations

import torch
from torch import nn

from engine_builder.kernels.fp8_format import Fp8Activations
from engine_builder.kernels.rms_norm import add_rms_norm, rms_norm, rms_norm_fp8


class RMSNorm(nn.Module):
    """With `fp8_output` (set by quantize.py when only FP8 linears with per-token scales read it) the normed rows
    come out quantized, in the same pass."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.fp8_output = False

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """rms_norm(x) alone, or (rms_norm(x + residual), x + residual) when a residual is given."""
        if self.fp8_output:
            return self._fp8_forward(x, residual)
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)

    def _fp8_forward(self, x: torch.Tensor, residual: torch.Tensor | None
                     ) -> Fp8Activations | tuple[Fp8Activations, torch.Tensor]:
        normed, summed = rms_norm_fp8(x, self.weight, self.eps, residual)
        return normed if summed is None else (normed, summed)
