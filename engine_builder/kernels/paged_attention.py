"""Causal attention of a flattened batch of new tokens over a paged KV cache (torch reference).

The cache is in the model dtype or in FP8 (kv_cache.py): FP8 entries are read back as fp8 * k_scale (v_scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine_builder.forward_batch import AttentionMetadata
from engine_builder.kernels.dispatch import use_triton
from engine_builder.kernels.kv_cache import dequantize_kv, is_fp8


@dataclass(frozen=True, slots=True)
class _Chunk:
    """A request with several new tokens: its query rows and its context's cache slots, causally masked."""

    start: int
    end: int
    slots: torch.Tensor  # [seq_len] int64
    mask: torch.Tensor  # [1, num_new, seq_len] bool


@dataclass(frozen=True, slots=True)
class _ReferencePlan:
    """Where every row's context lives in the flat cache, derived once per step (every layer reads the same)."""

    decode_tokens: torch.Tensor | None  # [R] flat token index of each single-token request; None: there are none
    decode_slots: torch.Tensor  # [R, longest] int64 cache slots of each one's context (past its length: masked)
    decode_mask: torch.Tensor  # [R, 1, longest] bool
    only_decode: bool  # every token of the batch is a decode token, in order: no scatter needed
    chunks: tuple[_Chunk, ...]


def _context_slots(tables: torch.Tensor, num_positions: int, block_size: int) -> torch.Tensor:
    """[R, num_positions] int64 flat cache slots of positions 0.. of each request's block table row."""
    positions = torch.arange(num_positions, device=tables.device)
    return tables[:, positions // block_size].long() * block_size + positions % block_size


def _plan(metadata: AttentionMetadata, device: torch.device) -> _ReferencePlan:
    starts = metadata.query_start_loc.tolist()
    seq_lens = metadata.seq_lens.tolist()
    block_size = metadata.block_size
    decode_rows = [i for i in range(len(seq_lens)) if starts[i + 1] - starts[i] == 1]
    longest = max((seq_lens[i] for i in decode_rows), default=0)
    rows = torch.tensor(decode_rows, dtype=torch.int64, device=device)
    chunks = []
    for i, seq_len in enumerate(seq_lens):
        num_new = starts[i + 1] - starts[i]
        if num_new > 1:
            positions = torch.arange(seq_len, device=device)
            mask = positions[None, :] <= positions[seq_len - num_new :, None]
            slots = _context_slots(metadata.block_tables[i : i + 1], seq_len, block_size)[0]
            chunks.append(_Chunk(starts[i], starts[i + 1], slots, mask.unsqueeze(0)))
    lens = metadata.seq_lens[rows]
    return _ReferencePlan(
        decode_tokens=metadata.query_start_loc[rows].long() if decode_rows else None,
        # padding past a row's length reads whatever slot its table's trailing 0 entries give; the mask drops it
        decode_slots=_context_slots(metadata.block_tables[rows], longest, block_size),
        decode_mask=(torch.arange(longest, device=device)[None, :] < lens[:, None]).unsqueeze(1),
        only_decode=len(decode_rows) == len(seq_lens) == starts[-1],
        chunks=tuple(chunks),
    )


def _read_context(cache: torch.Tensor, slots: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """The cache entries at `slots` [...] -> [..., num_kv_heads, head_dim]; an FP8 cache's dequantized (x * scale).
    (index_select on the flat pool: 3-7x faster on a CPU than indexing it with the slots tensor.)"""
    entries = cache.view(-1, *cache.shape[2:])
    context = torch.index_select(entries, 0, slots.reshape(-1)).view(*slots.shape, *cache.shape[2:])
    return dequantize_kv(context, scale, dtype) if is_fp8(cache) else context


def _attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """query [R, q, H, D], key/value [R, S, KH, D], mask [R, q, S] (True = attend) → [R, q, H, D]."""
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        attn_mask=mask.unsqueeze(1),
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(1, 2)


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Attention of every new token over its request's context (cached tokens and new ones before it).

    The new tokens' K/V must already be written to the cache (see kv_cache.write_kv).

    Args:
        query: [num_tokens, num_heads, head_dim].
        key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim].
        metadata: batch layout (query_start_loc, seq_lens, block_tables).
        scale: softmax scale, usually head_dim ** -0.5.
        k_scale, v_scale: the layer's KV-cache scales, used by an FP8 cache only (kv_cache.py).

    Returns:
        [num_tokens, num_heads, head_dim].
    """
    if use_triton(query):
        from engine_builder.kernels.triton_attention import paged_attention_triton

        return paged_attention_triton(query, key_cache, value_cache, metadata, scale, k_scale=k_scale, v_scale=v_scale)
    return paged_attention_reference(query, key_cache, value_cache, metadata, scale, k_scale, v_scale)


def paged_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """The torch reference of paged_attention (used on CPU and to check the Triton kernel).

    The cache slots of every request's context are worked out once per step (metadata.reference_plan); each layer
    then reads its K and V with one gather per group of requests.
    """
    plan = metadata.reference_plan
    if not isinstance(plan, _ReferencePlan):
        plan = metadata.reference_plan = _plan(metadata, query.device)
    if plan.only_decode:
        keys = _read_context(key_cache, plan.decode_slots, k_scale, query.dtype)
        values = _read_context(value_cache, plan.decode_slots, v_scale, query.dtype)
        return _attend(query.unsqueeze(1), keys, values, plan.decode_mask, scale).squeeze(1)
    out = torch.empty_like(query)
    if plan.decode_tokens is not None:  # the single-token requests together: each attends to its whole context
        keys = _read_context(key_cache, plan.decode_slots, k_scale, query.dtype)
        values = _read_context(value_cache, plan.decode_slots, v_scale, query.dtype)
        out[plan.decode_tokens] = _attend(query[plan.decode_tokens].unsqueeze(1), keys, values, plan.decode_mask,
                                          scale).squeeze(1)
    for chunk in plan.chunks:
        keys = _read_context(key_cache, chunk.slots, k_scale, query.dtype).unsqueeze(0)
        values = _read_context(value_cache, chunk.slots, v_scale, query.dtype).unsqueeze(0)
        out[chunk.start : chunk.end] = _attend(query[chunk.start : chunk.end].unsqueeze(0), keys, values, chunk.mask,
                                               scale).squeeze(0)
    return out
