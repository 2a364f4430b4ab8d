"""The storage order of matmul weights on a CPU, chosen for the one-row products of decode steps.

y = x W^T with W [N, K] stored row-major makes MKL's single-row kernel take N dot products of K; stored column-major
(W^T contiguous, the same [N, K] tensor with strides (1, N)) it streams W once, accumulating all N outputs. On the
bundled model (one thread, a 2-core AMD EPYC VM, weights coming from L3 as in a real step) the column-major products
were faster where N >= K (qkv 75 -> 64 us, gate_up 189 -> 99 us, the 4096-row head 599 -> 232 us) and slower where
N < K (down 73 -> 97 us), so only those are rearranged. Shapes, names and values stay as they are; only strides change.
A tied embedding is the LM head too, so it is rearranged with it: its row lookups then read strided (a 512-token
prompt of a 32000 x 1024 embedding: 0.4 -> 4.7 ms, once per prompt), while every decode step's head product gains.
"""

from __future__ import annotations

import torch

from engine_builder.kernels.fp8_format import FP8


def column_major_where_wide(weights: list[torch.Tensor]) -> int:
    """Store each CPU weight [N, K] with N >= K column-major, in place. Returns how many were rearranged.

    FP8 weights keep their layout (the CPU path dequantizes them per product anyway).
    """
    moved = 0
    for weight in weights:
        rows, columns = weight.shape
        if weight.device.type != "cpu" or weight.dtype == FP8 or rows < columns or weight.stride(0) == 1:
            continue
        weight.data = weight.data.t().contiguous().t()
        moved += 1
    return moved
