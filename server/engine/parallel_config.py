"""How the model is spread over processes: tensor parallelism on one node or over several (no torch here).

Ranks are laid out node by node, so that a tensor-parallel group stays inside a node when it fits one:

    --tensor-parallel-size 8 --nnodes 2:   node 0 holds ranks 0-3 (rank 0 in the engine core process, which also
                                           runs the scheduler), node 1 (`inflight-serve --headless`) ranks 4-7
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ParallelConfig:
    """Tensor-parallel size and where the ranks meet."""

    tensor_parallel_size: int = 1  # ranks that each hold 1/N of the weights and run every step together
    nnodes: int = 1  # hosts the ranks are spread over
    node_rank: int = 0  # this host's index (0 runs the HTTP server and the engine core)
    master_addr: str = "127.0.0.1"  # where node 0 listens (torch.distributed's store and the step channel)
    master_port: int | None = None  # None: a free port (one node only); the step channel uses master_port + 1
    timeout_seconds: float = 300.0  # collectives and start-up wait at most this long for a missing rank

    @property
    def ranks_per_node(self) -> int:
        return self.tensor_parallel_size // self.nnodes

    @property
    def local_ranks(self) -> range:
        """The global ranks this node runs."""
        return range(self.node_rank * self.ranks_per_node, (self.node_rank + 1) * self.ranks_per_node)

    def local_rank(self, rank: int) -> int:
        """The rank's index among its node's ranks (its GPU there)."""
        return rank - self.node_rank * self.ranks_per_node

    def validate(self) -> None:
        """Raise ValueError naming the first setting that cannot work."""
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size {self.tensor_parallel_size} must be at least 1")
        if self.nnodes < 1 or self.tensor_parallel_size % self.nnodes:
            raise ValueError(f"nnodes {self.nnodes} must be at least 1 and divide tensor_parallel_size "
                             f"{self.tensor_parallel_size} (each node runs the same number of ranks)")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be in [0, {self.nnodes})")
        if self.nnodes > 1 and self.master_port is None:
            raise ValueError("several nodes need --master-port (and --master-addr, node 0's address)")
        if self.master_port is not None and not 1 <= self.master_port < 65535:
            raise ValueError(f"master_port {self.master_port} must be in [1, 65534] (the next port is used too)")
        if self.timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds {self.timeout_seconds} must be > 0")
