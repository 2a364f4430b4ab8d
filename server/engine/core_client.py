"""AsyncEngine's interface with the EngineCore in its own process (like vLLM V1's engine core process).

    API process (event loop)                                 engine core process (spawned, core_process.py)
    generate() ── AddRequest / AbortRequest / Shutdown ──▶   reader thread ─▶ core loop: CoreDriver, step
    OutputStreams ◀── loop.add_reader ◀── StepOutputs ────   one message per step: outputs, metric records,
      (per-request queues, merging, abort on leaving)          running and unfinished counts

Why: in one process the engine's step loop (a worker thread) and uvicorn's event loop share one GIL, and
under many concurrent streams each slows the other. Here only one message per step crosses over.

The child loads the engine itself (CUDA cannot be forked, so it is spawned) and answers Ready with what the
API needs; the API process loads only the tokenizer. The API process replays the child's metric records
into its own Metrics (Prometheus is served here). If the child dies (killed, crashed), the end of its pipe
or of the process makes the engine dead: every stream raises EngineDeadError and /health answers 503.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing
import signal
import time
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from engine_builder.runtime import load_tokenizer
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
from server.engine.errors import EngineDeadError
from server.engine.output_streams import OutputStreams
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams
from server.metrics import Metrics

logger = logging.getLogger(__name__)
SHUTDOWN_TIMEOUT_SECONDS = 30.0  # for the step in flight and the final aborts, before the process is killed
JOIN_TIMEOUT_SECONDS = 5.0  # for the process to exit once it said everything


class EngineCoreClient:
    """The engine as the API layer sees it (the interface of AsyncEngine), its core in a child process."""

    def __init__(self, args: CoreProcessArgs, metrics: Metrics | None = None):
        """Nothing starts yet: `launch()` spawns the process and waits until the engine is loaded.

        Args:
            args: what the child loads and how it runs the engine.
            metrics: Prometheus metrics to update (the child's records are replayed into them); None reports nothing.
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
        self._num_running_streams = 0  # as of the child's last StepOutputs
        self._num_unfinished_requests = 0  # as of the child's last StepOutputs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exited: asyncio.Event | None = None  # set once the child's pipe or process ended
        self._healthy = False
        self._stopping = False

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
        self._loop.add_reader(self._outputs.fileno(), self._read_outputs)
        self._loop.add_reader(self._process.sentinel, self._on_exit)
        self._set_healthy(True)

    def _set_healthy(self, healthy: bool) -> None:
        self._healthy = healthy
        if self.metrics is not None:
            self.metrics.engine_healthy.set(1 if healthy else 0)

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
        self._streams.check_admission(request_id, self._num_running_streams, self.config.max_queued_requests)
        message = AddRequest(request_id, list(prompt_token_ids), params, time.monotonic())
        return self._streams.stream(request_id, lambda: self._send_add(message))

    def _send_add(self, message: AddRequest) -> None:
        if not self.is_running:
            raise EngineDeadError("the engine is not running (not started, shut down, or crashed)")
        try:
            self._inputs.send(message)
        except OSError as error:  # the child is gone; its exit is noticed on the event loop
            raise EngineDeadError(f"the engine core process is gone: {error}") from None

    def _send_abort(self, request_id: str) -> None:
        if self._inputs is None:
            return
        try:
            self._inputs.send(AbortRequest(request_id))
        except OSError:  # the child is gone, and its requests with it
            pass

    async def abort(self, request_id: str) -> None:
        """End a request with finish_reason "abort" (its stream gets a final output); unknown ids are ignored."""
        self._send_abort(request_id)

    def abort_all(self) -> int:
        """End every live request with finish_reason "abort" before the next step (a drain that timed out).

        Returns:
            How many requests were told to end.
        """
        for request_id in self._streams.request_ids:
            self._send_abort(request_id)
        return len(self._streams)

    def _read_outputs(self) -> None:
        """The event loop's reader callback: handle every message the child has sent so far."""
        try:
            while self._outputs.poll():
                self._handle(self._outputs.recv())
        except (EOFError, OSError):
            self._on_exit()
        except Exception as error:  # a bug on this side: the streams cannot be trusted any more
            logger.exception("could not handle a message from the engine core process; the engine is dead")
            self._remove_readers()
            self._exited.set()  # no longer listened to: shutdown() goes straight to stopping the process
            self._die(f"could not handle a message from the engine core process: {type(error).__name__}: {error}")

    def _handle(self, message: StepOutputs | EngineDied) -> None:
        if isinstance(message, StepOutputs):
            if self.metrics is not None:
                self.metrics.replay(message.records)
            self._num_running_streams = message.num_running_streams
            self._num_unfinished_requests = message.num_unfinished_requests
            self._streams.deliver(decode_deliveries(message.outputs, message.errors))
        elif isinstance(message, EngineDied):
            logger.error("the engine is dead (/health answers 503): %s", message.reason)
            self._die(message.reason)
        else:
            logger.error("unexpected message from the engine core process: %r", message)

    def _on_exit(self) -> None:
        """The child's pipe or process ended: take what it still sent; unless shutting down, the engine is dead."""
        if self._exited is None or self._exited.is_set():
            return
        self._remove_readers()
        try:
            while self._outputs.poll():
                self._handle(self._outputs.recv())
        except (EOFError, OSError):
            pass
        self._exited.set()
        self._num_running_streams = self._num_unfinished_requests = 0
        if not self._stopping:
            self._process.join(timeout=1.0)  # it is gone or going: its exit code says how
            reason = f"the engine core process {_describe_exit(self._process)}"
            logger.error("%s; the engine is dead (/health answers 503)", reason)
            self._die(reason)

    def _remove_readers(self) -> None:
        self._loop.remove_reader(self._outputs.fileno())
        self._loop.remove_reader(self._process.sentinel)

    def _die(self, reason: str) -> None:
        """Mark the engine dead and end every stream with EngineDeadError."""
        self._set_healthy(False)
        self._stopping = True
        self._streams.closing = True
        self._streams.fail_all(EngineDeadError(reason))

    async def shutdown(self) -> None:
        """Stop the child after its step in flight; every outstanding request ends with "abort"; no process is left."""
        self._stopping = True
        self._streams.closing = True
        self._set_healthy(False)
        if self._process is None:
            return
        if self._exited is not None and not self._exited.is_set():
            self._send_shutdown()
            try:
                await asyncio.wait_for(self._exited.wait(), SHUTDOWN_TIMEOUT_SECONDS)
            except asyncio.TimeoutError:
                logger.warning("the engine core process did not stop within %g s; killing it", SHUTDOWN_TIMEOUT_SECONDS)
                self._remove_readers()
        elif self._exited is None:  # launched but never started
            self._send_shutdown()
        self._streams.finish_all()  # requests the child never answered
        await asyncio.to_thread(self._stop_process)

    def _send_shutdown(self) -> None:
        try:
            self._inputs.send(Shutdown())
        except OSError:  # already gone
            pass

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
