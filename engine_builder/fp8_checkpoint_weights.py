"""Read a pre-quantized FP8 checkpoint's tensors into the engine's FP8 convention.

What the producers write for each quantized linear X (e.g. model.layers.0.self_attn.q_proj), as seen in files
written by llm-compressor 0.14 / compressed-tensors 0.19 and nvidia-modelopt 0.47:

    tensor            dtype          compressed-tensors FP8 / FP8_DYNAMIC       ModelOpt FP8 / FP8_PER_CHANNEL_PER_TOKEN
    X.weight          float8_e4m3fn  [out, in]                                  [out, in]
    X.weight_scale    float32        [1] (tensor) / [out, 1] (channel)          [] / [out]
    X.input_scale     float32        [1] (static only)                          [] (FP8 only)
    KV-cache scales   float32        model.layers.i.self_attn.{k,v}_scale       model.layers.i.self_attn.{k,v}_proj.
                                                                                {k,v}_scale, [] (= amax / 448)
Dequantized, W = weight.float() * weight_scale (broadcast over rows). The engine's convention, per engine linear P
(engine names as convert.py's weight map, q/k/v and gate/up fused by concatenation along dim 0):

    P.weight        float8_e4m3fn [out, in]   the parts' FP8 values, concatenated unchanged
    P.weight_scale  float32 [out]             per output row: a per-tensor scale is repeated over its part's rows
    P.input_scale   float32 []                static activations only; for fused parts the largest of theirs (the
                                              activation is shared; a larger scale cannot overflow any part)
    layers.{i}.attention.k_scale / v_scale    float32 [], when the checkpoint has KV-cache scales

Everything else (embeddings, norms, biases, lm_head) comes in the model dtype; a quantized lm_head or embedding (not in
the producer's ignore list) is dequantized to it.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from engine_builder.checkpoint import Checkpoint, CheckpointError
from engine_builder.convert import source_names
from engine_builder.quantized_checkpoint import FP8CheckpointScheme

FP8_DTYPE = torch.float8_e4m3fn
_LINEAR = re.compile(r"^layers\.\d+\.(attention|mlp)\.\w+_proj\.weight$")  # the decoder linears that stay FP8
_QKV = re.compile(r"^layers\.(\d+)\.attention\.qkv_proj\.weight$")


class _Tensors:
    """Lazily opened safetensors files of a checkpoint; tensors by HF name."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.path = checkpoint.path
        self.files = checkpoint.tensor_files
        self.handles: dict[Path, safe_open] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        file = self.files.get(name)
        if file is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the weight files")
        if file not in self.handles:
            self.handles[file] = safe_open(file, framework="pt", device="cpu").__enter__()
        return self.handles[file].get_tensor(name)

    def close(self) -> None:
        for handle in self.handles.values():
            handle.__exit__(None, None, None)


def _prefix(source: str) -> str:
    return source.removesuffix(".weight")


def _row_scales(tensors: _Tensors, source: str, rows: int) -> torch.Tensor:
    """One part's weight_scale as float32 [rows] (a per-tensor scale repeated); block-wise scales are refused."""
    name = f"{_prefix(source)}.weight_scale"
    scale = tensors.get(name).to(torch.float32)
    if scale.numel() == 1:
        return scale.reshape(1).expand(rows).clone()
    if scale.numel() == rows and scale.dim() <= 2 and scale.shape[0] == rows:
        return scale.reshape(rows)
    raise CheckpointError(f"{tensors.path}: {name} has shape {list(scale.shape)}; only one scale per tensor or per "
                          f"output channel ({rows}) is supported (block-wise or group scales are not)")


def _fp8_part(tensors: _Tensors, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight, float32 row scales) of one quantized HF linear."""
    weight = tensors.get(source)
    if weight.dtype != FP8_DTYPE:
        raise CheckpointError(f"{tensors.path}: {source} is {weight.dtype}, expected {FP8_DTYPE} next to its "
                              "weight_scale")
    return weight, _row_scales(tensors, source, weight.shape[0])


def _is_quantized(tensors: _Tensors, source: str) -> bool:
    if f"{_prefix(source)}.weight_scale_inv" in tensors:
        raise CheckpointError(f"{tensors.path}: {_prefix(source)}.weight_scale_inv: block-wise FP8 scales are not "
                              "supported (only per-tensor or per-channel weight_scale)")
    return f"{_prefix(source)}.weight_scale" in tensors


def _input_scale(tensors: _Tensors, sources: list[str], name: str) -> torch.Tensor:
    """The largest of the parts' static input scales, float32 []."""
    scales = []
    for source in sources:
        scale = tensors.get(f"{_prefix(source)}.input_scale").to(torch.float32)
        if scale.numel() != 1:
            raise CheckpointError(f"{tensors.path}: {_prefix(source)}.input_scale has shape {list(scale.shape)}; "
                                  f"{name} needs one static activation scale per tensor")
        scales.append(scale.reshape(()))
    return torch.stack(scales).amax()


