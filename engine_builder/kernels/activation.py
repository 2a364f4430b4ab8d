"""SiLU-and-multiply of the fused gate/up projection (torch reference)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine_builder.kernels.dispatch import use_triton


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2 * n] laid out as [gate | up] → silu(gate) * up, shape [..., n]."""
    if use_triton(gate_up) and gate_up.dim() == 2:
        from engine_builder.kernels.triton_elementwise import silu_and_mul_triton

        return silu_and_mul_triton(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
