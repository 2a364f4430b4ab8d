"""Gated MLP: down(silu(gate(x)) * up(x)) with gate and up fused into one projection."""

from __future__ import annotations

import torch
from torch import nn

from engine_builder.kernels.activation import silu_and_mul, silu_and_mul_fp8
from engine_builder.kernels.fp8_format import Fp8Activations
from engine_builder.layers.linear import ColumnParallelLinear, RowParallelLinear
from engine_builder.sharding import FULL, Shard


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, shard: Shard = FULL):
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(hidden_size, 2 * intermediate_size // shard.size)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, False, shard)

    def forward(self, x: torch.Tensor | Fp8Activations) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.down_proj.dynamic_fp8:  # quantized for the FP8 down projection in the same pass
            return self.down_proj(silu_and_mul_fp8(gate_up))
        return self.down_proj(silu_and_mul(gate_up))
