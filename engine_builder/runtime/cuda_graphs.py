"""CUDA graphs of the decode step: captured once per batch-size bucket, replayed every step.

A decode step launches hundreds of small kernels; replaying a captured graph removes their launch
cost. Graphs are captured largest bucket first so every smaller one fits in the same memory pool.
A batch of B requests runs in the smallest bucket b >= B; rows B..b-1 are padding:

    query_start_loc = [0, 1, ..., B, B, ..., B]   padded requests have no tokens: attention skips them
    seq_lens        = [.., .., 0, ..., 0]         and the KV write skips tokens >= query_start_loc[-1]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from engine_builder.arithmetic import ceil_div
from engine_builder.forward_batch import AttentionMetadata, ForwardBatch, LayerKVCache


def batch_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_batch_size (which is always included)."""
    buckets = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    buckets += list(range(16, max_batch_size, 16)) + [max_batch_size]
    return sorted(set(buckets))


@dataclass(slots=True)
class _StaticInputs:
    """Device buffers the graphs read; each step copies its batch into their leading rows."""

    input_ids: torch.Tensor  # [max_batch] int64
    positions: torch.Tensor  # [max_batch] int64
    slot_mapping: torch.Tensor  # [max_batch] int64
    seq_lens: torch.Tensor  # [max_batch] int32
    query_start_loc: torch.Tensor  # [max_batch + 1] int32
    block_tables: torch.Tensor  # [max_batch, max_blocks_per_request] int32
    logits_indices: torch.Tensor  # [max_batch] int64, 0..max_batch-1


class DecodeGraphs:
    """Captured decode graphs for one model and one KV cache."""

    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[LayerKVCache],
        block_size: int,
        max_batch_size: int,
        max_seq_len: int,
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_seq_len = max_seq_len
        self.buckets = batch_buckets(max_batch_size)
        device = kv_caches[0].key.device
        size = self.buckets[-1]
        max_blocks = ceil_div(max_seq_len, block_size)
        self.inputs = _StaticInputs(
            input_ids=torch.zeros(size, dtype=torch.int64, device=device),
            positions=torch.zeros(size, dtype=torch.int64, device=device),
            slot_mapping=torch.zeros(size, dtype=torch.int64, device=device),
            seq_lens=torch.zeros(size, dtype=torch.int32, device=device),
            query_start_loc=torch.zeros(size + 1, dtype=torch.int32, device=device),
            block_tables=torch.zeros(size, max_blocks, dtype=torch.int32, device=device),
            logits_indices=torch.arange(size, dtype=torch.int64, device=device),
        )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _batch_for(self, bucket: int) -> ForwardBatch:
        inputs = self.inputs
        attention = AttentionMetadata(
            query_start_loc=inputs.query_start_loc[: bucket + 1],
            seq_lens=inputs.seq_lens[:bucket],
            block_tables=inputs.block_tables[:bucket],
            slot_mapping=inputs.slot_mapping[:bucket],
            max_query_len=1,
            max_seq_len=self.max_seq_len,
            block_size=self.block_size,
        )
        return ForwardBatch(
            input_ids=inputs.input_ids[:bucket],
            positions=inputs.positions[:bucket],
            attention=attention,
            logits_indices=inputs.logits_indices[:bucket],
        )

    @torch.inference_mode()
    def capture(self, progress: bool = True) -> None:
        """Capture every bucket, largest first, into one memory pool."""
        inputs = self.inputs
        inputs.query_start_loc.copy_(torch.arange(inputs.query_start_loc.shape[0], dtype=torch.int32))
        inputs.seq_lens.fill_(1)
        pool = None
        for index, bucket in enumerate(reversed(self.buckets)):
            batch = self._batch_for(bucket)
            self.model(batch, self.kv_caches)  # warm-up: compiles kernels for this shape
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bucket] = self.model(batch, self.kv_caches)
            pool = graph.pool()
            self.graphs[bucket] = graph
            if progress:
                print(
                    f"\rcapturing CUDA graphs: {index + 1}/{len(self.buckets)} (batch {bucket})",
                    end="",
                    file=sys.stderr,
                )
        torch.cuda.synchronize()
        inputs.seq_lens.zero_()
        if progress:
            print(file=sys.stderr)

    def can_run(self, batch: ForwardBatch, kv_caches: list[LayerKVCache]) -> bool:
        """True for a decode-only batch (one token per request) that fits a captured bucket."""
        num_requests = batch.attention.seq_lens.shape[0]
        return (
            kv_caches is self.kv_caches
            and batch.attention.max_query_len == 1
            and batch.input_ids.shape[0] == num_requests
            and num_requests <= self.buckets[-1]
            and batch.attention.block_size == self.block_size
            and batch.attention.block_tables.shape[1] <= self.inputs.block_tables.shape[1]
            and batch.logits_indices.shape[0] == num_requests
        )

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Copy the batch into the static buffers, replay the bucket's graph, return [num_requests, vocab] logits."""
        count = batch.input_ids.shape[0]
        bucket = next(b for b in self.buckets if b >= count)
        inputs, attention = self.inputs, batch.attention
        inputs.input_ids[:count].copy_(batch.input_ids, non_blocking=True)
        inputs.positions[:count].copy_(batch.positions, non_blocking=True)
        inputs.slot_mapping[:count].copy_(attention.slot_mapping, non_blocking=True)
        inputs.seq_lens[:count].copy_(attention.seq_lens, non_blocking=True)
        inputs.seq_lens[count:bucket].zero_()
        inputs.query_start_loc[: count + 1].copy_(attention.query_start_loc, non_blocking=True)
        inputs.query_start_loc[count + 1 : bucket + 1].fill_(count)
        inputs.block_tables[:count, : attention.block_tables.shape[1]].copy_(attention.block_tables, non_blocking=True)
        self.graphs[bucket].replay()
        return self.outputs[bucket][:count]
