"""Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm): the Llama layout with flags set in ModelConfig."""

from __future__ import annotations

from engine_builder.models.llama import LlamaModel


class Qwen2Model(LlamaModel):
    """Qwen2: attention_bias is forced on by model_config_from_hf."""


class Qwen3Model(LlamaModel):
    """Qwen3: qk_norm is set by model_config_from_hf; attention has q_norm/k_norm."""
