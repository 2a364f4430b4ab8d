"""Between the engine core and the model: an Executor runs step plans and returns their outputs.

    engine core --StepPlan--> Executor.launch ... Executor.collect --RunnerOutput--> engine core

`UniprocExecutor` runs the one ModelRunner in the engine core's own thread. A tensor-parallel executor (one
worker process per rank, each with its own runner over its shard) is a second class behind the same protocol;
the scheduler and the engine core do not change for it. Steps are collected in the order they were launched.
"""

from __future__ import annotations

from typing import Protocol

from engine_builder.runtime.backend import ModelBackend
from server.engine.step_plan import RunnerOutput, StepPlan
from server.runner.model_runner import ModelRunner


class Executor(Protocol):
    """Runs the model for the engine core."""

    @property
    def uses_cuda_graphs(self) -> bool:
        """Decode steps replay captured CUDA graphs."""
        ...

    def launch(self, plan: StepPlan) -> None:
        """Queue a step (at least one row) without waiting for its results."""
        ...

    def collect(self) -> RunnerOutput:
        """Wait for the oldest launched step and return its results."""
        ...

    def execute(self, plan: StepPlan) -> RunnerOutput:
        """Launch a step and collect it (nothing else may be in flight)."""
        ...

    def shutdown(self) -> None:
        """Release the workers (nothing to do in one process)."""
        ...


class UniprocExecutor:
    """The model runner in this thread."""

    def __init__(self, backend: ModelBackend, num_kv_blocks: int, block_size: int, eos_token_ids: list[int],
                 cuda_graphs: bool = False, max_num_seqs: int | None = None):
        """Allocate the runner's KV cache and capture its graphs (ModelRunner's arguments)."""
        self.runner = ModelRunner(backend, num_kv_blocks, block_size, eos_token_ids, cuda_graphs=cuda_graphs,
                                  max_num_seqs=max_num_seqs)

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.runner.uses_cuda_graphs

    def launch(self, plan: StepPlan) -> None:
        self.runner.launch(plan)

    def collect(self) -> RunnerOutput:
        return self.runner.collect()

    def execute(self, plan: StepPlan) -> RunnerOutput:
        self.launch(plan)
        return self.collect()

    def shutdown(self) -> None:
        pass
