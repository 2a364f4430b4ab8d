"""Tensor parallelism for the engine core: this process is rank 0, the other ranks are worker processes.

    start_tensor_parallel:  listen on the step channel -> spawn this node's other ranks (tp_worker.py)
                            -> every rank: join torch.distributed, load its shard, agree on the KV pool size
    MultiprocExecutor:      launch(plan): send (collects since the last launch, plan) to every worker, then run
                            rank 0's own launch; collect(): rank 0's results (it alone samples)

Ranks on other nodes are started there (`inflight-serve --headless`) and connect to the same channel. A worker
that dies while serving makes the engine core process exit (code 1) after ending the other workers, so that the
API process reports the engine dead; a worker that fails to start is one line (ValueError) and no process stays.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import pickle
import socket
import threading
import time
from multiprocessing.connection import Connection, Listener, wait
from multiprocessing.process import BaseProcess
from typing import Any, NoReturn

from server.engine import cpu_threads
from server.engine.core_args import CoreArgs
from server.engine.parallel_config import ParallelConfig
from server.engine.step_plan import RunnerOutput, StepPlan
from server.runner.executor import UniprocExecutor, build_runner
from server.runner.model_runner import ModelRunner
from server.runner.tensor_parallel import TensorParallelGroup, join_group, rank_device
from server.runner.tp_worker import WorkerArgs, run_worker, settings_fingerprint, weight_bytes

logger = logging.getLogger(__name__)

GIB = 1 << 30
CLUSTER_KEY_ENV = "INFLIGHT_CLUSTER_KEY"  # the step channel's shared secret across nodes


class MultiprocExecutor(UniprocExecutor):
    """Rank 0's runner in this thread (as UniprocExecutor), and the step channels to every other rank."""

    def __init__(self, runner: ModelRunner, group: TensorParallelGroup, channels: dict[int, Connection],
                 processes: list[BaseProcess], listener: Listener):
        super().__init__(runner)
        self.group = group
        self.channels = channels  # rank -> its step channel
        self.processes = processes  # this node's worker processes
        self.listener = listener
        self._num_collects = 0  # steps collected since the last launch (the workers collect as many first)
        self._stopping = False
        threading.Thread(target=self._watch_workers, name="inflight-tp-watch", daemon=True).start()

    def launch(self, plan: StepPlan) -> None:
        workers_plan = dataclasses.replace(plan, grammar_request_ids=[], grammar_bitmask=None)  # they do not sample
        message = pickle.dumps((self._num_collects, workers_plan), protocol=pickle.HIGHEST_PROTOCOL)
        self._num_collects = 0
        try:
            for channel in self.channels.values():
                channel.send_bytes(message)
            self.runner.launch(plan)
        except BaseException as error:
            self._die(f"rank 0's step failed: {type(error).__name__}: {error}")

    def collect(self) -> RunnerOutput:
        self._num_collects += 1
        try:
            return self.runner.collect()
        except BaseException as error:
            self._die(f"rank 0's step failed: {type(error).__name__}: {error}")

    def shutdown(self) -> None:
        """Tell every worker to stop, wait for this node's (then end any that stays), leave the group."""
        self._stopping = True
        for channel in self.channels.values():
            try:
                channel.send_bytes(pickle.dumps(None))
            except OSError:
                pass  # it is gone already
        stop_processes(self.processes, grace=10.0)
        self.listener.close()
        self.group.destroy()

    def _watch_workers(self) -> None:
        """A worker gone while serving (its channel ended, or its process exited): end the engine core process."""
        watched: list[Any] = list(self.channels.values()) + [p.sentinel for p in self.processes]
        wait(watched)
        if self._stopping:
            return
        dead = [f"{p.name}: {describe_exit(p.exitcode)}" for p in self.processes if p.exitcode is not None]
        self._die(f"a tensor-parallel worker is gone ({', '.join(dead) or 'its step channel ended'})")

    def _die(self, reason: str) -> NoReturn:
        """The ranks can no longer run steps together (one is gone, or a step failed on some and not others):
        end every worker and this process, so that the API process reports the engine dead."""
        logger.critical("%s; the engine is dead: ending the other ranks and the engine core process", reason)
        for process in self.processes:
            if process.is_alive():
                process.kill()
        stop_processes(self.processes, grace=2.0)
        logging.shutdown()
        os._exit(1)


