"""Write new keys and values into the paged KV cache."""

from __future__ import annotations

import torch

from engine_builder.kernels.dispatch import use_triton


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_valid_tokens: torch.Tensor | None = None,
) -> None:
    """Store each token's K and V at its slot (slot = block_id * block_size + offset).

    Args:
        key, value: [num_tokens, num_kv_heads, head_dim].
        key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim], written in place.
        slot_mapping: [num_tokens] int64.
        num_valid_tokens: 1-element device tensor; tokens at or past it are CUDA-graph padding, not written.
            Padding only exists on the Triton path (graphs), so the torch reference writes every token.
    """
    if use_triton(key):
        from engine_builder.kernels.triton_elementwise import write_kv_triton

        return write_kv_triton(key, value, key_cache, value_cache, slot_mapping, num_valid_tokens)
    num_blocks, block_size, num_heads, head_dim = key_cache.shape
    key_cache.view(num_blocks * block_size, num_heads, head_dim).index_copy_(0, slot_mapping, key.to(key_cache.dtype))
    value_cache.view(num_blocks * block_size, num_heads, head_dim).index_copy_(
        0, slot_mapping, value.to(value_cache.dtype)
    )
