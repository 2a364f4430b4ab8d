"""Hugging Face weights → engine weights: a declarative name map, QKV and gate/up fusion, dtype cast.

Each engine parameter is built from one or more HF tensors; several sources are concatenated along
dim 0 (that is the fusion):

    layers.{i}.attention.qkv_proj.weight  <-  [q_proj; k_proj; v_proj]
    layers.{i}.mlp.gate_up_proj.weight    <-  [gate_proj; up_proj]
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator

import torch
from safetensors import safe_open
from tqdm import tqdm

from engine_builder.checkpoint import Checkpoint, CheckpointError

_LAYER = "model.layers.{i}"
# engine name (layer index as {i}) -> HF source names, concatenated along dim 0 when several.
LLAMA_WEIGHT_MAP: dict[str, list[str]] = {
    "embed_tokens.weight": ["model.embed_tokens.weight"],
    "norm.weight": ["model.norm.weight"],
    "lm_head.weight": ["lm_head.weight"],
    "layers.{i}.input_norm.weight": [f"{_LAYER}.input_layernorm.weight"],
    "layers.{i}.post_attention_norm.weight": [f"{_LAYER}.post_attention_layernorm.weight"],
    "layers.{i}.attention.qkv_proj.weight": [f"{_LAYER}.self_attn.{p}_proj.weight" for p in "qkv"],
    "layers.{i}.attention.qkv_proj.bias": [f"{_LAYER}.self_attn.{p}_proj.bias" for p in "qkv"],
    "layers.{i}.attention.o_proj.weight": [f"{_LAYER}.self_attn.o_proj.weight"],
    "layers.{i}.attention.q_norm.weight": [f"{_LAYER}.self_attn.q_norm.weight"],
    "layers.{i}.attention.k_norm.weight": [f"{_LAYER}.self_attn.k_norm.weight"],
    "layers.{i}.mlp.gate_up_proj.weight": [f"{_LAYER}.mlp.{p}_proj.weight" for p in ("gate", "up")],
    "layers.{i}.mlp.down_proj.weight": [f"{_LAYER}.mlp.down_proj.weight"],
}
WEIGHT_MAPS: dict[str, dict[str, list[str]]] = {
    "LlamaForCausalLM": LLAMA_WEIGHT_MAP,
    "MistralForCausalLM": LLAMA_WEIGHT_MAP,
    "Qwen2ForCausalLM": LLAMA_WEIGHT_MAP,
    "Qwen3ForCausalLM": LLAMA_WEIGHT_MAP,
}
_LAYER_INDEX = re.compile(r"^layers\.(\d+)\.")


def source_names(architecture: str, engine_name: str) -> list[str]:
    """The HF tensor names that make up one engine parameter."""
    match = _LAYER_INDEX.match(engine_name)
    template = _LAYER_INDEX.sub("layers.{i}.", engine_name) if match else engine_name
    sources = WEIGHT_MAPS[architecture].get(template)
    if sources is None:
        raise KeyError(f"no weight map entry for engine parameter {engine_name!r}")
    return [s.format(i=match.group(1)) if match else s for s in sources]


def convert_weights(
    checkpoint: Checkpoint,
    expected_shapes: dict[str, torch.Size],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (engine name, tensor) for every engine parameter, read from the checkpoint and checked.

    Args:
        checkpoint: the indexed checkpoint.
        expected_shapes: engine parameter name -> shape the runtime model expects.
        dtype: target dtype of every tensor.
        device: where the converted tensors are put.
        progress: show a progress bar on stderr.

    Raises:
        CheckpointError: a tensor is missing or has the wrong shape.
    """
    architecture = checkpoint.model_config.architecture
    handles: dict[str, safe_open] = {}
    bar = tqdm(expected_shapes.items(), desc="converting weights", unit="tensor", disable=not progress, file=sys.stderr)
    try:
        for name, shape in bar:
            parts = []
            for source in source_names(architecture, name):
                file = checkpoint.tensor_files.get(source)
                if file is None:
                    raise CheckpointError(f"{checkpoint.path}: tensor {source!r} is missing from the weight files")
                key = str(file)
                if key not in handles:
                    handles[key] = safe_open(file, framework="pt", device="cpu").__enter__()
                parts.append(handles[key].get_tensor(source))
            tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            if tensor.shape != shape:
                raise CheckpointError(
                    f"{checkpoint.path}: shape mismatch for {name} "
                    f"(from {', '.join(source_names(architecture, name))}): "
                    f"checkpoint has {list(tensor.shape)}, config.json implies {list(shape)}"
                )
            yield name, tensor.to(device=device, dtype=dtype)
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)


def dummy_weights(
    expected_shapes: dict[str, torch.Size], dtype: torch.dtype, device: torch.device | str = "cpu", seed: int = 0
) -> Iterator[tuple[str, torch.Tensor]]:
    """Random weights for benchmarking without a checkpoint: N(0, 0.02) matrices, unit norms, zero biases."""
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, shape in expected_shapes.items():
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, dtype=dtype, device=device)
        elif name.endswith(".bias"):
            yield name, torch.zeros(shape, dtype=dtype, device=device)
        else:
            tensor = torch.empty(shape, dtype=dtype, device=device)
            yield name, tensor.normal_(0.0, 0.02, generator=generator)
