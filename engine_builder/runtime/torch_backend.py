"""The PyTorch/Triton backend: our model code (models/, layers/, kernels/) on a device, decode steps as CUDA graphs.

Loads an engine directory's weights.safetensors (load_engine_dir, through runtime/backend.py), or takes weights
converted in memory (TorchBackend.from_weights, for loader.py's checkpoint path).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from engine_builder.arithmetic import ceil_div
from engine_builder.engine_dir import DTYPES, WEIGHTS, EngineLimits, Manifest
from engine_builder.forward_batch import ForwardBatch, KVCacheSpec, LayerKVCache, build_forward_batch
from engine_builder.kernels.dispatch import use_triton
from engine_builder.kernels.gemv import tune_gemv
from engine_builder.layers.linear import ColumnParallelLinear, RowParallelLinear
from engine_builder.layers.rotary import RotaryEmbedding
from engine_builder.model_config import ModelConfig
from engine_builder.models.registry import instantiate_model
from engine_builder.quantize import Quantization, keeps_its_dtype
from engine_builder.runtime.cpu_layout import column_major_where_wide
from engine_builder.runtime.cuda_graphs import DecodeGraphs
from engine_builder.runtime.kv_cache_dtype import apply_kv_scales, kv_cache_torch_dtype, pop_kv_scales
from engine_builder.sharding import FULL, Shard, num_kv_heads_per_rank, read_shard

logger = logging.getLogger(__name__)

QUANTIZATIONS: tuple[str | None, ...] = (None, "fp8")  # manifest "quantization" values this backend runs


def materialize(model: nn.Module, weights: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """Attach loaded weights to a meta-device model and rebuild its non-persistent buffers on `device`."""
    model.load_state_dict(weights, strict=True, assign=True)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.materialize(device)
    return model


class TorchBackend:
    """A ModelBackend running our nn.Module on a device (Triton kernels on CUDA, torch reference ops elsewhere)."""

    def __init__(self, config: ModelConfig, model: nn.Module, device: torch.device, dtype: torch.dtype,
                 limits: EngineLimits, shard: Shard = FULL, kv_cache_dtype: torch.dtype | None = None):
        """Wrap a materialized model.

        Args:
            config: the model's dimensions (the whole model's, also when sharded).
            model: the model, weights loaded onto `device`.
            device: where it runs.
            dtype: its weights' dtype.
            limits: the sizes it runs.
            shard: the tensor-parallel rank it is (its KV cache holds that rank's KV heads).
            kv_cache_dtype: what the KV cache stores (None: `dtype`; float8_e4m3fn: the model's Attention layers
                have their KV-cache scales, see runtime/kv_cache_dtype.py).
        """
        self.config = config
        self.model = model
        self.device = device
        self.dtype = dtype
        self.kv_cache_dtype = kv_cache_dtype or dtype
        self.limits = limits
        self.shard = shard
        self.graphs: DecodeGraphs | None = None  # captured decode graphs, once capture_cuda_graphs ran
        if device.type == "cpu":
            column_major_where_wide(self.linear_weights())  # faster one-row products (cpu_layout.py)

    @classmethod
    def from_weights(cls, config: ModelConfig, weights: dict[str, torch.Tensor], device: torch.device,
                     dtype: torch.dtype, limits: EngineLimits, shard: Shard = FULL,
                     quantization: Quantization | None = None, kv_cache_dtype: str = "auto") -> TorchBackend:
        """A backend over engine-named weights (converted from a checkpoint, or read from an engine directory).

        Args:
            config: the model's dimensions.
            weights: engine parameter name -> tensor (this rank's part with a `shard`), on `device`, of `dtype`;
                KV-cache scales among them (layers.{i}.attention.k_scale / v_scale) are not parameters: they go to
                the Attention layers when the KV cache is FP8.
            device: where it runs.
            dtype: the weights' dtype.
            limits: the sizes it runs.
            shard: the tensor-parallel rank the weights are of.
            quantization: how the linears' weights are quantized (their FP8 weights and scales are in `weights`).
            kv_cache_dtype: "auto" (the model dtype) or "fp8" (runtime/kv_cache_dtype.py).

        Returns:
            The TorchBackend. Raises ValueError for a KV cache dtype this device cannot store.
        """
        cache_dtype = kv_cache_torch_dtype(kv_cache_dtype, dtype, device)
        weights = dict(weights)
        kv_scales = pop_kv_scales(weights)
        model = materialize(instantiate_model(config, dtype, shard, quantization), weights, device)
        apply_kv_scales(model, kv_scales, cache_dtype)
        return cls(config, model, device, dtype, limits, shard, cache_dtype)

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        num_kv_heads = num_kv_heads_per_rank(self.config, self.shard.size)
        return KVCacheSpec(self.config.num_layers, num_kv_heads, self.config.head_dim, self.kv_cache_dtype)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> list[LayerKVCache]:
        """One K and one V pool per layer, [num_blocks, block_size, num_kv_heads (of this rank), head_dim], of
        kv_cache_dtype."""
        shape = (num_blocks, block_size, self.kv_cache_spec.num_kv_heads, self.config.head_dim)
        return [
            LayerKVCache(
                key=torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device),
                value=torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device),
            )
            for _ in range(self.config.num_layers)
        ]

    def copy_kv_blocks(self, kv_caches: list[LayerKVCache], src_block_ids: list[int], dst_block_ids: list[int]) -> None:
        """Copy whole KV blocks src -> dst in every layer (copy-on-write before a step writes them)."""
        if not src_block_ids:
            return
        src = self._upload(torch.tensor(src_block_ids, dtype=torch.int64))
        dst = self._upload(torch.tensor(dst_block_ids, dtype=torch.int64))
        for cache in kv_caches:
            cache.key[dst] = cache.key[src]
            cache.value[dst] = cache.value[src]

    def _upload(self, host: torch.Tensor) -> torch.Tensor:
        """Copy a host tensor to the device without waiting for the GPU (pinned memory, non-blocking)."""
        if self.device.type != "cuda":
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

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
            count = ceil_div(length, block_size)
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
        weights: list[torch.Tensor] = [
            m.weight
            for m in self.model.modules()
            if isinstance(m, (ColumnParallelLinear, RowParallelLinear, nn.Linear))
        ]
        if getattr(self.model, "lm_head", None) is None:
            weights.append(self.model.get_parameter("embed_tokens.weight"))
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


def load_engine_dir(
    directory: Path, manifest: Manifest, device: torch.device, dtype: str, limits: EngineLimits, shard: Shard = FULL,
    progress: bool = False, kv_cache_dtype: str = "auto",
) -> TorchBackend:
    """Load an engine directory's weights onto `device` (runtime/backend.py's load_backend calls this).

    Args:
        directory: the engine directory.
        manifest: its manifest.
        device: where to put it.
        dtype: the weights' dtype name (a key of DTYPES).
        limits: the sizes to run.
        shard: the tensor-parallel rank to load: only its slices are read from the file.
        progress: a progress bar on stderr while the rank reads its slices.
        kv_cache_dtype: "auto" or "fp8" (runtime/kv_cache_dtype.py; KV-cache scales in the weights file are used).

    Returns:
        The TorchBackend.
    """
    path = str(Path(directory) / WEIGHTS)
    if shard.size == 1:
        weights = load_file(path, device=str(device))
    else:
        with safe_open(path, framework="pt") as file:
            names = tqdm(list(file.keys()), desc=f"loading rank {shard.rank}'s shard", unit="tensor",
                         disable=not progress, file=sys.stderr)
            weights = {name: read_shard(name, file.get_slice(name), manifest.model, shard).to(device)
                       for name in names}
    weights = {k: v if keeps_its_dtype(k, v) else v.to(DTYPES[dtype]) for k, v in weights.items()}
    quantization = None
    if manifest.quantization is not None:
        quantization = Quantization.from_dict(manifest.quantization_config, manifest.quantization)
    return TorchBackend.from_weights(manifest.model, weights, device, DTYPES[dtype], limits, shard, quantization,
                                     kv_cache_dtype)
