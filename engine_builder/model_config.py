"""The model dimensions the runtime needs, read from a Hugging Face config.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Llama-3 style frequency scaling ("rope_type": "llama3"); other types are refused."""

    factor: float  # how much the context was stretched
    low_freq_factor: float  # wavelengths above original/low_freq_factor are scaled fully
    high_freq_factor: float  # wavelengths below original/high_freq_factor are left alone
    original_max_position_embeddings: int  # context length the model was trained at


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Architecture and dimensions of a decoder-only transformer."""

    architecture: str  # HF class name, e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool  # RMSNorm over each head of q and k before rotary (Qwen3)
    sliding_window: int | None  # Mistral; only accepted when >= the engine's max_seq_len
    bos_token_id: int | None
    eos_token_ids: list[int]

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        values = dict(data)
        if values.get("rope_scaling") is not None:
            values["rope_scaling"] = RopeScaling(**values["rope_scaling"])
        return cls(**values)


def _rope_parameters(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """Return (rope_theta, scaling) from either the old `rope_scaling` or the newer `rope_parameters` key."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or None
    theta = float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if scaling is None:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"rope scaling type {kind!r} is not supported (supported: llama3)")
    return theta, RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, list):
        return [int(v) for v in value]
    return [int(value)]


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Translate a Hugging Face config.json dict into a ModelConfig.

    Args:
        hf: the parsed config.json.

    Returns:
        The ModelConfig. Raises ValueError naming the missing or unsupported field.
    """
    architectures = hf.get("architectures") or []
    if not architectures:
        raise ValueError("config.json has no 'architectures' entry")
    architecture = architectures[0]
    required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
    missing = [key for key in required if key not in hf]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}")
    num_heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    head_dim = hf.get("head_dim") or hidden // num_heads
    rope_theta, rope_scaling = _rope_parameters(hf)
    is_qwen2 = architecture == "Qwen2ForCausalLM"
    return ModelConfig(
        architecture=architecture,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=is_qwen2 or bool(hf.get("attention_bias", False)),
        qk_norm=architecture == "Qwen3ForCausalLM",
        sliding_window=(
            int(hf["sliding_window"]) if hf.get("sliding_window") and hf.get("use_sliding_window", True) else None
        ),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_as_id_list(hf.get("eos_token_id")),
    )
