"""The inputs of one engine forward pass: a flattened batch over a paged KV cache.

A batch mixes prompt chunks and single decode tokens of different requests. Their new tokens are
concatenated into one flat sequence of `num_tokens`:

    tokens:          | r0 chunk (5 tokens) | r1 decode (1) | r2 chunk (3) |
    query_start_loc:  0                     5               6              9

Request i already has `seq_lens[i] - query_lens[i]` tokens in its KV blocks; the new tokens are
written at `slot_mapping` (slot = block_id * block_size + offset) and attend to everything before them.

    block_tables[i] = [7, 2, 9]      -> positions 0..15 in block 7, 16..31 in block 2, ...
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine_builder.arithmetic import ceil_div


@dataclass(slots=True)
class AttentionMetadata:
    """Where each request's tokens live in the flat batch and in the paged KV cache."""

    query_start_loc: torch.Tensor  # [num_requests + 1] int32, prefix sums of the new-token counts
    seq_lens: torch.Tensor  # [num_requests] int32, tokens in context after this step (cached + new)
    block_tables: torch.Tensor  # [num_requests, max_blocks] int32; entries past a request's blocks are 0 and unread
    slot_mapping: torch.Tensor  # [num_tokens] int64, cache slot each new token's K/V is written to
    max_query_len: int  # largest number of new tokens of one request (host int, sizes kernels)
    max_seq_len: int  # largest seq_lens entry (host int)
    block_size: int  # tokens per KV block
    # what the torch reference of paged attention derives from the fields above, once per step for every layer
    reference_plan: object | None = None


@dataclass(slots=True)
class ForwardBatch:
    """Everything the model needs for one step."""

    input_ids: torch.Tensor  # [num_tokens] int64, new tokens of all requests, flattened
    positions: torch.Tensor  # [num_tokens] int64, position of each token in its request
    attention: AttentionMetadata
    logits_indices: torch.Tensor  # [num_outputs] int64, flat token indices whose logits are returned


@dataclass(slots=True)
class KVCacheSpec:
    """Geometry of the paged KV cache, so the server can size the pool from free memory."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def bytes_per_block(self, block_size: int) -> int:
        """Bytes one block takes across all layers, K and V together."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * element


@dataclass(slots=True)
class LayerKVCache:
    """One layer's block pools: [num_blocks, block_size, num_kv_heads, head_dim] each."""

    key: torch.Tensor
    value: torch.Tensor


def build_forward_batch(
    token_ids: list[list[int]],
    num_cached: list[int],
    block_tables: list[list[int]],
    block_size: int,
    num_outputs_per_request: list[int] | None = None,
    device: torch.device | str = "cpu",
) -> ForwardBatch:
    """Build a ForwardBatch from plain lists (used by the server runner and by tests).

    Args:
        token_ids: per request, the new tokens to process this step.
        num_cached: per request, how many earlier tokens are already in its KV blocks.
        block_tables: per request, its block ids in order; must cover num_cached + new tokens.
        block_size: tokens per block.
        num_outputs_per_request: per request, how many trailing positions need logits
            (default 1: the last new token; 0 for a prompt chunk that is not the last).
        device: where the tensors go.

    Returns:
        The ForwardBatch.
    """
    import itertools

    import numpy as np

    num_requests = len(token_ids)
    query_lens = np.fromiter(map(len, token_ids), dtype=np.int64, count=num_requests)
    cached = np.array(num_cached, dtype=np.int64)
    seq_lens = cached + query_lens
    num_blocks = np.fromiter(map(len, block_tables), dtype=np.int64, count=num_requests)
    short = np.flatnonzero(num_blocks * block_size < seq_lens)
    if short.size:
        i = int(short[0])
        raise ValueError(f"request {i}: {num_blocks[i]} blocks cannot hold {seq_lens[i]} tokens")
    starts = np.zeros(num_requests + 1, dtype=np.int64)
    np.cumsum(query_lens, out=starts[1:])
    request_of_token = np.repeat(np.arange(num_requests), query_lens)
    # position = cached + (index in the flat batch - the request's first flat index)
    positions = np.arange(int(starts[-1]), dtype=np.int64) + (cached - starts[:-1])[request_of_token]
    # the tables padded with block 0 into one [num_requests, longest] array, filled row by row in one assignment
    table = np.zeros((num_requests, max(int(num_blocks.max(initial=0)), 1)), dtype=np.int64)
    table[np.arange(table.shape[1]) < num_blocks[:, None]] = np.fromiter(
        itertools.chain.from_iterable(block_tables), dtype=np.int64, count=int(num_blocks.sum()))
    slots = table[request_of_token, positions // block_size] * block_size + positions % block_size
    if num_outputs_per_request is None:
        logits_indices = starts[1:] - 1  # the last new token of each request
    else:  # the trailing n tokens of each request
        outputs = np.asarray(num_outputs_per_request, dtype=np.int64)
        output_starts = np.cumsum(outputs) - outputs
        request_of_output = np.repeat(np.arange(num_requests), outputs)
        rank = np.arange(int(outputs.sum()), dtype=np.int64) - output_starts[request_of_output]
        logits_indices = (starts[1:] - outputs)[request_of_output] + rank
    flat_ids = np.fromiter(itertools.chain.from_iterable(token_ids), dtype=np.int64, count=int(starts[-1]))

    # One host buffer, one host-to-device copy; the fields are views into it, each starting on a 16-byte
    # boundary (Triton compiles separate kernel variants for aligned and unaligned pointers).
    #   | input_ids | positions | slot_mapping | logits_indices | query_start_loc | seq_lens | block_tables |
    #     int64 ..........................................      int32 ..................................
    fields = [flat_ids, positions, slots, logits_indices, starts, seq_lens, table.ravel()]
    is_wide = [True] * 4 + [False] * 3
    lengths = [  # in int64s
        ceil_div(a.size, 2) * 2 if wide else ceil_div(a.size, 4) * 2 for a, wide in zip(fields, is_wide)
    ]
    offsets = np.cumsum([0] + lengths)
    packed = np.zeros(int(offsets[-1]), dtype=np.int64)
    for array, wide, begin in zip(fields, is_wide, offsets):
        target = packed[begin:] if wide else packed[begin:].view(np.int32)
        target[: array.size] = array
    host_packed = torch.from_numpy(packed)
    if torch.device(device).type == "cuda":  # pinned + non-blocking: a pageable copy would wait for the GPU
        device_packed = host_packed.pin_memory().to(device, non_blocking=True)
    else:
        device_packed = host_packed.to(device)
    views = []
    for array, wide, begin, end in zip(fields, is_wide, offsets[:-1], offsets[1:]):
        segment = device_packed[begin:end]
        views.append((segment if wide else segment.view(torch.int32))[: array.size])
    input_ids, positions_view, slot_view, logits_view, starts_view, seq_lens_view, table_view = views
    attention = AttentionMetadata(
        query_start_loc=starts_view,
        seq_lens=seq_lens_view,
        block_tables=table_view.view(table.shape),
        slot_mapping=slot_view,
        max_query_len=int(query_lens.max(initial=0)),
        max_seq_len=int(seq_lens.max(initial=0)),
        block_size=block_size,
    )
    return ForwardBatch(input_ids=input_ids, positions=positions_view, attention=attention, logits_indices=logits_view)
