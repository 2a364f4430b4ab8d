"""SiLU-and-multiply of the fused gate/up projection (torch reference), and its FP8 form."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine_builder.kernels.dispatch import use_triton
from engine_builder.kernels.fp8 import Fp8Activations, quantize_activations


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2 * n] laid out as [gate | up] → silu(gate) * up, shape [..., n]."""
    if use_triton(gate_up) and gate_up.dim() == 2:
        from engine_builder.kernels.triton_elementwise import silu_and_mul_triton

        return silu_and_mul_triton(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul_fp8(gate_up: torch.Tensor) -> Fp8Activations:
    """silu_and_mul of [..., 2 * n] quantized per token ([M, n] rows) for an FP8 down projection (one kernel on
    GPUs)."""
    if use_triton(gate_up) and gate_up.dim() == 2 and gate_up.stride(1) == 1:
        from engine_builder.kernels.triton_fp8 import silu_and_mul_fp8_triton

        return Fp8Activations(*silu_and_mul_fp8_triton(gate_up), gate_up.dtype)
    return quantize_activations(silu_and_mul(gate_up))
