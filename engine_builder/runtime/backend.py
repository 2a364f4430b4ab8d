"""What runs an engine's forward pass: the ModelBackend protocol, and which backend loads an engine directory.

The server steps a backend through this surface only, so a second implementation (a TensorRT engine) is one new
module with a `load_engine_dir` and a `QUANTIZATIONS` tuple, named in BACKENDS:

    manifest.json "backend" ──BACKENDS──▶ module.load_engine_dir(directory, manifest, ...) ──▶ ModelBackend
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from engine_builder.engine_dir import EngineDirError, EngineLimits, Manifest
from engine_builder.forward_batch import ForwardBatch, KVCacheSpec, LayerKVCache
from engine_builder.model_config import ModelConfig
from engine_builder.sharding import FULL, Shard

# manifest "backend" -> module defining QUANTIZATIONS and load_engine_dir; imported only when an engine names it,
# so a backend whose library is not installed costs nothing until then.
BACKENDS: dict[str, str] = {
    "torch": "engine_builder.runtime.torch_backend",
}


@runtime_checkable
class ModelBackend(Protocol):
    """A model on a device: paged KV cache pools, the forward pass over a ForwardBatch, and its sizes."""

    @property
    def config(self) -> ModelConfig:
        """Architecture and dimensions (vocab_size, layers, heads)."""
        ...

    @property
    def device(self) -> torch.device:
        """Where the weights, KV cache and logits live."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (the KV cache's is kv_cache_spec.dtype)."""
        ...

    @property
    def limits(self) -> EngineLimits:
        """The sizes this backend runs (the engine's, lowered where the loader asked)."""
        ...

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        """Geometry of one KV block, so the server can size the pool."""
        ...

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> list[LayerKVCache]:
        """One K and one V pool per layer, [num_blocks, block_size, num_kv_heads, head_dim] of kv_cache_spec.dtype,
        zeroed."""
        ...

    def copy_kv_blocks(self, kv_caches: list[LayerKVCache], src_block_ids: list[int], dst_block_ids: list[int]) -> None:
        """Copy whole blocks src_block_ids[i] -> dst_block_ids[i] in every layer (without waiting for the device)."""
        ...

    def forward(self, batch: ForwardBatch, kv_caches: list[LayerKVCache]) -> torch.Tensor:
        """One step over the batch; float32 logits [num_outputs, vocab_size]."""
        ...

    def profile_peak_memory(self, num_tokens: int, num_outputs: int, block_size: int) -> int:
        """Run the largest step the server will run; its peak extra device memory in bytes (0 off CUDA)."""
        ...

    def capture_cuda_graphs(
        self, kv_caches: list[LayerKVCache], block_size: int, max_batch_size: int | None = None, progress: bool = True
    ) -> bool:
        """Capture decode graphs over these KV caches where possible; returns whether forward replays them."""
        ...


def load_backend(
    directory: Path, manifest: Manifest, device: torch.device, dtype: str, limits: EngineLimits, shard: Shard = FULL,
    progress: bool = False, kv_cache_dtype: str = "auto",
) -> ModelBackend:
    """Load an engine directory with the backend its manifest names.

    Args:
        directory: the engine directory.
        manifest: its manifest (read_manifest).
        device: where to put it.
        dtype: the weights' dtype name (the manifest's, or the caller's override).
        limits: the sizes to run (the manifest's, possibly lowered).
        shard: the tensor-parallel rank to load (its part of every tensor).
        progress: a progress bar on stderr where the backend can show one.
        kv_cache_dtype: what the KV cache stores: "auto" (the model dtype) or "fp8" (runtime/kv_cache_dtype.py).

    Returns:
        The loaded ModelBackend.

    Raises:
        EngineDirError: the manifest names a backend, or a quantization of it, that this Inflight does not have.
    """
    module_name = BACKENDS.get(manifest.backend)
    if module_name is None:
        raise EngineDirError(
            f"{directory}: engine backend {manifest.backend!r} is not supported (supported: {', '.join(BACKENDS)})"
        )
    module = importlib.import_module(module_name)
    if manifest.quantization not in module.QUANTIZATIONS:
        supported = ", ".join("none" if q is None else q for q in module.QUANTIZATIONS)
        raise EngineDirError(
            f"{directory}: quantization {manifest.quantization!r} is not supported by the {manifest.backend}"
            f" backend (supported: {supported})"
        )
    return module.load_engine_dir(directory, manifest, device, dtype, limits, shard, progress, kv_cache_dtype)
