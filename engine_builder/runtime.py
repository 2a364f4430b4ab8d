"""Load an engine onto a device and run its forward pass; what the server uses.

`load_engine` accepts an engine directory (built by inflight-build) or a Hugging Face checkpoint
directory, which it converts in memory. The returned `Engine` hides how the forward pass is computed.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from engine_builder.checkpoint import read_checkpoint
from engine_builder.convert import convert_weights, dummy_weights
from engine_builder.cuda_graphs import DecodeGraphs
from engine_builder.engine_dir import (
    DTYPES,
    MANIFEST,
    WEIGHTS,
    EngineLimits,
    default_limits,
    read_manifest,
    resolve_dtype,
)
from engine_builder.forward_batch import ForwardBatch, KVCacheSpec, LayerKVCache, build_forward_batch
from engine_builder.kernels.dispatch import use_triton
from engine_builder.kernels.gemv import tune_gemv
from engine_builder.layers.linear import ColumnParallelLinear, RowParallelLinear
from engine_builder.layers.rotary import RotaryEmbedding
from engine_builder.model_config import ModelConfig
from engine_builder.models.registry import expected_shapes, instantiate_model

logger = logging.getLogger(__name__)


def materialize(model: nn.Module, weights: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """Attach loaded weights to a meta-device model and rebuild its non-persistent buffers on `device`."""
    model.load_state_dict(weights, strict=True, assign=True)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.materialize(device)
    return model


@dataclass(slots=True)
class Engine:
    """A model ready to run on a device, with its tokenizer and limits."""

    config: ModelConfig
    model: nn.Module
    device: torch.device
    dtype: torch.dtype
    limits: EngineLimits
    tokenizer: Any | None  # transformers tokenizer; None when the checkpoint ships none
    generation_config: dict[str, Any]
    graphs: DecodeGraphs | None = None  # captured decode graphs, once capture_cuda_graphs ran

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(self.config.num_layers, self.config.num_kv_heads, self.config.head_dim, self.dtype)

    @property
    def eos_token_ids(self) -> list[int]:
        """End-of-sequence ids from config.json and generation_config.json together."""
        ids = list(self.config.eos_token_ids)
        extra = self.generation_config.get("eos_token_id")
        for token in extra if isinstance(extra, list) else [extra]:
            if token is not None and token not in ids:
                ids.append(int(token))
        return ids

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> list[LayerKVCache]:
        """One K and one V pool per layer, [num_blocks, block_size, num_kv_heads, head_dim]."""
        shape = (num_blocks, block_size, self.config.num_kv_heads, self.config.head_dim)
        return [
            LayerKVCache(
                key=torch.zeros(shape, dtype=self.dtype, device=self.device),
                value=torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(self.config.num_layers)
        ]

    def forward(self, batch: ForwardBatch, kv_caches: list[LayerKVCache]) -> torch.Tensor:
        """One step over the batch; float32 logits [num_outputs, vocab_size].

        Decode-only batches replay a captured CUDA graph when one fits; everything else runs eagerly.
        """
        if self.graphs is not None and self.graphs.can_run(batch, kv_caches):
            return self.graphs.run(batch)
        return self.model(batch, kv_caches)

    def profile_peak_memory(self, num_tokens: int, num_outputs: int, block_size: int) -> int:
        """Warm up with the largest step the server will run and return its peak extra device memory in bytes.

        Runs one forward pass of `num_tokens` prompt tokens spread over `num_outputs` requests (logits for
        each), on a throwaway KV cache just large enough; compiles the kernels on the way. The server sizes
        the KV pool from what is free after this (CPU: returns 0, nothing to measure).
        """
        if self.device.type != "cuda":
            return 0
        num_outputs = max(1, min(num_outputs, num_tokens))
        lengths = [num_tokens // num_outputs + (1 if i < num_tokens % num_outputs else 0) for i in range(num_outputs)]
        tables, next_block = [], 0
        for length in lengths:
            count = -(-length // block_size)
            tables.append(list(range(next_block, next_block + count)))
            next_block += count
        kv_caches = self.allocate_kv_cache(next_block, block_size)
        tokens = [[i % self.config.vocab_size for i in range(length)] for length in lengths]
        batch = build_forward_batch(tokens, [0] * num_outputs, tables, block_size, device=self.device)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        baseline = torch.cuda.memory_allocated(self.device)
        self.model(batch, kv_caches)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - baseline
        del kv_caches, batch
        torch.cuda.empty_cache()
        return peak

    def linear_weights(self) -> list[torch.Tensor]:
        """Every matmul weight of the model, the output head (tied or not) included."""
        weights = [m.weight for m in self.model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear, nn.Linear))]
        if getattr(self.model, "lm_head", None) is None:
            weights.append(self.model.embed_tokens.weight)
        return weights

    def capture_cuda_graphs(
        self, kv_caches: list[LayerKVCache], block_size: int, max_batch_size: int | None = None, progress: bool = True
    ) -> bool:
        """Capture decode graphs for these KV caches (CUDA with Triton only). Returns whether graphs are in use."""
        if self.device.type != "cuda" or not use_triton(kv_caches[0].key):
            return False
        batch_size = min(max_batch_size or self.limits.max_batch_size, self.limits.max_batch_size)
        tune_gemv(self.linear_weights())  # before capture: the batch-1 graph records the chosen kernels
        self.graphs = DecodeGraphs(self.model, kv_caches, block_size, batch_size, self.limits.max_seq_len)
        self.graphs.capture(progress)
        return True


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
        return _load_tokenizer(path / "tokenizer", _engine_dir_chat_template(path / "tokenizer"))
    return _load_tokenizer(path, read_checkpoint(path, with_weights=False).chat_template)


def _engine_dir_chat_template(tokenizer_dir: Path) -> str | None:
    template_file = tokenizer_dir / "chat_template.jinja"
    return template_file.read_text() if template_file.exists() else None


def _load_tokenizer(directory: Path, chat_template: str | None) -> Any | None:
    if not any(directory.glob("tokenizer*")):
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    if chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat_template
    return tokenizer


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

    Returns:
        The Engine. Raises ValueError (CheckpointError, EngineDirError) naming the problem.
    """
    path = Path(path)
    target = _resolve_device(device)
    if (path / MANIFEST).exists():
        manifest = read_manifest(path, verify=verify)
        dtype_name = dtype or manifest.dtype
        resolve_dtype(dtype_name, {})
        model = instantiate_model(manifest.model, DTYPES[dtype_name])
        weights = load_file(str(path / WEIGHTS), device=str(target))
        weights = {k: v.to(DTYPES[dtype_name]) for k, v in weights.items()}
        config, tokenizer_dir = manifest.model, path / "tokenizer"
        limits = _narrowed(manifest.limits, max_seq_len, max_batch_size, max_num_tokens)
        generation_path = path / "generation_config.json"
        generation = _read_generation(generation_path)
        chat_template = _engine_dir_chat_template(tokenizer_dir)
    else:
        checkpoint = read_checkpoint(path, with_weights=load_format != "dummy")
        dtype_name = resolve_dtype(dtype or "auto", checkpoint.hf_config)
        config = checkpoint.model_config
        limits = default_limits(config, max_seq_len, max_batch_size, max_num_tokens)
        model = instantiate_model(config, DTYPES[dtype_name])
        shapes = expected_shapes(model)
        if load_format == "dummy":
            weights = dict(dummy_weights(shapes, DTYPES[dtype_name], target))
        elif load_format == "auto":
            weights = dict(convert_weights(checkpoint, shapes, DTYPES[dtype_name], target, progress))
        else:
            raise ValueError(f"load format {load_format!r} is not supported (choose auto or dummy)")
        tokenizer_dir, generation, chat_template = path, checkpoint.generation_config or {}, checkpoint.chat_template
    if progress:
        print(f"loaded {config.architecture} weights ({dtype_name}) onto {target}", file=sys.stderr)
    return Engine(
        config=config,
        model=materialize(model, weights, target),
        device=target,
        dtype=DTYPES[dtype_name],
        limits=limits,
        tokenizer=_load_tokenizer(tokenizer_dir, chat_template),
        generation_config=generation,
    )


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
