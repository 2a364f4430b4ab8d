"""Engine-side settings and the sizing of the KV block pool."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from engine_builder.arithmetic import ceil_div

logger = logging.getLogger(__name__)

GIB = 1 << 30


@dataclass(slots=True)
class EngineConfig:
    """How the engine core batches and how much KV cache it takes."""

    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # blocks in the pool; None sizes it from memory (see resolve_num_kv_blocks)
    kv_cache_memory_fraction: float = 0.9  # share of free device memory (CPU: of 1 GiB) the pool may take
    max_num_seqs: int = 256  # running requests at most (capped by the engine's max_batch_size)
    max_num_batched_tokens: int = 2048  # new tokens per step at most (capped by the engine's max_num_tokens)
    max_queued_requests: int = 1024  # waiting requests at most; more are refused as overload
    enforce_eager: bool = False  # never capture CUDA graphs of the decode step (debugging; saves start-up time)
    async_scheduling: bool = True  # launch step N+1 before step N's tokens reach the host (see engine_core.py)

    def validate(self) -> None:
        """Raise ValueError naming the first setting that is out of range."""
        if self.block_size < 1:
            raise ValueError(f"block_size {self.block_size} must be at least 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks {self.num_kv_blocks} must be at least 1 (or unset to size from memory)")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError(f"kv_cache_memory_fraction {self.kv_cache_memory_fraction} must be in (0, 1]")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_queued_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be at least 1")


def resolve_num_kv_blocks(engine: Any, config: EngineConfig) -> int:
    """Decide how many KV blocks to allocate, and log the decision.

    An explicit `config.num_kv_blocks` wins. On CUDA the engine first warms up with the largest step it
    will run (max_num_batched_tokens tokens); the pool then takes kv_cache_memory_fraction of the device
    memory left after the weights and that step's peak activations. On CPU it takes enough blocks for max_num_seqs
    requests of the engine's max_seq_len tokens each, but at most kv_cache_memory_fraction x 1 GiB
    (host memory is shared with everything else, so it is not sized from what is free).

    Args:
        engine: the loaded Engine (device, limits, kv_cache_spec).
        config: the engine config.

    Returns:
        The number of blocks (at least 1); ValueError when not even one block fits.
    """
    bytes_per_block = engine.kv_cache_spec.bytes_per_block(config.block_size)
    if config.num_kv_blocks is not None:
        num_blocks, reason = config.num_kv_blocks, "set explicitly"
    elif torch.device(engine.device).type == "cuda":
        max_tokens = min(config.max_num_batched_tokens, engine.limits.max_num_tokens)
        max_seqs = min(config.max_num_seqs, engine.limits.max_batch_size)
        peak = engine.backend.profile_peak_memory(max_tokens, max_seqs, config.block_size)
        free_bytes, _ = torch.cuda.mem_get_info(torch.device(engine.device))
        left = max(free_bytes - peak, 0)
        num_blocks = int(left * config.kv_cache_memory_fraction) // bytes_per_block
        reason = (
            f"{config.kv_cache_memory_fraction:.0%} of {left / GIB:.1f} GiB left after weights and a warm-up step"
            f" of {max_tokens} tokens peaking at {peak / GIB:.2f} GiB"
        )
    else:
        max_seqs = min(config.max_num_seqs, engine.limits.max_batch_size)
        wanted = max_seqs * ceil_div(engine.limits.max_seq_len, config.block_size)
        cap = int(GIB * config.kv_cache_memory_fraction) // bytes_per_block
        num_blocks = min(wanted, cap)
        reason = f"CPU: {max_seqs} requests x {engine.limits.max_seq_len} tokens, capped at {config.kv_cache_memory_fraction:.0%} of 1 GiB"
    if num_blocks < 1:
        raise ValueError(
            f"the KV cache cannot hold even one block of {config.block_size} tokens ({bytes_per_block} bytes); "
            "free device memory, raise kv_cache_memory_fraction or lower block_size"
        )
    logger.info(
        "KV cache: %d blocks x %d tokens = %d tokens, %.2f GiB (%s)",
        num_blocks, config.block_size, num_blocks * config.block_size, num_blocks * bytes_per_block / GIB, reason,
    )
    return num_blocks
