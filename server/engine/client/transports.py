"""Where the engine core runs for its client (core_client.py): a spawned process, or a thread of the API process.

    ProcessTransport   the core loop in a spawned process, over two pipes   (inflight-serve's default)
    ThreadTransport    the same loop in a thread, over two in-memory queues (--no-engine-process; tests)

Each starts the core and hands the client its two channels (it sends on `inputs`, receives on `outputs`),
and says how the core ended or ends it. The loop itself is one (core_loop.py).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
from multiprocessing.process import BaseProcess
from typing import Any, Protocol

from server.engine.core.core_loop import serve_engine_core
from server.engine.core.core_process import run_engine_core
from server.engine.core.engine_core import EngineCore
from server.engine.core_args import Channel, CoreArgs

_CLOSED = object()  # what a closed QueueChannel holds at its end


class QueueChannel:
    """One direction of the in-thread transport: a Connection's send/recv/close over a queue; EOF once closed."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def send(self, message: Any) -> None:
        self._queue.put(message)

    def recv(self) -> Any:
        message = self._queue.get()
        if message is _CLOSED:
            self._queue.put(_CLOSED)  # every later recv sees the end too
            raise EOFError
        return message

    def close(self) -> None:
        self._queue.put(_CLOSED)


class Transport(Protocol):
    """How the client starts, watches and ends its engine core."""

    name: str  # for log lines: "engine core process 1234", "engine core thread"

    def start(self) -> tuple[Channel, Channel]:
        """Start the core; return (inputs, outputs): the client sends on the first and receives on the second."""
        ...

    def join(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the core to end."""
        ...

    def is_alive(self) -> bool: ...

    def describe_exit(self) -> str:
        """How the core ended, for a log line: "exited with code 1", "was killed by SIGKILL", "is still running"."""
        ...

    def kill(self) -> None:
        """End the core now (a process is killed; a thread's channels are closed, it stops when it can)."""
        ...


class ProcessTransport:
    """The engine core in a spawned process (CUDA cannot be forked); the process loads the engine itself."""

    def __init__(self, args: CoreArgs) -> None:
        self.args = args
        self.process: BaseProcess | None = None
        self.name = "engine core process"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def start(self) -> tuple[Channel, Channel]:
        context = multiprocessing.get_context("spawn")
        inputs_recv, inputs = context.Pipe(duplex=False)
        outputs, outputs_send = context.Pipe(duplex=False)
        self.process = context.Process(target=run_engine_core, args=(self.args, inputs_recv, outputs_send),
                                       name="inflight-engine-core")
        self.process.start()
        inputs_recv.close()  # the child holds these ends now; closing ours lets either side see the other go
        outputs_send.close()
        # Blocking reads (in the client's reader thread): a descriptor some event loop watched may have been made
        # non-blocking (uvloop does), and a message read halfway would raise BlockingIOError.
        os.set_blocking(outputs.fileno(), True)
        self.name = f"engine core process {self.process.pid}"
        return inputs, outputs

    def join(self, timeout: float) -> None:
        if self.process is not None:
            self.process.join(timeout)

    def is_alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def describe_exit(self) -> str:
        code = None if self.process is None else self.process.exitcode
        if code is None:
            return "is still running"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"

    def kill(self) -> None:
        """SIGKILL the core's process group: the core and what it started (tensor-parallel workers), stopped
        (SIGSTOP) ones too."""
        if self.process is None or self.process.pid is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # the core leads its own group (core_process.py)
        except (ProcessLookupError, PermissionError):  # the group is gone, or the core had not set it up yet
            if self.process.is_alive():
                self.process.kill()


class ThreadTransport:
    """The engine core in a thread of the API process (it loads the engine there unless given one)."""

    def __init__(self, args: CoreArgs, engine: Any | None = None) -> None:
        """
        Args:
            args: what to load and how to run it.
            engine: an engine loaded already (tests share one between cores); None loads `args.load`.
        """
        self.args = args
        self.engine = engine
        self.name = "engine core thread"
        self.core: EngineCore | None = None  # the running core, for tests that look inside (a test-only seam)
        self._thread: threading.Thread | None = None
        self._channels: tuple[QueueChannel, QueueChannel] | None = None

    def start(self) -> tuple[Channel, Channel]:
        if self.engine is None:  # the core thread loads a tokenizer while this thread loads its own: transformers'
            # lazy names resolved by two threads at once can fail ("cannot import name 'AutoTokenizer'"), so here first
            from transformers import AutoTokenizer  # noqa: F401
        inputs, outputs = QueueChannel(), QueueChannel()
        self._channels = (inputs, outputs)
        self._thread = threading.Thread(target=serve_engine_core, args=(self.args, inputs, outputs, self.engine,
                                                                         self._set_core),
                                        name="inflight-engine-core", daemon=True)
        self._thread.start()
        return inputs, outputs

    def _set_core(self, core: EngineCore) -> None:
        self.core = core

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def describe_exit(self) -> str:
        return "is still running" if self.is_alive() else "ended"

    def kill(self) -> None:
        """Close both channels: the client's reader ends now, the core loop once its step (if any) returns."""
        if self._channels is not None:
            for channel in self._channels:
                channel.close()
