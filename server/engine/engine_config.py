"""The engine's batching and KV cache settings (the pool is sized by server/runner/kv_sizing.py)."""

from __future__ import annotations

from dataclasses import dataclass

# What a logprob is taken of (vLLM's names): the model's raw log-softmax, or after the request's logits processing
# (logit_bias, grammar, penalties, temperature; before top-k/top-p/min-p, so alternatives stay finite).
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")


@dataclass(slots=True)
class EngineConfig:
    """How the engine core batches and how much KV cache it takes."""

    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # blocks in the pool; None sizes it from memory (see runner/kv_sizing.py)
    kv_cache_memory_fraction: float = 0.9  # share of free device memory (CPU: of 1 GiB) the pool may take
    max_num_seqs: int = 256  # running requests at most (capped by the engine's max_batch_size)
    max_num_batched_tokens: int = 2048  # new tokens per step at most (capped by the engine's max_num_tokens)
    max_queued_requests: int = 1024  # waiting requests at most; more are refused as overload
    enforce_eager: bool = False  # never capture CUDA graphs of the decode step (debugging; saves start-up time)
    async_scheduling: bool = True  # launch step N+1 before step N's tokens reach the host (see engine_core.py)
    logprobs_mode: str = "raw_logprobs"  # one of LOGPROBS_MODES: what returned logprobs are taken of
    enable_prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes across requests (kv_cache_manager.py)
    kv_offload_bytes: int = 0  # host memory per rank for evicted cached blocks (host_tier.py); 0: no host tier

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
        if self.kv_offload_bytes < 0:
            raise ValueError(f"kv_offload_bytes {self.kv_offload_bytes} must be at least 0")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode {self.logprobs_mode!r} must be one of {', '.join(LOGPROBS_MODES)}")
