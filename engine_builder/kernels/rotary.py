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
