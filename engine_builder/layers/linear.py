"""Linear layers that hold their tensor-parallel shard (engine_builder/sharding.py says which slice).

Either in the model dtype, or FP8 after `quantize(...)` (a load-time transform, before the weights are attached):
then `weight` is float8_e4m3fn, `weight_scale` holds one float32 scale per output row (of this rank), and
`input_scale`, when the checkpoint calibrated one, a static activation scale (kernels/fp8.py). Without one
(`dynamic_fp8`) the layer also takes activations that its producer already quantized per token (Fp8Activations).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from engine_builder.kernels.fp8_format import FP8, Fp8Activations
from engine_builder.kernels.gemv import linear
from engine_builder.sharding import FULL, Shard


class QuantizableLinear(nn.Module):
    """What both parallel linears share: the weight, the optional bias, and the FP8 form of the weight."""

    weight_scale: nn.Parameter | None
    input_scale: nn.Parameter | None

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.weight_scale = None
        self.input_scale = None
        self.dynamic_fp8 = False  # FP8 weights with per-token activation scales

    def quantize(self, static_input_scale: bool = False) -> None:
        """Hold an FP8 weight from now on (shapes as before), a per-row weight_scale, and an input_scale if static."""
        rows = self.weight.shape[0]
        device = self.weight.device
        self.weight = nn.Parameter(torch.empty(self.weight.shape, dtype=FP8, device=device), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(rows, dtype=torch.float32, device=device), requires_grad=False)
        if static_input_scale:
            self.input_scale = nn.Parameter(torch.empty((), dtype=torch.float32, device=device), requires_grad=False)
        self.dynamic_fp8 = not static_input_scale

    def matmul(self, x: torch.Tensor | Fp8Activations) -> torch.Tensor:
        """x W^T of this rank, without the bias."""
        return linear(x, self.weight, None, self.weight_scale, self.input_scale)


class ColumnParallelLinear(QuantizableLinear):
    """y = x W^T + b with W's output rows split across ranks: each rank computes its `out_features` outputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        """Args: out_features is this rank's share (the caller divides: fused projections split part by part)."""
        super().__init__(in_features, out_features, bias)

    def forward(self, x: torch.Tensor | Fp8Activations) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.weight_scale, self.input_scale)


class RowParallelLinear(QuantizableLinear):
    """y = x W^T with W's input columns split across ranks; the partial sums are all-reduced when sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, shard: Shard = FULL):
        if in_features % shard.size:
            raise ValueError(f"{in_features} input features do not split over {shard.size} ranks")
        super().__init__(in_features // shard.size, out_features, bias)
        self.shard = shard

    def forward(self, x: torch.Tensor | Fp8Activations) -> torch.Tensor:
        out = self.matmul(x)
        if self.shard.size > 1:
            dist.all_reduce(out)
        if self.bias is not None:
            out = out + self.bias
        return out
