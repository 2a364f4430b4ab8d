"""The FP8 format the kernels share: float8_e4m3fn, its range, and activations quantized per row.

(Its own module so that the FP8 kernels (fp8_gemv.py, triton_fp8.py) and the dispatch over them (fp8.py) import it
without importing each other.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
MIN_SCALE = 1e-12  # an all-zero row or channel keeps a finite scale


@dataclass(frozen=True, slots=True)
class Fp8Activations:
    """Activations quantized per row: x ≈ data * scale. What a fused norm or activation hands an FP8 linear."""

    data: torch.Tensor  # [M, K] float8_e4m3fn
    scale: torch.Tensor  # [M, 1] float32
    dtype: torch.dtype  # the model dtype: the linear's output dtype

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def dequantize(self) -> torch.Tensor:
        """float32 [M, K]."""
        return self.data.float() * self.scale
