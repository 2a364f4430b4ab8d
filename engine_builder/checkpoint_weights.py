"""A checkpoint's weights in the engine's convention, quantized or not: what inflight-build and the loader read.

    unquantized checkpoint ──convert.py──▶ engine weights (model dtype) ──[--quantization fp8]──▶ FP8 + scales
    pre-quantized FP8 checkpoint (compressed-tensors, ModelOpt; quantized_checkpoint.py) ──fp8_checkpoint_weights.py──▶
        FP8 + scales as the producer calibrated them, KV-cache scales included (for an FP8 KV cache:
        runtime/kv_cache_dtype.py)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from engine_builder.checkpoint import Checkpoint
from engine_builder.convert import convert_weights
from engine_builder.fp8_checkpoint_weights import read_fp8_weights
from engine_builder.quantize import LINEAR_WEIGHTS, Quantization, quantize_weights
from engine_builder.quantized_checkpoint import detect_quantization


def checkpoint_weights(checkpoint: Checkpoint, shapes: dict[str, torch.Size], dtype: torch.dtype,
                       scheme: str | None, device: torch.device | str = "cpu", progress: bool = True,
                       ) -> tuple[Iterator[tuple[str, torch.Tensor]], Quantization | None]:
    """A checkpoint's weights in the engine's convention, and how they are quantized.

    A pre-quantized FP8 checkpoint (llm-compressor's compressed-tensors, ModelOpt; quantized_checkpoint.py) is read
    as it is; another is converted (convert.py) and, with scheme "fp8", quantized per output channel here.

    Args:
        checkpoint: the indexed checkpoint.
        shapes: engine parameter name -> shape of the unquantized model.
        dtype: the model dtype.
        scheme: None, or "fp8" to quantize an unquantized checkpoint (a pre-quantized one is FP8 anyway).
        device: where the tensors go.
        progress: progress bars on stderr.

    Returns:
        (the (name, tensor) iterator, the Quantization or None). The iterator ends with the checkpoint's KV-cache
        scales (layers.{i}.attention.k_scale / v_scale) where it has them.
    """
    found = detect_quantization(checkpoint)
    if found is None:
        weights = convert_weights(checkpoint, shapes, dtype, device, progress)
        if scheme is None:
            return weights, None
        return quantize_weights(weights, {n for n in shapes if n.endswith(LINEAR_WEIGHTS)}), Quantization()
    quantization = Quantization(activations=found.activations, source=found.source,
                                weights=f"float8_e4m3fn, {found.weights} scales as written by {found.source} "
                                f"({found.scheme}), one float32 scale per output channel")
    return read_fp8_weights(checkpoint, shapes, dtype, found, device, progress), quantization

