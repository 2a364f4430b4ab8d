"""The size of the KV block pool: what fits the device beside the weights and the largest step."""

from __future__ import annotations

import logging
from typing import Any

import torch

from engine_builder.arithmetic import ceil_div
from server.engine.engine_config import EngineConfig

logger = logging.getLogger(__name__)

GIB = 1 << 30


def num_host_kv_blocks(engine: Any, config: EngineConfig) -> int:
    """Blocks the host-memory KV tier holds: kv_offload_bytes over the bytes of one block (of this rank)."""
    return config.kv_offload_bytes // engine.kv_cache_spec.bytes_per_block(config.block_size)


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
        num_blocks, reason, memory_bound = config.num_kv_blocks, "set explicitly", False
    elif torch.device(engine.device).type == "cuda":
        max_tokens = min(config.max_num_batched_tokens, engine.limits.max_num_tokens)
        max_seqs = min(config.max_num_seqs, engine.limits.max_batch_size)
        peak = engine.backend.profile_peak_memory(max_tokens, max_seqs, config.block_size)
        free_bytes, _ = torch.cuda.mem_get_info(torch.device(engine.device))
        left = max(free_bytes - peak, 0)
        num_blocks, memory_bound = int(left * config.kv_cache_memory_fraction) // bytes_per_block, True
        reason = (
            f"{config.kv_cache_memory_fraction:.0%} of {left / GIB:.1f} GiB left after weights and a warm-up step"
            f" of {max_tokens} tokens peaking at {peak / GIB:.2f} GiB"
        )
    else:
        max_seqs = min(config.max_num_seqs, engine.limits.max_batch_size)
        wanted = max_seqs * ceil_div(engine.limits.max_seq_len, config.block_size)
        cap = int(GIB * config.kv_cache_memory_fraction) // bytes_per_block
        num_blocks, memory_bound = min(wanted, cap), cap < wanted
        reason = (f"CPU: {max_seqs} requests x {engine.limits.max_seq_len} tokens, "
                  f"capped at {config.kv_cache_memory_fraction:.0%} of 1 GiB")
    if num_blocks < 1:
        raise ValueError(
            f"the KV cache cannot hold even one block of {config.block_size} tokens ({bytes_per_block} bytes); "
            "free device memory, raise kv_cache_memory_fraction or lower block_size"
        )
    stored, gain = _storage(engine, memory_bound)
    logger.info(
        "KV cache: %s%d blocks x %d tokens = %d tokens, %.2f GiB (%s)%s",
        stored, num_blocks, config.block_size, num_blocks * config.block_size, num_blocks * bytes_per_block / GIB,
        reason, gain,
    )
    return num_blocks


def _storage(engine: Any, memory_bound: bool) -> tuple[str, str]:
    """For a KV cache stored narrower than the weights (--kv-cache-dtype fp8): its dtype and, as a suffix, the
    capacity gained where memory sized the pool (otherwise the bytes saved); ("", "") for a model-dtype cache."""
    cache_dtype, model_dtype = engine.kv_cache_spec.dtype, engine.dtype
    if cache_dtype == model_dtype:
        return "", ""
    ratio = model_dtype.itemsize / cache_dtype.itemsize
    name = "fp8 (e4m3)" if cache_dtype == torch.float8_e4m3fn else str(cache_dtype).removeprefix("torch.")
    model_name = str(model_dtype).removeprefix("torch.")
    if memory_bound:
        return f"{name}, ", f" = {ratio:g}x the tokens of {model_name} in the same memory"
    return f"{name}, ", f"; 1/{ratio:g} of {model_name}'s bytes per token"
