"""What the client hands an engine core when it starts it, and the channels between them (no torch here).

The client side (server/engine/client/) builds these; the engine core (server/engine/core/) reads them, in a
spawned process (they are pickled to it) or in a thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from server.engine.engine_config import EngineConfig
from server.engine.parallel_config import ParallelConfig


class Channel(Protocol):
    """One direction between the client and the engine core: a multiprocessing Connection, or a QueueChannel."""

    def send(self, message: Any, /) -> None: ...  # positional: Connection.send names it obj

    def recv(self) -> Any:
        """The next message; EOFError once the other side closed."""
        ...

    def close(self) -> None: ...


@dataclass(slots=True)
class EngineLoadArgs:
    """The arguments of engine_builder.loader.load_engine, as the server passes them (picklable)."""

    model: Path  # engine directory or Hugging Face checkpoint directory
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    dtype: str | None = None  # None keeps the engine's (or checkpoint's) dtype
    load_format: str = "auto"  # "dummy": random weights from config.json
    max_seq_len: int | None = None  # lowers the engine's limits where given
    max_batch_size: int | None = None
    max_num_tokens: int | None = None
    quantization: str | None = None  # "fp8": a checkpoint's linears quantized while loading; None: as they are
    kv_cache_dtype: str = "auto"  # "fp8": the KV cache in float8_e4m3fn (per-layer scales); "auto": the model dtype

    def load(self, device: str | None = None, tp_rank: int = 0, tp_size: int = 1, progress: bool = False) -> Any:
        """Load the engine (an engine_builder.loader.Engine; ValueError naming the problem when it cannot be).

        Args:
            device: where to put it (None: `self.device`; a tensor-parallel rank passes its own GPU).
            tp_rank, tp_size: the tensor-parallel shard to load.
            progress: progress bars on stderr (rank 0 of several shows its own).
        """
        from engine_builder.loader import load_engine  # in the engine core only: the client needs no weights
        from engine_builder.sharding import Shard

        return load_engine(
            self.model, device=device or self.device, dtype=self.dtype, load_format=self.load_format,
            max_seq_len=self.max_seq_len, max_batch_size=self.max_batch_size, max_num_tokens=self.max_num_tokens,
            progress=progress, shard=Shard(tp_rank, tp_size), quantization=self.quantization,
            kv_cache_dtype=self.kv_cache_dtype,
        )


def check_policy(max_queue_time: float | None, max_consecutive_step_failures: int) -> None:
    """Raise ValueError naming the first policy setting that cannot work."""
    if max_queue_time is not None and max_queue_time <= 0:
        raise ValueError(f"max_queue_time must be > 0 seconds (or None); got {max_queue_time}")
    if max_consecutive_step_failures < 1:
        raise ValueError(f"max_consecutive_step_failures must be at least 1; got {max_consecutive_step_failures}")


@dataclass(slots=True)
class CoreArgs:
    """Everything an engine core needs, given once when it starts (pickled to a spawned process)."""

    load: EngineLoadArgs | None  # what to load; None when the core is given a loaded engine (in a thread)
    config: EngineConfig  # batching and KV cache settings
    max_queue_time: float | None = None  # seconds a request may wait for its first step; None: no limit
    max_consecutive_step_failures: int = 3  # failed steps in a row after which the engine is dead
    log_level: str = "info"  # the API process's --log-level
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # tensor parallelism (1: this process only)
    cpu_threads: int | None = None  # torch intra-op threads of the engine on this node; None: derived (cpu_threads.py)

    def __post_init__(self) -> None:
        check_policy(self.max_queue_time, self.max_consecutive_step_failures)
        self.parallel.validate()
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be at least 1 (or None to derive it); got {self.cpu_threads}")