def stop_processes(processes: list[BaseProcess], grace: float) -> None:
    """Wait up to `grace` seconds for the processes to exit, then terminate, then kill what is left."""
    deadline = time.monotonic() + grace
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()
            process.join(2.0)
        if process.is_alive():
            process.kill()
            process.join(2.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ports(parallel: ParallelConfig) -> tuple[int, int]:
    """(torch.distributed's store port, the step channel's port)."""
    if parallel.master_port is not None:
        return parallel.master_port, parallel.master_port + 1
    return free_port(), free_port()


def cluster_key(parallel: ParallelConfig) -> bytes:
    """The step channel's secret: random on one node (handed to the workers), shared through the environment
    across nodes (required there: rank 0 unpickles what authenticated peers send)."""
    if parallel.nnodes == 1:
        return os.urandom(32)
    key = os.environ.get(CLUSTER_KEY_ENV, "")
    if not key:
        raise ValueError(f"several nodes need ${CLUSTER_KEY_ENV}: the same secret on every node, which "
                         "authenticates the step channel between them")
    return key.encode()


def start_workers(args: CoreArgs, ranks: range | list[int], store_port: int, channel_port: int,
                  authkey: bytes) -> list[BaseProcess]:
    """Spawn worker processes for `ranks` of this node."""
    assert args.load is not None, "tensor parallelism loads the engine in every rank"
    context = multiprocessing.get_context("spawn")
    threads = cpu_threads.node_rank_threads(args.cpu_threads, args.parallel, os.environ)  # the ranks share the cores
    processes = []
    for rank in ranks:
        worker = WorkerArgs(rank=rank, load=args.load, config=args.config, parallel=args.parallel,
                            store_port=store_port, channel_port=channel_port, authkey=authkey,
                            log_level=args.log_level, threads=threads)
        process = context.Process(target=run_worker, args=(worker,), name=f"inflight-tp-rank-{rank}", daemon=True)
        process.start()
        processes.append(process)
    return processes


def start_tensor_parallel(args: CoreArgs) -> tuple[Any, MultiprocExecutor]:
    """Start every rank of this node and load rank 0's shard here.

    Returns:
        (rank 0's Engine, the executor). Raises ValueError with one line naming the rank that failed to start
        and why; every worker process of this node has ended by then.
    """
    assert args.load is not None, "tensor parallelism loads the engine in every rank"
    parallel = args.parallel
    size = parallel.tensor_parallel_size
    store_port, channel_port = ports(parallel)
    authkey = cluster_key(parallel)
    address = ("0.0.0.0" if parallel.nnodes > 1 else "127.0.0.1", channel_port)
    try:
        listener = Listener(address, authkey=authkey)
    except OSError as error:
        raise ValueError(f"cannot listen on {address[0]}:{channel_port} for the tensor-parallel step channel: "
                         f"{error.strerror or error}; choose another --master-port (it takes that port and the "
                         "next)") from None
    processes = start_workers(args, [r for r in parallel.local_ranks if r != 0], store_port, channel_port, authkey)
    channels: dict[int, Connection] = {}
    try:
        logger.info("tensor parallelism: %d ranks over %d node(s); starting the workers", size, parallel.nnodes)
        channels = accept_workers(listener, size - 1, processes, parallel.timeout_seconds,
                                  settings_fingerprint(args.load, args.config))
        device = rank_device(args.load.device, 0)
        group = join_group(parallel, 0, device, store_port)
        engine = args.load.load(device=device, tp_rank=0, tp_size=size, progress=True)
        loaded = {0: weight_bytes(engine)}
        loaded.update(await_messages(channels, "loaded", processes, parallel.timeout_seconds))
        logger.info("weights per rank: %s (%.2f GiB in all)",
                    ", ".join(f"rank {r} {b / GIB:.2f} GiB" for r, b in sorted(loaded.items())),
                    sum(loaded.values()) / GIB)
        runner = build_runner(engine, args.config, min(args.config.max_num_seqs, engine.limits.max_batch_size),
                              group)
        await_messages(channels, "ready", processes, parallel.timeout_seconds)
    except BaseException as error:
        for channel in channels.values():  # the workers (on every node) say why, then exit with code 2
            try:
                channel.send_bytes(pickle.dumps(("failed", str(error) or type(error).__name__)))
            except OSError:
                pass
            channel.close()
        stop_processes(processes, grace=5.0)
        listener.close()
        raise
    return engine, MultiprocExecutor(runner, group, channels, processes, listener)


def accept_workers(listener: Listener, count: int, processes: list[BaseProcess], timeout: float,
                   fingerprint: str) -> dict[int, Connection]:
    """Accept `count` workers' step channels; each says ("hello", rank, its settings' fingerprint) first, or
    ("failed", rank, why). A rank started with other settings (another node's command line) or twice is refused."""
    accepted: list[Connection] = []
    errors: list[BaseException] = []

    def accept_all() -> None:
        try:
            while len(accepted) < count:
                accepted.append(listener.accept())
        except BaseException as error:  # the listener was closed: we gave up
            errors.append(error)

    thread = threading.Thread(target=accept_all, name="inflight-tp-accept", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while thread.is_alive():
        thread.join(0.1)
        if any(p.exitcode is not None for p in processes):
            for channel in list(accepted):  # a worker that failed says why before it exits
                if channel.poll(0.5):
                    check_message(channel.recv(), "hello")
            check_processes(processes)
        if time.monotonic() > deadline:
            raise ValueError(f"only {len(accepted)} of {count} tensor-parallel workers connected within "
                             f"{timeout:.0f} s (are the other nodes started, and is --master-addr reachable?)")
    if errors:
        raise errors[0]
    channels = {}
    for channel in accepted:
        message = channel.recv()
        check_message(message, "hello")
        rank = message[1]
        if rank in channels or rank == 0:
            raise ValueError(f"tensor-parallel rank {rank} was started twice (check --node-rank on every node)")
        if message[2] != fingerprint:
            raise ValueError(f"tensor-parallel rank {rank} was started with other model or engine options than node "
                             "0 (every node needs the same model path, dtype, limits and batching options)")
        channels[rank] = channel
    return channels


def await_messages(channels: dict[int, Connection], kind: str, processes: list[BaseProcess],
                   timeout: float) -> dict[int, Any]:
    """Wait until every worker has sent (`kind`, rank, ...); rank -> its message's payload (None when it has
    none). A "failed" message, a process that exits or a channel that ends raises ValueError."""
    waiting = dict(channels)
    payloads: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while waiting:
        ready = wait(list(waiting.values()) + [p.sentinel for p in processes], timeout=0.5)
        for channel in [c for c in waiting.values() if c in ready]:
            try:
                message = channel.recv()
            except EOFError:
                check_processes(processes)
                raise ValueError("a tensor-parallel worker closed its channel while starting") from None
            check_message(message, kind)
            payloads[message[1]] = message[2] if len(message) > 2 else None
            del waiting[message[1]]
        check_processes(processes)
        if time.monotonic() > deadline:
            raise ValueError(f"tensor-parallel ranks {sorted(waiting)} did not get to {kind!r} within {timeout:.0f} s")
    return payloads


def check_message(message: Any, kind: str) -> None:
    if message[0] == "failed":
        raise ValueError(f"tensor-parallel rank {message[1]} failed to start: {message[2]}")
    if message[0] != kind:
        raise ValueError(f"tensor-parallel rank {message[1]} sent {message[0]!r} while starting, not {kind!r}")


def check_processes(processes: list[BaseProcess]) -> None:
    for process in processes:
        if process.exitcode is not None:
            raise ValueError(f"tensor-parallel rank {process.name.rsplit('-', 1)[-1]} exited while starting "
                             f"({describe_exit(process.exitcode)})")


def describe_exit(exitcode: int) -> str:
    if exitcode < 0:
        import signal

        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}; its log above says why"


def run_headless_node(args: CoreArgs) -> int:
    """`inflight-serve --headless`: run this node's ranks until they end; returns the exit code for the node.

    The workers connect to node 0's step channel and serve its steps; they end when node 0 ends them (or is gone).
    SIGTERM and SIGINT end them too. 0 when every worker ended cleanly, else the first failure's exit code.
    """
    import signal

    parallel = args.parallel
    assert parallel.master_port is not None, "validated: several nodes name the master port"
    processes = start_workers(args, parallel.local_ranks, parallel.master_port, parallel.master_port + 1,
                              cluster_key(parallel))
    logger.info("headless node %d of %d: ranks %d-%d started; waiting for node 0 at %s:%d", parallel.node_rank,
                parallel.nnodes, parallel.local_ranks.start, parallel.local_ranks.stop - 1, parallel.master_addr,
                parallel.master_port)

    def stop(signum: int, frame: object) -> None:
        stop_processes(processes, grace=5.0)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for process in processes:
            process.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_processes(processes, grace=5.0)
    failed = [p for p in processes if p.exitcode not in (0, None)]
    for process in failed:
        logger.error("%s exited with code %s", process.name, process.exitcode)
    return 0 if not failed else (2 if any(p.exitcode == 2 for p in failed) else 1)
