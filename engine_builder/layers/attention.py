"""Self-attention over the paged KV cache: fused QKV projection, rotary, cache write, paged attention."""

from __future__ import annotations

import torch
from torch import nn

from engine_builder.forward_batch import AttentionMetadata, LayerKVCache
from engine_builder.kernels.paged_attention import paged_attention
from engine_builder.kernels.rotary import rotary_and_write_kv
from engine_builder.layers.linear import ColumnParallelLinear, RowParallelLinear
from engine_builder.layers.norm import RMSNorm
from engine_builder.layers.rotary import RotaryEmbedding
from engine_builder.model_config import ModelConfig
from engine_builder.sharding import FULL, Shard, num_kv_heads_per_rank


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, shard: Shard = FULL):
        super().__init__()
        self.num_heads = config.num_attention_heads // shard.size  # this rank's heads
        self.num_kv_heads = num_kv_heads_per_rank(config, shard.size)
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        # An FP8 KV cache stores K / k_scale and V / v_scale (kernels/kv_cache.py): plain floats set once at load
        # (runtime/kv_cache_dtype.py), so kernels and CUDA graphs take scalars; a model-dtype cache ignores them.
        self.k_scale = 1.0
        self.v_scale = 1.0
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, qkv_out, config.attention_bias)
        self.o_proj = RowParallelLinear(config.q_size, config.hidden_size, False, shard)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self, hidden: torch.Tensor, positions: torch.Tensor, cache: LayerKVCache, metadata: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        query, key, value = self.qkv_proj(hidden).split([q_size, kv_size, kv_size], dim=-1)
        query = query.reshape(num_tokens, self.num_heads, self.head_dim)
        key = key.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        value = value.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:  # both or neither (config.qk_norm)
            query, key = self.q_norm(query), self.k_norm(key)
        query = rotary_and_write_kv(
            query, key, value, positions, self.rotary.inv_freq, cache.key, cache.value,
            metadata.slot_mapping, metadata.query_start_loc[-1:], self.k_scale, self.v_scale,
        )
        out = paged_attention(query, cache.key, cache.value, metadata, self.scale, self.k_scale, self.v_scale)
        return self.o_proj(out.reshape(num_tokens, q_size))