def _kv_scales(tensors: _Tensors, architecture: str, layer: str) -> Iterator[tuple[str, torch.Tensor]]:
    """layers.{i}.attention.k_scale / v_scale from either producer's names."""
    _, k_source, v_source = source_names(architecture, f"layers.{layer}.attention.qkv_proj.weight")
    for kind, source in (("k", k_source), ("v", v_source)):
        projection = _prefix(source)  # model.layers.i.self_attn.k_proj
        candidates = [f"{projection.rpartition('.')[0]}.{kind}_scale", f"{projection}.{kind}_scale"]
        found = [name for name in candidates if name in tensors]
        if not found:
            raise CheckpointError(f"{tensors.path}: the quantization config declares KV-cache scales but layer "
                                  f"{layer} has none (looked for {' or '.join(candidates)})")
        scale = tensors.get(found[0]).to(torch.float32)
        if scale.numel() != 1:
            raise CheckpointError(f"{tensors.path}: {found[0]} has shape {list(scale.shape)}; one per-tensor "
                                  "KV-cache scale per layer is supported")
        yield f"layers.{layer}.attention.{kind}_scale", scale.reshape(())


def read_fp8_weights(
    checkpoint: Checkpoint,
    expected_shapes: dict[str, torch.Size],
    dtype: torch.dtype,
    scheme: FP8CheckpointScheme,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (engine name, tensor) for a pre-quantized FP8 checkpoint, in the convention of this module's docstring.

    Args:
        checkpoint: the indexed checkpoint.
        expected_shapes: engine parameter name -> shape of the unquantized model (as for convert_weights).
        dtype: dtype of every tensor that is not FP8 or a scale.
        scheme: detect_quantization(checkpoint).
        device: where the tensors are put.
        progress: show a progress bar on stderr.

    Returns:
        An iterator: for each decoder linear P, P.weight (FP8), P.weight_scale and, for static activations,
        P.input_scale; every other expected parameter in `dtype`; then the KV-cache scales, if any.

    Raises:
        CheckpointError: a tensor is missing or of the wrong shape or dtype, a fused projection mixes quantized and
            unquantized parts, or scales are block-wise.
    """
    architecture = checkpoint.model_config.architecture
    tensors = _Tensors(checkpoint)
    layers: list[str] = []
    bar = tqdm(expected_shapes.items(), desc="reading FP8 weights", unit="tensor", disable=not progress,
               file=sys.stderr)
    try:
        for name, shape in bar:
            sources = source_names(architecture, name)
            quantized = [_is_quantized(tensors, source) for source in sources]
            if any(quantized) and not all(quantized):
                raise CheckpointError(f"{checkpoint.path}: {name} fuses quantized and unquantized tensors "
                                      f"({', '.join(s for s, q in zip(sources, quantized) if not q)} have no "
                                      "weight_scale)")
            if all(quantized) and _LINEAR.match(name):
                parts = [_fp8_part(tensors, source) for source in sources]
                weight = torch.cat([w for w, _ in parts]) if len(parts) > 1 else parts[0][0]
                _check_shape(checkpoint, name, sources, weight, shape)
                yield name, weight.to(device)
                yield name.removesuffix("weight") + "weight_scale", torch.cat([s for _, s in parts]).to(device)
                if scheme.activations == "static":
                    yield name.removesuffix("weight") + "input_scale", _input_scale(tensors, sources, name).to(device)
            elif all(quantized):  # e.g. an lm_head the producer did not ignore: dequantized to the model dtype
                parts = [_fp8_part(tensors, source) for source in sources]
                tensor = torch.cat([w.to(torch.float32) * s[:, None] for w, s in parts])
                _check_shape(checkpoint, name, sources, tensor, shape)
                yield name, tensor.to(device=device, dtype=dtype)
            else:
                parts = [tensors.get(source) for source in sources]
                tensor = torch.cat(parts) if len(parts) > 1 else parts[0]
                _check_shape(checkpoint, name, sources, tensor, shape)
                yield name, tensor.to(device=device, dtype=dtype)
            if (match := _QKV.match(name)) is not None:
                layers.append(match.group(1))
        if scheme.kv_cache_scales:
            for layer in layers:
                for name, scale in _kv_scales(tensors, architecture, layer):
                    yield name, scale.to(device)
    finally:
        tensors.close()


def _check_shape(checkpoint: Checkpoint, name: str, sources: list[str], tensor: torch.Tensor,
                 shape: torch.Size) -> None:
    if tensor.shape != shape:
        raise CheckpointError(f"{checkpoint.path}: shape mismatch for {name} (from {', '.join(sources)}): checkpoint "
                              f"has {list(tensor.shape)}, config.json implies {list(shape)}")


def dequantize(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """The float32 matrix an engine FP8 weight stands for: weight * weight_scale[:, None].

    Args:
        weight: float8_e4m3fn [out, in].
        weight_scale: float32 [out].

    Returns:
        float32 [out, in].
    """
    return weight.to(torch.float32) * weight_scale[:, None]
