"""A tensor-parallel rank other than 0: a process that loads its shard and runs every step rank 0 sends it.

    rank 0 (engine core) ──step channel (TCP, one per rank)──▶ rank r: collect what rank 0 collected, launch plan
          └──────────── torch.distributed (NCCL / gloo): the model's all-reduces, logits, sampled tokens ─┘

What a worker tells rank 0 on its channel while it starts, in order: ("hello", rank), ("loaded", rank, weight
bytes), ("ready", rank); or ("failed", rank, one line) and exit code 2. Afterwards it only reads. It exits when
rank 0 sends None, when the channel ends (rank 0 is gone), when its parent process is gone, or (exit code 1) when
a step raises: it would be out of step with the other ranks.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection

from server.engine import cpu_threads
from server.engine.core_args import EngineLoadArgs
from server.engine.engine_config import EngineConfig
from server.engine.parallel_config import ParallelConfig
from server.log import configure_logging

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class WorkerArgs:
    """What a worker process is started with (pickled to it)."""

    rank: int
    load: EngineLoadArgs
    config: EngineConfig
    parallel: ParallelConfig
    store_port: int  # torch.distributed's rendezvous on the master
    channel_port: int  # rank 0's step channel listener
    authkey: bytes  # the step channel's shared secret
    log_level: str = "info"
    threads: cpu_threads.ThreadChoice | None = None  # torch intra-op threads of this rank; None: torch's default


def connect(address: tuple[str, int], authkey: bytes, timeout: float) -> Connection:
    """Connect to rank 0's step channel, retrying while it is not listening yet (another node may start first)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Client(address, authkey=authkey)
        except (ConnectionRefusedError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def exit_with_parent() -> None:
    """End this process when the process that started it is gone (no orphaned workers)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="inflight-parent-watch", daemon=True).start()


def exit_if_rank0_leaves(channel: Connection, rank: int, started: threading.Event) -> None:
    """While this rank starts, rank 0 sends nothing but ("failed", why) when it cannot start; its channel turning
    readable means that, or that rank 0 is gone. Exit with code 2 then (one line saying why), instead of waiting in
    a collective until it times out."""
    def watch() -> None:
        while not started.is_set():
            if channel.poll(0.5) and not started.is_set():
                try:
                    why = f"rank 0 failed to start: {pickle.loads(channel.recv_bytes())[1]}"
                except (EOFError, OSError, pickle.UnpicklingError, IndexError, TypeError):
                    why = "rank 0 is gone"
                logger.error("tensor-parallel rank %d: %s; exiting", rank, why)
                logging.shutdown()
                os._exit(2)

    threading.Thread(target=watch, name="inflight-rank0-watch", daemon=True).start()


def settings_fingerprint(load: EngineLoadArgs, config: EngineConfig) -> str:
    """What every rank must agree on (the model, its dtype and limits, the batching and KV settings): a rank on
    another node started with other options would run different collectives."""
    return repr((load, config))


def run_worker(args: WorkerArgs) -> None:
    """The worker process's entry point."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the engine core ignores it; its workers must not
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C on a headless node: its launcher ends the workers
    configure_logging(args.log_level)
    exit_with_parent()
    rank = args.rank
    if args.threads is not None:
        cpu_threads.apply(args.threads, f"tensor-parallel rank {rank}")
    channel = connect((args.parallel.master_addr, args.channel_port), args.authkey, args.parallel.timeout_seconds)
    started = threading.Event()
    exit_if_rank0_leaves(channel, rank, started)
    try:
        from server.runner.executor import build_runner
        from server.runner.tensor_parallel import join_group, rank_device

        device = rank_device(args.load.device, args.parallel.local_rank(rank))
        channel.send(("hello", rank, settings_fingerprint(args.load, args.config)))
        group = join_group(args.parallel, rank, device, args.store_port)
        engine = args.load.load(device=device, tp_rank=rank, tp_size=group.size)
        channel.send(("loaded", rank, weight_bytes(engine)))
        runner = build_runner(engine, args.config, min(args.config.max_num_seqs, engine.limits.max_batch_size),
                              group)
    except (ValueError, OSError) as error:  # a model, option or machine that cannot work: one line
        logger.error("tensor-parallel rank %d failed to start: %s", rank, error)
        tell(channel, ("failed", rank, str(error)))
        sys.exit(2)
    except Exception as error:  # a bug: the traceback here, one line for rank 0
        logger.exception("tensor-parallel rank %d failed to start", rank)
        tell(channel, ("failed", rank, f"{type(error).__name__}: {error}"))
        sys.exit(2)
    started.set()
    channel.send(("ready", rank))
    try:
        serve_steps(channel, runner)
    except EOFError:
        logger.info("tensor-parallel rank %d: rank 0 is gone; exiting", rank)
        logging.shutdown()
        os._exit(0)  # no collective teardown with peers that may be gone
    except Exception:
        logger.exception("tensor-parallel rank %d: a step failed; exiting (the ranks are out of step)", rank)
        logging.shutdown()
        os._exit(1)
    group.destroy()


def tell(channel: Connection, message: tuple) -> None:
    """Send a start-up message to rank 0, if it is still there."""
    try:
        channel.send(message)
    except OSError:
        pass


def serve_steps(channel: Connection, runner) -> None:
    """Mirror rank 0: before each launch, collect as many steps as rank 0 collected since its last launch."""
    while True:
        message = pickle.loads(channel.recv_bytes())
        if message is None:
            return
        num_collects, plan = message
        for _ in range(num_collects):
            runner.collect()
        runner.launch(plan)


def weight_bytes(engine) -> int:
    """Bytes of weights this rank holds (its shard)."""
    model = getattr(engine.backend, "model", None)
    return 0 if model is None else sum(p.numel() * p.element_size() for p in model.parameters())
