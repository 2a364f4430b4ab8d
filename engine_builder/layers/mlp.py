"""Gated MLP: down(silu(gate(x)) * up(x)) with gate and up fused into one projection."""

from __future__ import annotations

import torch
from torch import nn

from engine_builder.kernels.activation import silu_and_mul
from engine_builder.layers.linear import ColumnParallelLinear, RowParallelLinear
from engine_builder.sharding import FULL, Shard


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, shard: Shard = FULL):
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(hidden_size, 2 * intermediate_size // shard.size)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, False, shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
