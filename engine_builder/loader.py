"""Load an engine for serving: an engine directory, or a Hugging Face checkpoint converted in memory.

The one module above both sides: it reads checkpoints with the build side (checkpoint.py, convert.py) and runs them
with the runtime (runtime/). The returned `Engine` bundles the ModelBackend with what serving needs besides the
forward pass (tokenizer, generation config):

    engine dir ── read_manifest ── runtime.backend.load_backend ("backend" field) ──┐
    checkpoint ── read_checkpoint ── convert_weights ── TorchBackend.from_weights ──┴─▶ Engine(backend, tokenizer)
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine_builder.checkpoint import read_checkpoint
from engine_builder.checkpoint_weights import checkpoint_weights
from engine_builder.convert import dummy_weights
from engine_builder.engine_dir import (
    DTYPES,
    GENERATION_CONFIG,
    MANIFEST,
    EngineLimits,
    default_limits,
    read_manifest,
    resolve_dtype,
)
from engine_builder.forward_batch import KVCacheSpec
from engine_builder.model_config import ModelConfig
from engine_builder.models.registry import expected_shapes, instantiate_model
from engine_builder.quantize import (
    Quantization,
    check_scheme,
    quantize_weights,
    quantized_weight_names,
)
from engine_builder.runtime.backend import ModelBackend, load_backend
from engine_builder.runtime.kv_cache_dtype import check_kv_cache_dtype
from engine_builder.runtime.tokenizer import load_engine_dir_tokenizer, load_tokenizer_files
from engine_builder.runtime.torch_backend import TorchBackend
from engine_builder.sharding import FULL, Shard, check_shardable, shard_tensor


@dataclass(slots=True)
class Engine:
    """A loaded engine: the backend that runs it, and the tokenizer and generation config that come with it.

    config, device, dtype, limits and kv_cache_spec read through to the backend (what the server reads of it).
    """

    backend: ModelBackend
    tokenizer: Any | None  # transformers tokenizer; None when the model ships none
    generation_config: dict[str, Any]  # generation_config.json; {} when there is none

    @property
    def config(self) -> ModelConfig:
        return self.backend.config

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backend.dtype

    @property
    def limits(self) -> EngineLimits:
        return self.backend.limits

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        return self.backend.kv_cache_spec

    @property
    def eos_token_ids(self) -> list[int]:
        """End-of-sequence ids from config.json and generation_config.json together."""
        ids = list(self.config.eos_token_ids)
        extra = self.generation_config.get("eos_token_id")
        for token in extra if isinstance(extra, list) else [extra]:
            if token is not None and token not in ids:
                ids.append(int(token))
        return ids


def load_tokenizer(path: str | Path) -> Any | None:
    """The tokenizer `load_engine(path)` would give its Engine, without reading any weights.

    Args:
        path: engine directory or Hugging Face checkpoint directory.

    Returns:
        The transformers tokenizer, or None when the model ships none. Raises ValueError for a checkpoint
        that cannot be read.
    """
    path = Path(path)
    if (path / MANIFEST).exists():
        return load_engine_dir_tokenizer(path)
    return load_tokenizer_files(path, read_checkpoint(path, with_weights=False).chat_template)


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    return resolved


def load_engine(
    path: str | Path,
    device: str | torch.device = "auto",
    dtype: str | None = None,
    load_format: str = "auto",
    max_seq_len: int | None = None,
    max_batch_size: int | None = None,
    max_num_tokens: int | None = None,
    verify: bool = True,
    progress: bool = True,
    shard: Shard = FULL,
    quantization: str | None = None,
    kv_cache_dtype: str = "auto",
) -> Engine:
    """Load an engine directory, or build one in memory from a Hugging Face checkpoint directory.

    Args:
        path: engine directory (has manifest.json) or checkpoint directory (has config.json).
        device: "auto", "cpu", "cuda" or "cuda:N".
        dtype: override of the weights' dtype ("float32", "float16", "bfloat16"); None keeps the engine's
            (or, for a checkpoint, its config's).
        load_format: "auto" reads weights; "dummy" makes random ones (checkpoints only).
        max_seq_len, max_batch_size, max_num_tokens: limits for a checkpoint; for an engine directory they can
            only lower the limits it was built with.
        verify: check the manifest's sha256 of every file.
        progress: progress bars on stderr.
        shard: the tensor-parallel rank to load: only its part of each tensor is kept (sharding.py).
        quantization: "fp8" quantizes a checkpoint's linears while loading (as inflight-build --quantization fp8
            would); None or "none" keeps its weights. An engine directory runs as it was built (asking for another
            quantization is an error).
        kv_cache_dtype: "auto" stores K/V in the model dtype; "fp8" in float8_e4m3fn with the checkpoint's (or the
            engine directory's) per-layer KV-cache scales, else 1.0: half the bytes per token, whatever the weights'
            quantization (runtime/kv_cache_dtype.py).

    Returns:
        The Engine. Raises ValueError (CheckpointError, EngineDirError) naming the problem, e.g. a backend or
        quantization the manifest names that this Inflight does not have.
    """
    path = Path(path)
    target = _resolve_device(device)
    scheme = check_scheme(quantization)
    check_kv_cache_dtype(kv_cache_dtype)  # before any weight is read
    if (path / MANIFEST).exists():
        manifest = read_manifest(path, verify=verify)
        if scheme is not None and scheme != manifest.quantization:
            raise ValueError(f"{path}: the engine was built with quantization {manifest.quantization or 'none'}; "
                             f"rebuild it with inflight-build --quantization {scheme} to run it so")
        dtype_name = dtype or manifest.dtype
        resolve_dtype(dtype_name, {})
        limits = _narrowed(manifest.limits, max_seq_len, max_batch_size, max_num_tokens)
        check_shardable(manifest.model, shard.size)
        backend = load_backend(path, manifest, target, dtype_name, limits, shard, progress and shard.size > 1,
                               kv_cache_dtype)
        tokenizer = load_engine_dir_tokenizer(path)
        generation = _read_generation(path / GENERATION_CONFIG)
    else:
        checkpoint = read_checkpoint(path, with_weights=load_format != "dummy")
        dtype_name = resolve_dtype(dtype or "auto", checkpoint.hf_config)
        config = checkpoint.model_config
        limits = default_limits(config, max_seq_len, max_batch_size, max_num_tokens)
        check_shardable(config, shard.size)
        dtype_ = DTYPES[dtype_name]
        if load_format == "dummy":
            scheme_config = None if scheme is None else Quantization(scheme=scheme)
            names = quantized_weight_names(instantiate_model(config, dtype_, shard)) if scheme_config else set()
            shapes = expected_shapes(instantiate_model(config, dtype_, shard))
            weights = dict(quantize_weights(dummy_weights(shapes, dtype_, target), names))
        elif load_format == "auto":
            shapes = expected_shapes(instantiate_model(config, dtype_))
            if shard.size == 1:
                read, scheme_config = checkpoint_weights(checkpoint, shapes, dtype_, scheme, target, progress)
                weights = dict(read)
            else:  # each whole tensor is read on the host, cut, and only this rank's part is kept on the device
                read, scheme_config = checkpoint_weights(checkpoint, shapes, dtype_, scheme, "cpu", progress)
                weights = {name: shard_tensor(name, tensor, config, shard).to(target) for name, tensor in read}
        else:
            raise ValueError(f"load format {load_format!r} is not supported (choose auto or dummy)")
        backend = TorchBackend.from_weights(config, weights, target, dtype_, limits, shard, scheme_config,
                                            kv_cache_dtype)
        tokenizer = load_tokenizer_files(path, checkpoint.chat_template)
        generation = checkpoint.generation_config or {}
    if progress:
        part = "" if shard.size == 1 else f", tensor-parallel rank {shard.rank} of {shard.size}"
        cache = "" if kv_cache_dtype == "auto" else f", KV cache {kv_cache_dtype}"
        print(f"loaded {backend.config.architecture} weights ({dtype_name}{part}{cache}) onto {target}",
              file=sys.stderr)
    return Engine(backend=backend, tokenizer=tokenizer, generation_config=generation)


def _narrowed(
    built: EngineLimits, max_seq_len: int | None, max_batch_size: int | None, max_num_tokens: int | None
) -> EngineLimits:
    """An engine's limits, lowered where the caller asks for less; a longer max_seq_len than built is an error."""
    if max_seq_len is not None and max_seq_len > built.max_seq_len:
        raise ValueError(
            f"max model length {max_seq_len} exceeds the engine's max_seq_len {built.max_seq_len}; "
            "rebuild it with a larger inflight-build --max-seq-len"
        )
    return EngineLimits(
        max_seq_len=max_seq_len or built.max_seq_len,
        max_batch_size=min(max_batch_size or built.max_batch_size, built.max_batch_size),
        max_num_tokens=min(max_num_tokens or built.max_num_tokens, built.max_num_tokens),
    )


def _read_generation(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}
