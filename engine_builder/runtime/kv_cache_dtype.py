"""The KV cache's storage dtype (--kv-cache-dtype) and the per-layer scales an FP8 cache is written and read with.

    auto   the model dtype: K and V as computed. KV-cache scales in the checkpoint are not used (logged once, info)
    fp8    float8_e4m3fn, whatever the weights are: half the bytes of bfloat16, so twice the tokens in the same memory.
           K is stored as clamp(k / k_scale, ±448) and read as fp8 * k_scale, V likewise (kernels/kv_cache.py), with
           the checkpoint's per-layer scales (llm-compressor's kv_cache_scheme, ModelOpt's KV quantization), else 1.0
           (a warning)

The scales travel with the weights as `layers.{i}.attention.k_scale` / `.v_scale` (fp8_checkpoint_weights.py reads
them; an engine directory built from such a checkpoint keeps them) and are taken out before the weights attach: they
become plain floats on the Attention layers, read once, so kernels and CUDA graphs get scalars.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from engine_builder.kernels.fp8_format import FP8

logger = logging.getLogger(__name__)

KV_CACHE_DTYPES = ("auto", "fp8")  # what --kv-cache-dtype and load_engine(kv_cache_dtype=...) take
KV_SCALE_SUFFIXES = (".k_scale", ".v_scale")  # engine names: layers.{i}.attention.k_scale, float32 []


def check_kv_cache_dtype(name: str) -> None:
    """ValueError naming the choices unless `name` is one of KV_CACHE_DTYPES."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"KV cache dtype {name!r} is not supported (choose {' or '.join(KV_CACHE_DTYPES)})")


def kv_cache_torch_dtype(name: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The torch dtype the KV cache is stored in.

    Args:
        name: one of KV_CACHE_DTYPES.
        model_dtype: the weights' dtype ("auto" keeps it).
        device: where the cache lives; an FP8 cache on a CUDA GPU needs FP8 conversions (compute capability 8.9+).

    Returns:
        model_dtype, or torch.float8_e4m3fn. Raises ValueError for another name or a GPU without FP8.
    """
    check_kv_cache_dtype(name)
    if name == "auto":
        return model_dtype
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(f"an FP8 KV cache needs a GPU of compute capability 8.9 or later (Ada, Hopper); {device} is "
                         f"{torch.cuda.get_device_name(device)}: use --kv-cache-dtype auto")
    return FP8


def pop_kv_scales(weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """Take the KV-cache scales out of engine-named weights (in place): name -> value."""
    return {name: float(weights.pop(name)) for name in [n for n in weights if n.endswith(KV_SCALE_SUFFIXES)]}


def apply_kv_scales(model: nn.Module, scales: dict[str, float], cache_dtype: torch.dtype) -> None:
    """Give the Attention layers their KV-cache scales when the cache is FP8, and say what happened (once).

    Args:
        model: the materialized model; each `layers.{i}.attention` has float attributes k_scale and v_scale (1.0).
        scales: pop_kv_scales' result, possibly empty.
        cache_dtype: the KV cache's dtype (kv_cache_torch_dtype).

    Raises:
        ValueError: a scale is not a finite number > 0.
    """
    if cache_dtype != FP8:
        if scales:
            logger.info("the checkpoint's KV-cache scales are not used: the KV cache is %s (--kv-cache-dtype fp8 "
                        "would use them)", str(cache_dtype).removeprefix("torch."))
        return
    if not scales:
        logger.warning("FP8 KV cache without KV-cache scales in the checkpoint: K and V are stored with scale 1.0 "
                       "(values beyond ±448 are clipped); a checkpoint calibrated with llm-compressor's "
                       "kv_cache_scheme or ModelOpt's KV-cache quantization brings per-layer scales")
        return
    for name, value in scales.items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"KV-cache scale {name} is {value}; it must be a finite number > 0")
        module_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(module_name), attribute, value)
    logger.info("FP8 KV cache with the checkpoint's per-layer scales (%d layers)", len(scales) // 2)
