"""Llama-family decoder (Llama 2/3/3.1/3.2, Mistral); Qwen variants reuse it through config flags."""

from __future__ import annotations

import torch
from torch import nn

from engine_builder.forward_batch import ForwardBatch, LayerKVCache
from engine_builder.layers.attention import Attention
from engine_builder.layers.embedding import VocabParallelEmbedding, vocab_logits
from engine_builder.layers.mlp import GatedMLP
from engine_builder.layers.norm import RMSNorm
from engine_builder.model_config import ModelConfig
from engine_builder.sharding import FULL, Shard, check_shardable


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, shard: Shard):
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config, shard)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, shard)

    def forward(self, hidden, residual, positions, cache: LayerKVCache, metadata):
        if residual is None:
            residual = hidden
            hidden = self.input_norm(hidden)
        else:
            hidden, residual = self.input_norm(hidden, residual)
        hidden = self.attention(hidden, positions, cache, metadata)
        hidden, residual = self.post_attention_norm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """Decoder-only transformer with pre-norm, GQA attention and a gated MLP.

    Parameter names are the engine's own (see convert.py for the map from Hugging Face names). With a tensor-parallel
    `shard` each parameter has that rank's shape (sharding.py); the forward pass then all-reduces after o_proj,
    down_proj and the embedding, and all-gathers the logits, so every rank returns the same logits.
    """

    def __init__(self, config: ModelConfig, shard: Shard = FULL):
        super().__init__()
        check_shardable(config, shard.size)
        self.config = config
        self.shard = shard
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, shard)
        self.layers = nn.ModuleList(DecoderLayer(config, shard) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(config.hidden_size, self.embed_tokens.rows, bias=False)
            self.lm_head.weight.requires_grad_(False)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_caches: list[LayerKVCache]) -> torch.Tensor:
        """Run one step and return float32 logits [num_outputs, vocab_size] for batch.logits_indices."""
        hidden = self.embed_tokens(batch.input_ids)
        residual = None
        for layer, cache in zip(self.layers, kv_caches):
            hidden, residual = layer(hidden, residual, batch.positions, cache, batch.attention)
        hidden, _ = self.norm(hidden, residual)
        hidden = hidden[batch.logits_indices]
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return vocab_logits(hidden, head, self.config.vocab_size, self.shard).float()
