"""AsyncEngine's interface with the EngineCore in its own process (like vLLM V1's engine core process).

    API process (event loop)                                 engine core process (spawned, core_process.py)
    generate() ── AddRequest / AbortRequest / Shutdown ──▶   reader thread ─▶ core loop: CoreDriver, step
    OutputStreams ◀── reader thread ◀──── StepOutputs ────   one message per step: outputs, metric records,
      (per-request queues, merging, abort on leaving)          the number of unfinished requests
    (sends go through a writer thread: the event loop never waits on the pipe)

Why: in one process the engine's step loop (a worker thread) and uvicorn's event loop share one GIL, and
under many concurrent streams each slows the other. Here only one message per step crosses over.

The child loads the engine itself (CUDA cannot be forked, so it is spawned) and answers Ready with what the
API needs; the API process loads only the tokenizer. The API process replays the child's metric records
into its own stats sink (the Prometheus exporter is served here). If the child dies (killed, crashed), the end of its pipe
makes the engine dead: every stream raises EngineDeadError and /health answers 503; the log says how the
pipe ended and how the process did. So does a child that stalls: requests pending and no step finished for
--engine-stall-timeout seconds (StallWatchdog); it is killed.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from engine_builder.loader import load_tokenizer
from server.engine.core_messages import (
    AbortRequest,
    AddRequest,
    EngineDied,
    LoadFailed,
    Ready,
    Shutdown,
    StepOutputs,
    decode_deliveries,
)
from server.engine.core_process import CoreProcessArgs, run_engine_core
from server.engine.errors import EngineDeadError, RequestFailedError
from server.engine.output_streams import OutputStreams, num_sequences
from server.engine.outputs import Delivery, RequestOutput
from server.engine.sampling_params import SamplingParams
from server.engine.stats import ClientStatsSink, replay
from server.engine.stall_watchdog import DEFAULT_STALL_TIMEOUT_SECONDS, StallWatchdog

logger = logging.getLogger(__name__)
SHUTDOWN_TIMEOUT_SECONDS = 30.0  # for the step in flight and the final aborts, before the process is killed
JOIN_TIMEOUT_SECONDS = 5.0  # for the process to exit once it said everything


class EngineCoreClient:
    """The engine as the API layer sees it (the interface of AsyncEngine), its core in a child process."""

    def __init__(self, args: CoreProcessArgs, metrics: ClientStatsSink | None = None, *,
                 engine_stall_timeout: float = DEFAULT_STALL_TIMEOUT_SECONDS):
        """Nothing starts yet: `launch()` spawns the process and waits until the engine is loaded.

        Args:
            args: what the child loads and how it runs the engine.
            metrics: where the engine's stats go (the child's records are replayed into it); None reports nothing.
            engine_stall_timeout: seconds without a finished step, while requests wait for the engine, after which
                the engine counts as dead and its process is killed.
        """
        self.args = args
        self.config = args.config
        self.metrics = metrics
        self.tokenizer: Any | None = None  # loaded by launch()
        self.info: Ready | None = None  # what the child said about the engine, once launched
        self._process: BaseProcess | None = None
        self._inputs: Connection | None = None  # to the child
        self._outputs: Connection | None = None  # from the child
        self._streams = OutputStreams(self._send_abort, metrics)
        self._num_unfinished_requests = 0  # as of the child's last StepOutputs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exited: asyncio.Event | None = None  # set once the child's outputs pipe ended (or is no longer read)
        self._sends: queue.SimpleQueue[AddRequest | AbortRequest | Shutdown | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None  # sends self._sends to the child (from launch())
        self._reader: threading.Thread | None = None  # reads the child's messages (from start())
        self._watchdog = StallWatchdog(engine_stall_timeout, lambda: self._streams.awaiting_engine, self._on_stall)
        self._watchdog_task: asyncio.Task | None = None
        self._healthy = False
        self._stopping = False
        self._dead = False  # set by _die: what the child still sends is ignored

    @property
    def max_model_len(self) -> int:
        return self._ready.limits.max_model_len

    @property
    def num_kv_blocks(self) -> int:
        return self._ready.limits.num_kv_blocks

    @property
    def block_size(self) -> int:
        return self._ready.limits.block_size

    @property
    def vocab_size(self) -> int:
        return self._ready.limits.vocab_size

    @property
    def device(self) -> str:
        return self._ready.device

    @property
    def dtype(self) -> str:
        return self._ready.dtype

    @property
    def pid(self) -> int | None:
        """The engine core process's id (None before launch())."""
        return None if self._process is None else self._process.pid

    @property
    def _ready(self) -> Ready:
        if self.info is None:
            raise RuntimeError("the engine core process is not launched yet; call launch()")
        return self.info

    @property
    def is_running(self) -> bool:
        """True from start() until shutdown, unless the engine core process died."""
        return self._healthy

    @property
    def has_unfinished_requests(self) -> bool:
        """True while any request is in the engine, or its stream has not ended."""
        return bool(self._streams) or self._num_unfinished_requests > 0

    def launch(self) -> None:
        """Spawn the engine core process and wait until it loaded the engine (the tokenizer loads meanwhile).

        Raises the child's ValueError (or OSError) with its message when the engine cannot be loaded, as
        loading it here would; the process is gone then.
        """
        if self._process is not None:
            raise RuntimeError("EngineCoreClient.launch() was already called")
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        inputs_recv, self._inputs = context.Pipe(duplex=False)
        self._outputs, outputs_send = context.Pipe(duplex=False)
        self._process = context.Process(target=run_engine_core, args=(self.args, inputs_recv, outputs_send),
                                        name="inflight-engine-core")
        self._process.start()
        inputs_recv.close()  # the child holds these ends now; closing ours lets either side see the other go
        outputs_send.close()
        self._writer = threading.Thread(target=self._write_inputs, name="inflight-client-inputs", daemon=True)
        self._writer.start()
        atexit.register(self._kill)  # never leave it behind, even if shutdown() is never called
        logger.info("engine core process %d started; it loads the engine", self._process.pid)
        try:
            tokenizer_error: Exception | None = None
            try:
                self.tokenizer = load_tokenizer(self.args.load.model)
            except Exception as error:  # the child's error about the same model says more; it comes first
                tokenizer_error = error
            self.info = self._wait_until_ready()
            if tokenizer_error is not None:
                raise tokenizer_error
        except BaseException:
            self._kill()
            atexit.unregister(self._kill)
            raise
        logger.info("engine core process %d is ready", self._process.pid)

    def _wait_until_ready(self) -> Ready:
        try:
            message = self._outputs.recv()
        except EOFError:
            raise RuntimeError(f"the engine core process {_describe_exit(self._process)} while loading the engine "
                               "(see the log above)") from None
        if isinstance(message, LoadFailed):
            if message.kind == "value":
                raise ValueError(message.message)
            if message.kind == "os":
                raise OSError(message.message)
            raise RuntimeError(f"the engine core process could not load the engine: {message.message}")
        assert isinstance(message, Ready), message
        return message

    async def start(self) -> None:
        """Listen to the engine core process on the running event loop (launching it first if needed)."""
        if self._loop is not None:
            raise RuntimeError("EngineCoreClient.start() was already called")
        if self._process is None:
            await asyncio.to_thread(self.launch)
        self._loop = asyncio.get_running_loop()
        self._exited = asyncio.Event()
        self._reader = threading.Thread(target=self._read_outputs, name="inflight-client-outputs", daemon=True)
        self._reader.start()
        self._watchdog_task = self._loop.create_task(self._watchdog.run(), name="inflight-stall-watchdog")
        self._set_healthy(True)

    def _set_healthy(self, healthy: bool) -> None:
        self._healthy = healthy
        if self.metrics is not None:
            self.metrics.record_engine_healthy(healthy)

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Return the stream of a request's outputs (the request is sent when the stream is first iterated).

        Args:
            request_id: unique among live requests.
            prompt_token_ids: the tokenized prompt.
            params: sampling parameters.

        Returns:
            An async iterator of RequestOutput; the last has finished=True. Raises ValueError for an id in use,
            EngineDeadError when the engine is not running, EngineOverloadedError when max_queued_requests are
            waiting, ValueError (naming the parameter) for a bad or never-fitting request. A response_format
            schema is compiled by the engine core: one that cannot be makes the iterator raise ValueError before
            any output; RequestFailedError if a step including the request failed.
        """
        if not self.is_running:
            raise EngineDeadError("the engine is not running (not started, shut down, or crashed)")
        self._ready.limits.check(prompt_token_ids, params)
        self._streams.check_admission(request_id, self.config.max_num_seqs, self.config.max_queued_requests)
        message = AddRequest(request_id, list(prompt_token_ids), params, time.monotonic())
        return self._streams.stream(request_id, lambda: self._send_add(message), num_sequences(params))

    def _send_add(self, message: AddRequest) -> None:
        if not self.is_running:
            raise EngineDeadError("the engine is not running (not started, shut down, or crashed)")
        self._sends.put(message)

    def _send_abort(self, request_id: str) -> None:
        if self._inputs is not None:
            self._sends.put(AbortRequest(request_id))

    def _write_inputs(self) -> None:
        """The writer thread: sends the queued messages in order, so the event loop never waits on the pipe
        (a frozen child stops reading; the stall watchdog must still run). None stops it."""
        gone = False
        while (message := self._sends.get()) is not None:
            if gone:
                continue  # the child is gone; its end of the pipe is noticed by the reader thread
            try:
                self._inputs.send(message)
            except OSError as error:  # BrokenPipeError: the child exited or was killed
                logger.info("could not send to the engine core process, it is gone (%s: %s)", type(error).__name__, error)
                gone = True
            except BaseException as error:  # a message that cannot be pickled: a bug; only its request fails
                logger.exception("could not send %s to the engine core process", type(message).__name__)
                if isinstance(message, AddRequest) and self._loop is not None:
                    failure = RequestFailedError(f"request {message.request_id!r} could not be sent to the engine: "
                                                 f"{type(error).__name__}: {error}")
                    self._call_on_loop(self._streams.deliver, [Delivery(message.request_id, failure)])

    def _call_on_loop(self, callback: Callable[..., object], *args: object) -> None:
        """Run `callback(*args)` on the event loop, from another thread (dropped once the loop is closed)."""
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop is closed: the server is gone, nobody to tell
            pass

    def end_streams(self) -> int:
        """End every open stream with finish_reason "abort" now, without waiting for the engine (a last resort
        at shutdown when it does not answer); what the engine still sends for them is dropped.

        Returns:
            How many streams were ended.
        """
        return self._streams.finish_all()

    def abort_all(self) -> int:
        """End every live request with finish_reason "abort" before the next step (a drain that timed out).

        Returns:
            How many requests were told to end.
        """
        for request_id in self._streams.request_ids:
            self._send_abort(request_id)
        return len(self._streams)

    def _read_outputs(self) -> None:
        """The reader thread: hands every message of the child to the event loop, then says how the pipe ended.

        Blocking reads in a thread of their own: a watched descriptor can be non-blocking (uvloop, which uvicorn
        picks when it is installed, makes it so), and a message read halfway would raise BlockingIOError.
        """
        os.set_blocking(self._outputs.fileno(), True)
        try:
            while True:
                self._call_on_loop(self._handle, self._outputs.recv())
        except EOFError:
            ended = "end of file"
        except BaseException as error:  # OSError, or a message that cannot be unpickled: nothing after it is trustworthy
            logger.exception("could not read a message from the engine core process")
            ended = f"a read error ({type(error).__name__}: {error})"
        self._call_on_loop(self._on_pipe_end, ended)

    def _handle(self, message: StepOutputs | EngineDied) -> None:
        """Apply one message of the child (on the event loop); a failure here makes the engine dead."""
        if self._exited.is_set() or self._dead:  # a stalled child that woke up: it no longer speaks for the engine
            return
        try:
            if isinstance(message, StepOutputs):
                self._watchdog.progressed()
                if self.metrics is not None:
                    replay(message.records, self.metrics)
                self._num_unfinished_requests = message.num_unfinished_requests
                self._streams.deliver(decode_deliveries(message.outputs, message.errors))
            elif isinstance(message, EngineDied):
                logger.error("the engine is dead (/health answers 503): %s", message.reason)
                self._die(message.reason)
            else:
                logger.error("unexpected message from the engine core process: %r", message)
        except Exception as error:  # a bug on this side: the streams cannot be trusted any more
            logger.exception("could not handle a message from the engine core process; the engine is dead")
            self._die(f"could not handle a message from the engine core process: {type(error).__name__}: {error}")
            self._process.kill()

    def _on_pipe_end(self, ended: str) -> None:
        """The child's outputs pipe ended (EOF or a read error): unless shutting down, the engine is dead."""
        if self._exited.is_set():
            return
        self._exited.set()
        self._num_unfinished_requests = 0
        if self._stopping:
            logger.debug("the outputs pipe of the engine core process ended (%s)", ended)
            return
        self._process.join(timeout=1.0)  # it is gone or going: its exit code says how
        how = _describe_exit(self._process)
        logger.error("the outputs pipe of the engine core process %d ended (%s); the process %s; the engine is dead "
                     "(/health answers 503)", self._process.pid, ended, how)
        self._die(f"the engine core process {how}")
        if self._process.exitcode is None:  # alive but deaf: it can do nothing useful any more
            logger.error("killing the engine core process %d, whose outputs pipe ended", self._process.pid)
            self._process.kill()

    def _on_stall(self, seconds: float) -> None:
        """The watchdog's verdict: requests are pending and no step finished for `seconds`."""
        reason = (f"the engine core process {self._process.pid} finished no step for {seconds:.0f} s while requests "
                  f"were pending (--engine-stall-timeout {self._watchdog.timeout:g})")
        logger.error("%s; the engine is dead (/health answers 503); killing the process", reason)
        self._die(reason)
        self._process.kill()  # SIGKILL also ends a stopped (SIGSTOP) process

    def _die(self, reason: str) -> None:
        """Mark the engine dead and end every stream with EngineDeadError."""
        if self.metrics is not None:
            self.metrics.record_engine_dead()  # nothing runs, waits or holds blocks any more
        self._dead = True
        self._set_healthy(False)
        self._stopping = True
        self._streams.closing = True
        self._streams.fail_all(EngineDeadError(reason))
        self._stop_watchdog()

    def _stop_watchdog(self) -> None:
        if self._watchdog_task is not None and self._watchdog_task is not asyncio.current_task():
            self._watchdog_task.cancel()

    async def shutdown(self) -> None:
        """Stop the child after its step in flight; every outstanding request ends with "abort"; no process is left."""
        self._stopping = True
        self._streams.closing = True
        self._set_healthy(False)
        self._stop_watchdog()
        if self._process is None:
            return
        if self._exited is not None and not self._exited.is_set():
            self._send_shutdown()
            try:
                await asyncio.wait_for(self._exited.wait(), SHUTDOWN_TIMEOUT_SECONDS)
            except asyncio.TimeoutError:
                logger.warning("the engine core process did not stop within %g s; killing it", SHUTDOWN_TIMEOUT_SECONDS)
                self._exited.set()  # what it may still send is not listened to
        elif self._exited is None:  # launched but never started
            self._send_shutdown()
        self._streams.finish_all()  # requests the child never answered
        await asyncio.to_thread(self._stop_process)

    def _send_shutdown(self) -> None:
        self._sends.put(Shutdown())

    def _stop_process(self) -> None:
        """Wait a while for the child to exit, then kill it; close the pipes."""
        self._process.join(JOIN_TIMEOUT_SECONDS)
        self._kill()
        atexit.unregister(self._kill)

    def _kill(self) -> None:
        """Kill the child if it still runs and close the pipes (start-up failed, or no shutdown() came)."""
        if self._process is not None and self._process.is_alive():
            logger.warning("killing the engine core process %d", self._process.pid)
            self._process.kill()
            self._process.join(JOIN_TIMEOUT_SECONDS)
        if self._writer is not None:
            self._sends.put(None)  # after what is queued; a dead child's pipe fails those sends at once
            self._writer.join(JOIN_TIMEOUT_SECONDS)
        if self._reader is not None:
            self._reader.join(JOIN_TIMEOUT_SECONDS)  # the child is gone: its pipe is at its end
        for connection in (self._inputs, self._outputs):
            if connection is not None:
                connection.close()


def _describe_exit(process: BaseProcess) -> str:
    """How a process ended, for a log line: "exited with code 1", "was killed by SIGKILL"."""
    code = process.exitcode
    if code is None:
        return "closed its pipe"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
