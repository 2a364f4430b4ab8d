"""Write new keys and values into the paged KV cache, in the model dtype or in FP8 with a per-layer scale.

    cache dtype        stored                               read back as
    model dtype        k                                    k
    float8_e4m3fn      clamp(k / k_scale, -448, 448)        fp8 * k_scale        (V likewise, with v_scale)

Dividing is multiplying by the float32 reciprocal 1 / k_scale, here and in the Triton kernels, so both store the
same bytes.
"""

from __future__ import annotations

import torch

from engine_builder.kernels.dispatch import use_triton
from engine_builder.kernels.fp8_format import FP8, FP8_MAX


def is_fp8(cache: torch.Tensor) -> bool:
    """Whether a KV cache pool stores FP8 (e4m3), so its values are scaled."""
    return cache.dtype == FP8


def quantize_kv(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x as an FP8 cache stores it: clamp(x / scale, ±448) in float8_e4m3fn."""
    return (x.float() * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize_kv(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """What FP8 cache entries stand for: x * scale, in `dtype`."""
    return (x.float() * scale).to(dtype)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_valid_tokens: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Store each token's K and V at its slot (slot = block_id * block_size + offset).

    Args:
        key, value: [num_tokens, num_kv_heads, head_dim].
        key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim], written in place.
        slot_mapping: [num_tokens] int64.
        num_valid_tokens: 1-element device tensor; tokens at or past it are CUDA-graph padding, not written.
            Padding only exists on the Triton path (graphs), so the torch reference writes every token.
        k_scale, v_scale: the layer's KV-cache scales, used by an FP8 cache only (see the module docstring).
    """
    if use_triton(key):
        from engine_builder.kernels.triton_elementwise import write_kv_triton

        return write_kv_triton(key, value, key_cache, value_cache, slot_mapping, num_valid_tokens, k_scale, v_scale)
    num_blocks, block_size, num_heads, head_dim = key_cache.shape
    if is_fp8(key_cache):  # torch's CPU index_copy_ has no FP8 kernel: copy the bytes
        for data, cache, scale in ((key, key_cache, k_scale), (value, value_cache, v_scale)):
            cache.view(torch.uint8).view(num_blocks * block_size, num_heads, head_dim).index_copy_(
                0, slot_mapping, quantize_kv(data, scale).view(torch.uint8)
            )
        return
    key_cache.view(num_blocks * block_size, num_heads, head_dim).index_copy_(0, slot_mapping, key.to(key_cache.dtype))
    value_cache.view(num_blocks * block_size, num_heads, head_dim).index_copy_(
        0, slot_mapping, value.to(value_cache.dtype)
    )
