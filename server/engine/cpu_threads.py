"""How many intra-op threads torch may use in each of the server's processes, chosen once and logged.

torch's default is one thread per physical core in every process. inflight-serve runs several processes that all
compute on the same cores (the API process, the engine core, on CPU each tensor-parallel rank), and on a shared
machine other programs compute there too. An OpenMP parallel region waits for its slowest thread: one thread
preempted by another process stalls the whole step (on a 2-core box decode steps went from 4-14 ms to 80-685 ms).
So the budget is set deliberately:

    engine budget = --cpu-threads N                      (the user's choice, as given)
                  | $OMP_NUM_THREADS                     (the OpenMP convention, when set)
                  | cores this process may use - 1       (os.sched_getaffinity; one is left to the API process
                                                          when the engine core has its own process; at least 1)
    each engine rank = max(1, budget // ranks on this node)   (tensor-parallel ranks share the node's cores)
    API process      = 1 thread when the engine core runs in its own process (it tokenizes and serves HTTP;
                       its torch work is small), else the engine's budget (the engine runs in it)

No torch import at module level: the choice is made (and tested) without it; `apply` imports it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from server.engine.parallel_config import ParallelConfig

logger = logging.getLogger(__name__)
OMP_ENV = "OMP_NUM_THREADS"


@dataclass(frozen=True, slots=True)
class ThreadChoice:
    """A number of torch intra-op threads and why it was chosen (for the log line)."""

    num_threads: int
    reason: str  # e.g. "--cpu-threads 2", "$OMP_NUM_THREADS=1", "2 usable cores less 1 for the API process"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, as taskset or a container's cpuset limit it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def omp_num_threads(environ: Mapping[str, str]) -> int | None:
    """$OMP_NUM_THREADS as a thread count, or None when unset, empty or not a positive integer.

    OpenMP also accepts a list ("4,2": nested levels); its first entry is the outer level's count.
    """
    raw = environ.get(OMP_ENV, "").split(",")[0].strip()
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if value >= 1 else None


def engine_budget(cpu_threads: int | None, environ: Mapping[str, str], *, separate_api_process: bool,
                  cores: int | None = None) -> ThreadChoice:
    """The engine's thread budget on this node (see the module docstring for the rule).

    Args:
        cpu_threads: --cpu-threads; None derives the budget.
        environ: the environment ($OMP_NUM_THREADS).
        separate_api_process: the API process runs beside the engine core (leave it a core).
        cores: usable cores; None reads this process's affinity.

    Returns:
        The budget and its reason. Raises ValueError naming cpu_threads when it is below 1.
    """
    if cpu_threads is not None:
        if cpu_threads < 1:
            raise ValueError(f"cpu_threads must be at least 1; got {cpu_threads}")
        return ThreadChoice(cpu_threads, f"--cpu-threads {cpu_threads}")
    omp = omp_num_threads(environ)
    if omp is not None:
        return ThreadChoice(omp, f"${OMP_ENV}={omp}")
    cores = usable_cores() if cores is None else cores
    if separate_api_process and cores > 1:
        return ThreadChoice(cores - 1, f"{cores} usable cores less 1 for the API process")
    return ThreadChoice(max(1, cores), f"{cores} usable core{'s' if cores != 1 else ''}")


def rank_threads(budget: ThreadChoice, num_local_ranks: int) -> ThreadChoice:
    """One tensor-parallel rank's share of the node's budget: the ranks on a node share its cores.

    Args:
        budget: the engine's budget on this node.
        num_local_ranks: tensor-parallel ranks on this node (1 without tensor parallelism).
    """
    if num_local_ranks <= 1:
        return budget
    share = max(1, budget.num_threads // num_local_ranks)
    return ThreadChoice(share, f"{budget.reason}, shared by {num_local_ranks} ranks on this node")


def node_rank_threads(cpu_threads: int | None, parallel: ParallelConfig, environ: Mapping[str, str]) -> ThreadChoice:
    """The threads of each engine rank on this node: node 0 leaves a core to its API process, headless nodes
    (`inflight-serve --headless`: a launcher that only waits) do not.

    Args:
        cpu_threads: --cpu-threads (the node's budget); None derives it.
        parallel: the tensor-parallel layout (how many ranks this node runs, whether it is node 0).
        environ: the environment ($OMP_NUM_THREADS).
    """
    budget = engine_budget(cpu_threads, environ, separate_api_process=parallel.node_rank == 0)
    return rank_threads(budget, parallel.ranks_per_node)


def api_threads(cpu_threads: int | None, engine_process: bool, environ: Mapping[str, str]) -> ThreadChoice:
    """The API process's threads: 1 beside an engine core process, else the engine's budget (it runs here).

    Args:
        cpu_threads: --cpu-threads; None derives the engine's budget.
        engine_process: the engine core runs in its own process (--engine-process, the default).
        environ: the environment ($OMP_NUM_THREADS).
    """
    if engine_process:
        return ThreadChoice(1, "the engine core has its own process")
    budget = engine_budget(cpu_threads, environ, separate_api_process=False)
    return ThreadChoice(budget.num_threads, f"the engine core runs in this process; {budget.reason}")


def apply(choice: ThreadChoice, process: str) -> int:
    """Set torch's intra-op threads in this process and log it.

    Args:
        choice: the number of threads and why.
        process: which process this is, for the log line ("engine core", "tensor-parallel rank 1", "API").

    Returns:
        torch.get_num_threads() afterwards (what torch really uses).
    """
    import torch

    torch.set_num_threads(choice.num_threads)
    num_threads = torch.get_num_threads()
    logger.info("%s process: %d torch intra-op thread%s (%s)", process, num_threads, "s" if num_threads != 1 else "",
                choice.reason)
    return num_threads
