"""Linear layers that know their tensor-parallel shard (world size 1 today)."""

from __future__ import annotations

import torch
from torch import nn

from engine_builder.kernels.gemv import linear


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split across ranks; each rank keeps out_features / world_size rows."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        if out_features % tp_size:
            raise ValueError(f"{out_features} output features do not split over {tp_size} ranks")
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.weight = nn.Parameter(torch.empty(out_features // tp_size, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features // tp_size), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split across ranks; partial sums are all-reduced when tp_size > 1."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        if in_features % tp_size:
            raise ValueError(f"{in_features} input features do not split over {tp_size} ranks")
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.weight = nn.Parameter(torch.empty(out_features, in_features // tp_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.weight)
        if self.tp_size > 1:
            torch.distributed.all_reduce(out)
        if self.bias is not None:
            out = out + self.bias
        return out
