"""The engine as the API layer sees it: one client, its engine core in a spawned process or in a thread.

    API process (event loop)                                 engine core (core_loop.py), by transports.py:
    generate() ── AddRequest / AbortRequest / Shutdown ──▶   a spawned process (default) or a thread
    OutputStreams ◀── reader thread ◀──── StepOutputs ────   one message per step: outputs, stats records,
      (per-request queues, merging, abort on leaving)          the number of unfinished requests
    (sends go through a writer thread: the event loop never waits on a channel)

Why a process: in one process the engine's step loop and uvicorn's event loop share one GIL, and under many
concurrent streams each slows the other. There only one message per step crosses over. The thread transport
runs the same loop over in-memory queues (--no-engine-process, and tests that look inside the engine).

The core loads the engine itself and answers Ready with what the API needs; the API process loads only the
tokenizer. The client replays the core's stats records into its own stats sink (the Prometheus exporter is
served here). If the core dies (killed, crashed), the end of its outputs channel makes the engine dead: every
stream raises EngineDeadError and /health answers 503; the log says how the channel ended and how the process
did. So does a core that stalls: requests pending and no step finished for --engine-stall-timeout seconds
(StallWatchdog); it is killed (a thread is cut off: its channels are closed).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any

from engine_builder.loader import load_tokenizer
from server.engine.client.output_streams import OutputStreams, num_sequences
from server.engine.client.stall_watchdog import (
    DEFAULT_STALL_TIMEOUT_SECONDS,
    StallWatchdog,
)
from server.engine.client.transports import ProcessTransport, ThreadTransport, Transport
from server.engine.core_args import Channel, CoreArgs
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
from server.engine.engine_config import EngineConfig
from server.engine.errors import EngineDeadError, RequestFailedError
from server.engine.outputs import Delivery, RequestOutput
from server.engine.sampling_params import SamplingParams
from server.engine.stats import ClientStatsSink, replay

if TYPE_CHECKING:
    from server.engine.core.engine_core import EngineCore

logger = logging.getLogger(__name__)
SHUTDOWN_TIMEOUT_SECONDS = 30.0  # for the step in flight and the final aborts, before the core is killed
JOIN_TIMEOUT_SECONDS = 5.0  # for the core to end once it said everything


class EngineCoreClient:
    """The engine as the API layer sees it (server/engine/protocol.py's EngineClient), over either transport."""

    def __init__(self, args: CoreArgs, metrics: ClientStatsSink | None = None, *,
                 engine_stall_timeout: float = DEFAULT_STALL_TIMEOUT_SECONDS, transport: Transport | None = None,
                 tokenizer: Any | None = None):
        """Nothing starts yet: `launch()` starts the engine core and waits until the engine is loaded.

        Args:
            args: what the core loads and how it runs the engine.
            metrics: where the engine's stats go (the core's records are replayed into it); None reports nothing.
            engine_stall_timeout: seconds without a finished step, while requests wait for the engine, after which
                the engine counts as dead and its core is killed.
            transport: where the core runs; None: a spawned process (ProcessTransport).
            tokenizer: the engine's tokenizer when it is loaded already; None loads it from args.load.model.
        """
        self.args = args
        self.config = args.config
        self.metrics = metrics
        self.tokenizer: Any | None = tokenizer  # else loaded by launch()
        self.info: Ready | None = None  # what the core said about the engine, once launched
        self._transport = transport if transport is not None else ProcessTransport(args)
        self._launched = False
        self._inputs: Channel | None = None  # to the core
        self._outputs: Channel | None = None  # from the core
        self._streams = OutputStreams(self._send_abort, metrics)
        self._num_unfinished_requests = 0  # as of the core's last StepOutputs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exited: asyncio.Event | None = None  # set once the core's outputs channel ended (or is no longer read)
        self._sends: queue.SimpleQueue[AddRequest | AbortRequest | Shutdown | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None  # sends self._sends to the core (from launch())
        self._reader: threading.Thread | None = None  # reads the core's messages (from start())
        self._watchdog = StallWatchdog(engine_stall_timeout, lambda: self._streams.awaiting_engine, self._on_stall)
        self._watchdog_task: asyncio.Task | None = None
        self._healthy = False
        self._stopping = False
        self._dead = False  # set by _die: what the core still sends is ignored

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

    @classmethod
    def in_thread(cls, engine: Any, config: EngineConfig, metrics: ClientStatsSink | None = None, *,
                  max_queue_time: float | None = None, max_consecutive_step_failures: int = 3,
                  engine_stall_timeout: float = DEFAULT_STALL_TIMEOUT_SECONDS) -> EngineCoreClient:
        """A client whose core runs `engine` (loaded already) in a thread of this process (tests share one engine).

        Args:
            engine: a loaded engine (engine_builder's load_engine).
            config: batching and KV cache settings.
            metrics, engine_stall_timeout: as for the constructor.
            max_queue_time, max_consecutive_step_failures: the engine core's policy (CoreArgs).
        """
        args = CoreArgs(load=None, config=config, max_queue_time=max_queue_time,
                        max_consecutive_step_failures=max_consecutive_step_failures)
        return cls(args, metrics, engine_stall_timeout=engine_stall_timeout, transport=ThreadTransport(args, engine),
                   tokenizer=engine.tokenizer)

    @property
    def pid(self) -> int | None:
        """The engine core process's id (None before launch(), or when the core runs in a thread)."""
        return self._transport.pid if isinstance(self._transport, ProcessTransport) else None

    @property
    def core(self) -> EngineCore:
        """The EngineCore of a core in a thread, once launched: for tests that look inside it (a test-only seam)."""
        if not isinstance(self._transport, ThreadTransport) or self._transport.core is None:
            raise RuntimeError("only a launched in-thread engine core can be looked into")
        return self._transport.core

    @property
    def _ready(self) -> Ready:
        if self.info is None:
            raise RuntimeError("the engine core is not launched yet; call launch()")
        return self.info

    @property
    def is_running(self) -> bool:
        """True from start() until shutdown, unless the engine core died."""
        return self._healthy

    @property
    def has_unfinished_requests(self) -> bool:
        """True while any request is in the engine, or its stream has not ended."""
        return bool(self._streams) or self._num_unfinished_requests > 0

    def launch(self) -> None:
        """Start the engine core and wait until it loaded the engine (the tokenizer loads meanwhile).

        Raises the core's ValueError (or OSError) with its message when the engine cannot be loaded, as
        loading it here would; the core is gone then.
        """
        if self._launched:
            raise RuntimeError("EngineCoreClient.launch() was already called")
        self._launched = True
        self._inputs, self._outputs = self._transport.start()
        self._writer = threading.Thread(target=self._write_inputs, name="inflight-client-inputs", daemon=True)
        self._writer.start()
        atexit.register(self._kill)  # never leave it behind, even if shutdown() is never called
        logger.info("%s started; it loads the engine", self._transport.name)
        try:
            tokenizer_error: Exception | None = None
            if self.tokenizer is None:
                try:
                    assert self.args.load is not None, "a client given a loaded engine is given its tokenizer"
                    self.tokenizer = load_tokenizer(self.args.load.model)
                except Exception as error:  # the core's error about the same model says more; it comes first
                    tokenizer_error = error
            self.info = self._wait_until_ready()
            if tokenizer_error is not None:
                raise tokenizer_error
        except BaseException:
            self._kill()
            atexit.unregister(self._kill)
            raise
        logger.info("%s is ready", self._transport.name)

    def _wait_until_ready(self) -> Ready:
        assert self._outputs is not None, "launch() starts the transport first"
        try:
            message = self._outputs.recv()
        except EOFError:
            self._transport.join(1.0)
            raise RuntimeError(f"the {self._transport.name} {self._transport.describe_exit()} while loading the "
                               "engine (see the log above)") from None
        if isinstance(message, LoadFailed):
            if message.kind == "value":
                raise ValueError(message.message)
            if message.kind == "os":
                raise OSError(message.message)
            raise RuntimeError(f"the {self._transport.name} could not load the engine: {message.message}")
        assert isinstance(message, Ready), message
        return message

    async def start(self) -> None:
        """Listen to the engine core on the running event loop (launching it first if needed)."""
        if self._loop is not None:
            raise RuntimeError("EngineCoreClient.start() was already called")
        if not self._launched:
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

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncGenerator[RequestOutput, None]:
        """Return the stream of a request's outputs (the request is sent when the stream is first iterated).

        Args:
            request_id: unique among live requests.
            prompt_token_ids: the tokenized prompt.
            params: sampling parameters.

        Returns:
            An async iterator of RequestOutput; the last has finished=True. Raises ValueError for an id in use,
            EngineDeadError when the engine is not running, EngineOverloadedError when max_queued_requests are
            waiting, InvalidRequest (naming the parameter) for a bad or never-fitting request. A response_format
            schema is compiled by the engine core: one that cannot be makes the iterator raise InvalidRequest
            before any output; RequestFailedError if a step including the request failed.
        """
        if not self.is_running:
            raise EngineDeadError("the engine is not running (not started, shut down, or crashed)")
        self._ready.limits.check(prompt_token_ids, params)
        message = AddRequest(request_id, list(prompt_token_ids), params, time.monotonic())
        return self._streams.admit(request_id, lambda: self._send_add(message), num_sequences(params),
                                   self.config.max_num_seqs, self.config.max_queued_requests)

    def _send_add(self, message: AddRequest) -> None:
        if not self.is_running:
            raise EngineDeadError("the engine is not running (not started, shut down, or crashed)")
        self._sends.put(message)

    def _send_abort(self, request_id: str) -> None:
        if self._inputs is not None:
            self._sends.put(AbortRequest(request_id))

    def _write_inputs(self) -> None:
        """The writer thread: sends the queued messages in order, so the event loop never waits on a channel
        (a frozen core stops reading its pipe; the stall watchdog must still run). None stops it."""
        assert self._inputs is not None, "launch() starts the transport before this thread"
        gone = False
        while (message := self._sends.get()) is not None:
            if gone:
                continue  # the core is gone; the end of its channel is noticed by the reader thread
            try:
                self._inputs.send(message)
            except OSError as error:  # BrokenPipeError: the core process exited or was killed
                logger.info("could not send to the %s, it is gone (%s: %s)", self._transport.name,
                            type(error).__name__, error)
                gone = True
            except BaseException as error:  # a message that cannot be pickled: a bug; only its request fails
                logger.exception("could not send %s to the %s", type(message).__name__, self._transport.name)
                if isinstance(message, AddRequest) and self._loop is not None:
                    failure = RequestFailedError(f"request {message.request_id!r} could not be sent to the engine: "
                                                 f"{type(error).__name__}: {error}")
                    self._call_on_loop(self._streams.deliver, [Delivery(message.request_id, failure)])

    def _call_on_loop(self, callback: Callable[..., object], *args: object) -> None:
        """Run `callback(*args)` on the event loop, from another thread (dropped once the loop is closed)."""
        assert self._loop is not None, "start() sets the loop before the reader runs; the writer checks first"
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
        self._num_unfinished_requests = 0  # the core's last count no longer holds the drain
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
        """The reader thread: hands every message of the core to the event loop, then says how the channel ended.

        Blocking reads in a thread of their own, never an event loop's reader callback: uvloop (which uvicorn picks
        where it is installed) makes a watched descriptor non-blocking, and a message read halfway raised
        BlockingIOError, taken for the end of the pipe.
        """
        assert self._outputs is not None, "launch() starts the transport before start() starts this thread"
        try:
            while True:
                self._call_on_loop(self._handle, self._outputs.recv())
        except EOFError:
            ended = "end of file"
        except BaseException as error:  # OSError, or a message that cannot be unpickled: nothing after it trustworthy
            logger.exception("could not read a message from the %s", self._transport.name)
            ended = f"a read error ({type(error).__name__}: {error})"
        self._transport.join(1.0)  # here, not on the event loop: it is gone or going, and its exit code says how
        self._call_on_loop(self._on_pipe_end, ended, self._transport.describe_exit())

    def _handle(self, message: StepOutputs | EngineDied) -> None:
        """Apply one message of the core (on the event loop); a failure here makes the engine dead."""
        assert self._exited is not None, "start() sets it before the reader runs"
        if self._exited.is_set() or self._dead:  # a stalled core that woke up: it no longer speaks for the engine
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
                logger.error("unexpected message from the %s: %r", self._transport.name, message)
        except Exception as error:  # a bug on this side: the streams cannot be trusted any more
            logger.exception("could not handle a message from the %s; the engine is dead", self._transport.name)
            self._die(f"could not handle a message from the {self._transport.name}: {type(error).__name__}: {error}")
            self._transport.kill()

    def _on_pipe_end(self, ended: str, how: str) -> None:
        """The core's outputs channel ended (`ended`: EOF or a read error; `how` the core ended): unless shutting
        down, the engine is dead."""
        assert self._exited is not None, "start() sets it before the reader runs"
        if self._exited.is_set():
            return
        self._exited.set()
        self._num_unfinished_requests = 0
        name = self._transport.name
        if self._stopping:
            logger.debug("the outputs of the %s ended (%s)", name, ended)
            return
        logger.error("the outputs of the %s ended (%s); it %s; the engine is dead (/health answers 503)",
                     name, ended, how)
        self._die(f"the {name} {how}")
        if self._transport.is_alive():  # alive but deaf: it can do nothing useful any more
            logger.error("killing the %s, whose outputs ended", name)
            self._transport.kill()

    def _on_stall(self, seconds: float) -> None:
        """The watchdog's verdict: requests are pending and no step finished for `seconds`."""
        reason = (f"the {self._transport.name} finished no step for {seconds:.0f} s while requests were pending "
                  f"(--engine-stall-timeout {self._watchdog.timeout:g})")
        logger.error("%s; the engine is dead (/health answers 503); killing it", reason)
        self._die(reason)
        self._transport.kill()

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
        """Stop the core after its step in flight; every outstanding request ends with "abort"; no process is left."""
        self._stopping = True
        self._streams.closing = True
        self._set_healthy(False)
        self._stop_watchdog()
        if not self._launched:
            return
        if self._exited is not None and not self._exited.is_set():
            self._send_shutdown()
            try:
                await asyncio.wait_for(self._exited.wait(), SHUTDOWN_TIMEOUT_SECONDS)
            except asyncio.TimeoutError:
                logger.warning("the %s did not stop within %g s; killing it", self._transport.name,
                               SHUTDOWN_TIMEOUT_SECONDS)
                self._exited.set()  # what it may still send is not listened to
        elif self._exited is None:  # launched but never started
            self._send_shutdown()
        self._streams.finish_all()  # requests the core never answered
        await asyncio.to_thread(self._stop_core)

    def _send_shutdown(self) -> None:
        self._sends.put(Shutdown())

    def _stop_core(self) -> None:
        """Wait a while for the core to end (not for a dead one), then kill it; close the channels."""
        self._transport.join(0 if self._dead else JOIN_TIMEOUT_SECONDS)
        self._kill()
        atexit.unregister(self._kill)

    def _kill(self) -> None:
        """Kill the core if it still runs and close the channels (start-up failed, or no shutdown() came)."""
        if self._transport.is_alive():
            if not self._dead:
                logger.warning("killing the %s", self._transport.name)
            self._transport.kill()
            self._transport.join(0 if self._dead else JOIN_TIMEOUT_SECONDS)
        if self._writer is not None:
            self._sends.put(None)  # after what is queued; a dead core's pipe fails those sends at once
            self._writer.join(JOIN_TIMEOUT_SECONDS)
        if self._reader is not None:
            self._reader.join(JOIN_TIMEOUT_SECONDS)  # the core is gone: its channel is at its end
        for connection in (self._inputs, self._outputs):
            if connection is not None:
                connection.close()

