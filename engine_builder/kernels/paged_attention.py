"""Causal attention of a flattened batch of new tokens over a paged KV cache (torch reference).

The cache is in the model dtype or in FP8 (kv_cache.py): FP8 entries are read back as fp8 * k_scale (v_scale).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine_builder.arithmetic import ceil_div
from engine_builder.forward_batch import AttentionMetadata
from engine_builder.kernels.dispatch import use_triton
from engine_builder.kernels.kv_cache import dequantize_kv, is_fp8


def _gather_context(cache: torch.Tensor, block_tables: torch.Tensor, num_positions: int) -> torch.Tensor:
    """[num_requests, num_positions, num_kv_heads, head_dim] from each request's blocks, in order."""
    block_size = cache.shape[1]
    num_blocks = ceil_div(num_positions, block_size)
    blocks = cache[block_tables[:, :num_blocks].long()]  # [R, nb, bs, kvh, d]
    return blocks.flatten(1, 2)[:, :num_positions]


def _read_context(
    cache: torch.Tensor, block_tables: torch.Tensor, num_positions: int, scale: float, dtype: torch.dtype
) -> torch.Tensor:
    """_gather_context, an FP8 cache's entries dequantized (x * scale) to `dtype`."""
    context = _gather_context(cache, block_tables, num_positions)
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
    """The torch reference of paged_attention (used on CPU and to check the Triton kernel)."""
    starts = metadata.query_start_loc.tolist()
    seq_lens = metadata.seq_lens.tolist()
    out = torch.empty_like(query)
    decode_rows = [i for i in range(len(seq_lens)) if starts[i + 1] - starts[i] == 1]
    if decode_rows:
        # All single-token requests together: each attends to its whole context.
        rows = torch.tensor(decode_rows, device=query.device)
        tokens = metadata.query_start_loc[rows].long()
        lens = metadata.seq_lens[rows]
        longest = max(seq_lens[i] for i in decode_rows)
        keys = _read_context(key_cache, metadata.block_tables[rows], longest, k_scale, query.dtype)
        values = _read_context(value_cache, metadata.block_tables[rows], longest, v_scale, query.dtype)
        mask = (torch.arange(longest, device=query.device)[None, :] < lens[:, None]).unsqueeze(1)
        out[tokens] = _attend(query[tokens].unsqueeze(1), keys, values, mask, scale).squeeze(1)
    for i in range(len(seq_lens)):
        num_new = starts[i + 1] - starts[i]
        if num_new <= 1:
            continue
        seq_len = seq_lens[i]
        table = metadata.block_tables[i : i + 1]
        keys = _read_context(key_cache, table, seq_len, k_scale, query.dtype)
        values = _read_context(value_cache, table, seq_len, v_scale, query.dtype)
        query_positions = torch.arange(seq_len - num_new, seq_len, device=query.device)
        mask = torch.arange(seq_len, device=query.device)[None, :] <= query_positions[:, None]
        chunk = query[starts[i] : starts[i + 1]].unsqueeze(0)
        out[starts[i] : starts[i + 1]] = _attend(chunk, keys, values, mask.unsqueeze(0), scale).squeeze(0)
    return out
