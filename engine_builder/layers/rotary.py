"""Rotary embedding frequencies, including Llama-3 frequency scaling."""

from __future__ import annotations

import math

import torch
from torch import nn

from engine_builder.model_config import RopeScaling


def rotary_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies, scaled the way transformers scales "llama3" rope."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Holds the inverse frequencies; the attention layer applies them with kernels.rotary.rotary_and_write_kv."""

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.register_buffer("inv_freq", rotary_inv_freq(head_dim, theta, scaling), persistent=False)

    def materialize(self, device: torch.device | str) -> None:
        """Recompute the frequencies on `device` (the model is built on the meta device, then loaded)."""
        self.inv_freq = rotary_inv_freq(self.head_dim, self.theta, self.scaling).to(device)
