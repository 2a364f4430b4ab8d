"""Tensor-parallel shards of the engine's weights: which slice of each tensor rank r of N holds.

Megatron-style, with the fused projections split part by part so that each rank keeps whole heads:

    qkv_proj   rows  [q heads of r | k heads of r | v heads of r]     column-parallel (no communication)
    gate_up    rows  [gate slice r | up slice r]                      column-parallel
    o_proj     columns of the q heads of r                            row-parallel: one all-reduce after it
    down_proj  columns of intermediate slice r                        row-parallel: one all-reduce after it
    embedding  rows  vocab slice r (padded to ceil(V / N) rows)       lookup masked, then all-reduced
    lm_head    rows  vocab slice r (tied: the embedding's slice)      logits all-gathered, padding dropped
    norms, q/k norms (per head_dim)                                   replicated

KV heads are split when N divides them; with more ranks than KV heads each rank keeps the one KV head its q heads
use (replicated over N / num_kv_heads ranks, as vLLM does). A slice is a list of (start, stop) ranges along one
dimension, so that it can be read straight from a safetensors file without reading the rest of the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine_builder.arithmetic import ceil_div
from engine_builder.model_config import ModelConfig


@dataclass(frozen=True, slots=True)
class Shard:
    """The tensor-parallel shard one process holds: rank `rank` of `size`."""

    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} of {self.size} does not exist")


FULL = Shard()


@dataclass(frozen=True, slots=True)
class ShardSlice:
    """Where a rank's part of a tensor lies: `ranges` along `dim`, concatenated, then zero rows up to `rows`."""

    dim: int
    ranges: tuple[tuple[int, int], ...]
    rows: int | None = None  # pad dim 0 to this many rows (the vocabulary's last shard)


def check_shardable(config: ModelConfig, size: int) -> None:
    """Raise ValueError naming the dimension that does not split over `size` ranks."""
    if size == 1:
        return
    problems = []
    if config.num_attention_heads % size:
        problems.append(f"{config.num_attention_heads} attention heads")
    if config.num_kv_heads % size and size % config.num_kv_heads:
        problems.append(f"{config.num_kv_heads} KV heads (neither divides the other)")
    if config.intermediate_size % size:
        problems.append(f"intermediate size {config.intermediate_size}")
    if problems:
        raise ValueError(f"tensor parallel size {size} does not divide the model's {', '.join(problems)}; "
                         "choose a size that does")


def num_kv_heads_per_rank(config: ModelConfig, size: int) -> int:
    return max(config.num_kv_heads // size, 1)


def vocab_per_rank(config: ModelConfig, size: int) -> int:
    """Rows of the embedding and LM head each rank holds (the last rank's are zero-padded)."""
    return ceil_div(config.vocab_size, size)


def _first_kv_head(config: ModelConfig, shard: Shard) -> int:
    if config.num_kv_heads >= shard.size:
        return shard.rank * (config.num_kv_heads // shard.size)
    return shard.rank // (shard.size // config.num_kv_heads)  # a KV head serves size / num_kv_heads ranks


def shard_slice(name: str, config: ModelConfig, shard: Shard) -> ShardSlice | None:
    """The slice of engine parameter `name` that `shard` holds; None when every rank holds all of it."""
    if shard.size == 1:
        return None
    rank, size = shard.rank, shard.size
    if name.endswith(("attention.qkv_proj.weight", "attention.qkv_proj.bias", "attention.qkv_proj.weight_scale")):
        q_rows = config.q_size // size
        kv_rows = num_kv_heads_per_rank(config, size) * config.head_dim
        k_start = config.q_size + _first_kv_head(config, shard) * config.head_dim
        v_start = k_start + config.kv_size
        return ShardSlice(0, ((rank * q_rows, (rank + 1) * q_rows), (k_start, k_start + kv_rows),
                              (v_start, v_start + kv_rows)))
    if name.endswith("attention.o_proj.weight"):
        q_cols = config.q_size // size
        return ShardSlice(1, ((rank * q_cols, (rank + 1) * q_cols),))
    part = config.intermediate_size // size
    if name.endswith(("mlp.gate_up_proj.weight", "mlp.gate_up_proj.weight_scale")):
        up = config.intermediate_size
        return ShardSlice(0, ((rank * part, (rank + 1) * part), (up + rank * part, up + (rank + 1) * part)))
    if name.endswith("mlp.down_proj.weight"):
        return ShardSlice(1, ((rank * part, (rank + 1) * part),))
    if name in ("embed_tokens.weight", "lm_head.weight"):
        rows = vocab_per_rank(config, size)
        start = min(rank * rows, config.vocab_size)
        return ShardSlice(0, ((start, min(start + rows, config.vocab_size)),), rows=rows)
    return None


def shard_tensor(name: str, tensor: torch.Tensor, config: ModelConfig, shard: Shard) -> torch.Tensor:
    """This rank's part of a whole engine tensor (the tensor itself when it is replicated)."""
    where = shard_slice(name, config, shard)
    if where is None:
        return tensor
    parts = [tensor.narrow(where.dim, start, stop - start) for start, stop in where.ranges]
    return _padded(torch.cat(parts, dim=where.dim) if len(parts) > 1 else parts[0].clone(), where)


def read_shard(name: str, tensor_slice: Any, config: ModelConfig, shard: Shard) -> torch.Tensor:
    """This rank's part of a tensor, read from a safetensors slice (`safe_open(...).get_slice(name)`): only the
    rows or columns the rank holds leave the file."""
    where = shard_slice(name, config, shard)
    if where is None:
        return tensor_slice[...]  # `[:]` refuses a 0-dim tensor (a KV-cache scale)
    if where.dim == 0:
        parts = [tensor_slice[start:stop] for start, stop in where.ranges]
    else:
        parts = [tensor_slice[:, start:stop] for start, stop in where.ranges]
    return _padded(torch.cat(parts, dim=where.dim) if len(parts) > 1 else parts[0], where)


def _padded(tensor: torch.Tensor, where: ShardSlice) -> torch.Tensor:
    if where.rows is None or tensor.shape[0] == where.rows:
        return tensor
    padding = tensor.new_zeros((where.rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, padding])
