"""Map a Hugging Face architecture name to the runtime model class. Adding a family is one file + one line."""

from __future__ import annotations

import torch
from torch import nn

from engine_builder.model_config import ModelConfig
from engine_builder.models.llama import LlamaModel
from engine_builder.models.qwen import Qwen2Model, Qwen3Model
from engine_builder.quantize import Quantization, quantize_model
from engine_builder.sharding import FULL, Shard

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaModel,
    "MistralForCausalLM": LlamaModel,
    "Qwen2ForCausalLM": Qwen2Model,
    "Qwen3ForCausalLM": Qwen3Model,
}


def model_class(architecture: str) -> type[nn.Module]:
    """The runtime class for an architecture; ValueError listing the supported ones otherwise."""
    try:
        return MODEL_CLASSES[architecture]
    except KeyError:
        supported = ", ".join(sorted(MODEL_CLASSES))
        raise ValueError(f"architecture {architecture!r} is not supported (supported: {supported})") from None


def build_model(config: ModelConfig, shard: Shard = FULL) -> nn.Module:
    return model_class(config.architecture)(config, shard)


def instantiate_model(config: ModelConfig, dtype: torch.dtype, shard: Shard = FULL,
                      quantization: Quantization | None = None) -> nn.Module:
    """The model (a tensor-parallel rank's part of it with `shard`) on the meta device (no memory) with parameters
    of `dtype`, its linears FP8 with a `quantization`; the builder reads its shapes."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            return quantize_model(build_model(config, shard).eval(), quantization)
    finally:
        torch.set_default_dtype(previous)


def expected_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Engine parameter name -> shape, in the model's order."""
    return {name: tensor.shape for name, tensor in model.state_dict().items()}
