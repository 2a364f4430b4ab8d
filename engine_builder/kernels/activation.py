"""SiLU-and-multiply of the fused gate/up projection (torch reference)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2 * n] laid out as [gate | up] → silu(gate) * up, shape [..., n]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
