"""Rotary position embedding, "rotate half" layout as in transformers' Llama (torch reference)."""

from __future__ import annotations

import torch

from engine_builder.kernels.dispatch import use_triton


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate each head of x by its token's position.

    Args:
        x: [num_tokens, num_heads, head_dim].
        positions: [num_tokens] int64.
        inv_freq: [head_dim // 2] float32 frequencies.

    Returns:
        Rotated tensor, same shape and dtype as x.
    """
    if use_triton(x):
        from engine_builder.kernels.triton_elementwise import apply_rotary_triton

        return apply_rotary_triton(x, positions, inv_freq)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    cos = freqs.cos().to(x.dtype)[:, None, :]
    sin = freqs.sin().to(x.dtype)[:, None, :]
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def rotary_and_write_kv(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_valid_tokens: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Rotate query and key, store the rotated key and the value in the paged cache; return the rotated query.

    One pass on GPU (the rotated key is never materialised outside the cache). See kv_cache.write_kv for
    slot_mapping, num_valid_tokens and the scales of an FP8 cache.
    """
    if use_triton(query):
        from engine_builder.kernels.triton_elementwise import rotary_write_kv_triton

        return rotary_write_kv_triton(
            query, key, value, positions, inv_freq, key_cache, value_cache, slot_mapping, num_valid_tokens,
            k_scale, v_scale,
        )
    from engine_builder.kernels.kv_cache import write_kv

    num_heads = query.shape[1]
    rotated = apply_rotary(torch.cat((query, key), dim=1), positions, inv_freq)  # one set of cos/sin for both
    write_kv(rotated[:, num_heads:], value, key_cache, value_cache, slot_mapping, num_valid_tokens, k_scale, v_scale)
    return rotated[:, :num_heads]
