"""One process's place in a tensor-parallel group: torch.distributed set up for it, and the few collectives the
runner itself does (the model's own all-reduces are in engine_builder/layers/).

NCCL between GPUs (one per rank: cuda:<local rank>, counted within CUDA_VISIBLE_DEVICES), gloo on the CPU.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine_builder.sharding import Shard
from server.engine.parallel_config import ParallelConfig

logger = logging.getLogger(__name__)

# NVLink multicast (NVLS) is off: the machines this runs on do not support it everywhere, and NCCL's probe of it can
# fail a whole job. Set before the first communicator, in every rank's environment.
NCCL_ENVIRONMENT = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def rank_device(device: str, local_rank: int) -> str:
    """The device rank `local_rank` of its node runs on: its own GPU, or the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"tensor-parallel rank needs GPU {local_rank} but only {torch.cuda.device_count()} "
                             "are visible (CUDA_VISIBLE_DEVICES); lower --tensor-parallel-size or use more nodes")
        return f"cuda:{local_rank}"
    return device


@dataclass(slots=True)
class TensorParallelGroup:
    """torch.distributed's default group, joined by this rank."""

    rank: int
    size: int
    device: torch.device

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.size)

    @property
    def is_driver(self) -> bool:
        """Rank 0: it samples, and the others receive its tokens."""
        return self.rank == 0

    def broadcast_tokens(self, tokens: torch.Tensor) -> None:
        """Rank 0 sends the step's sampled tokens (on the device, without waiting for them) to every rank."""
        dist.broadcast(tokens, src=0)

    def receive_tokens(self, num_tokens: int) -> torch.Tensor:
        """The tokens rank 0 sampled this step ([num_tokens] int64 on this rank's device, as a queued receive)."""
        tokens = torch.empty(num_tokens, dtype=torch.int64, device=self.device)
        dist.broadcast(tokens, src=0)
        return tokens

    def min_over_ranks(self, value: int) -> int:
        """The smallest `value` of all ranks (the KV pool every rank can hold)."""
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def join_group(parallel: ParallelConfig, rank: int, device: str, store_port: int) -> TensorParallelGroup:
    """Join the tensor-parallel group as `rank` (blocks until every rank has joined, up to the timeout).

    Args:
        parallel: the group's layout.
        rank: this process's global rank.
        device: the rank's device (rank_device).
        store_port: torch.distributed's rendezvous port on the master.
    """
    torch_device = torch.device(device)
    backend = "nccl" if torch_device.type == "cuda" else "gloo"
    # Under torchrun this makes every rank a client of torchrun's own store; the ranks meet at their own (rank 0's).
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    if backend == "nccl":
        for key, value in NCCL_ENVIRONMENT.items():
            os.environ.setdefault(key, value)
        torch.cuda.set_device(torch_device)
    dist.init_process_group(
        backend, init_method=f"tcp://{parallel.master_addr}:{store_port}", rank=rank,
        world_size=parallel.tensor_parallel_size, timeout=datetime.timedelta(seconds=parallel.timeout_seconds),
        device_id=torch_device if backend == "nccl" else None,
    )
    logger.info("tensor-parallel rank %d of %d joined (%s on %s)", rank, parallel.tensor_parallel_size, backend,
                device)
    return TensorParallelGroup(rank=rank, size=parallel.tensor_parallel_size, device=torch_device)
