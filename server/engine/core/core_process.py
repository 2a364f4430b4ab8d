"""The engine core process: the core loop (core_loop.py) in a spawned process, for the API process's client.

The process ignores SIGINT and SIGTERM (the API process drains on them and then sends Shutdown) and exits
when the loop ends: on Shutdown, or when the inputs pipe closes, that is when the API process is gone. It sets
torch's intra-op threads first (server/engine/cpu_threads.py).
"""

from __future__ import annotations

import gc
import os
import signal
from multiprocessing.connection import Connection

from server.engine import cpu_threads
from server.engine.core.core_loop import serve_engine_core
from server.engine.core_args import CoreArgs
from server.log import configure_logging
from server.process_exit import exit_now


def run_engine_core(args: CoreArgs, inputs: Connection, outputs: Connection) -> None:
    """The process's entry point: load the engine, report Ready (or LoadFailed), serve, exit.

    Args:
        args: what to load and how to run it.
        inputs: receives AddRequest, AbortRequest and Shutdown from the API process.
        outputs: sends Ready or LoadFailed, then StepOutputs (and EngineDied if the engine dies).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API process drains on Ctrl-C, then sends Shutdown
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.setpgrp()  # its own process group, with the workers it starts: the API process can kill them all at once
    configure_logging(args.log_level)
    cpu_threads.apply(cpu_threads.node_rank_threads(args.cpu_threads, args.parallel, os.environ), "engine core")
    # The engine lives until exit: the collector need not pass over it.
    serve_engine_core(args, inputs, outputs, on_ready=lambda core: gc.freeze())
    exit_now(0)
