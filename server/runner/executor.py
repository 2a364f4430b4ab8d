"""Between the engine core and the model: an Executor runs step plans and returns their outputs.

    engine core --StepPlan--> Executor.launch ... Executor.collect --RunnerOutput--> engine core

`UniprocExecutor` runs the one ModelRunner in the engine core's own thread. A tensor-parallel executor (one
worker process per rank, each with its own runner over its shard) is a second class behind the same protocol;
the scheduler and the engine core do not change for it. Steps are collected in the order they were launched.
"""

from __future__ import annotations

from typing import Any, Protocol

from server.engine.engine_config import EngineConfig
from server.engine.step_plan import RunnerOutput, StepPlan
from server.runner.kv_sizing import num_host_kv_blocks, resolve_num_kv_blocks
from server.runner.model_runner import ModelRunner
from server.runner.tensor_parallel import TensorParallelGroup


def build_runner(engine: Any, config: EngineConfig, max_num_seqs: int,
                 group: TensorParallelGroup | None = None) -> ModelRunner:
    """Size the KV pool (the smallest any rank can hold, under tensor parallelism) and build the model runner.

    Args:
        engine: the loaded engine_builder.loader.Engine (this rank's shard of it).
        config: the engine config.
        max_num_seqs: the largest batch the scheduler runs.
        group: the tensor-parallel group (None: one process).
    """
    num_kv_blocks = resolve_num_kv_blocks(engine, config)
    if group is not None:
        num_kv_blocks = group.min_over_ranks(num_kv_blocks)
    return ModelRunner(engine.backend, num_kv_blocks, config.block_size, list(engine.eos_token_ids),
                       cuda_graphs=not config.enforce_eager, max_num_seqs=max_num_seqs, group=group,
                       logprobs_mode=config.logprobs_mode,
                       num_host_blocks=num_host_kv_blocks(engine, config) if config.enable_prefix_caching else 0)


class Executor(Protocol):
    """Runs the model for the engine core."""

    @property
    def num_kv_blocks(self) -> int:
        """Blocks in the KV pool (of every rank)."""
        ...

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

    def __init__(self, runner: ModelRunner):
        self.runner = runner

    @property
    def num_kv_blocks(self) -> int:
        return self.runner.num_kv_blocks

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
