"""Linear layers that hold their tensor-parallel shard (engine_builder/sharding.py says which slice)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from engine_builder.kernels.gemv import linear
from engine_builder.sharding import FULL, Shard


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split across ranks: each rank computes its `out_features` outputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        """Args: out_features is this rank's share (the caller divides: fused projections split part by part)."""
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split across ranks; the partial sums are all-reduced when sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, shard: Shard = FULL):
        super().__init__()
        if in_features % shard.size:
            raise ValueError(f"{in_features} input features do not split over {shard.size} ranks")
        self.shard = shard
        self.weight = nn.Parameter(torch.empty(out_features, in_features // shard.size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.weight)
        if self.shard.size > 1:
            dist.all_reduce(out)
        if self.bias is not None:
            out = out + self.bias
        return out
