"""The engine core loop: steps an EngineCore for its client over a pair of channels, in a process or a thread.

    inputs ─▶ reader thread ─▶ inbox (queue.Queue) ─▶ core loop: apply adds/aborts (CoreDriver),
                                                      expire the queue, one step
    outputs ◀─ writer thread ◀─ outbox ◀─ one StepOutputs per iteration (outputs, stats records, counts)

The channels are a pipe's two Connections (engine core process, core_process.py) or two
in-memory queues (a thread of the API process, client/transports.py): the same loop either way.
The reader thread keeps the client's sends from ever waiting on a step; the writer thread keeps the steps
from waiting on the client, which reads between serving its streams (a pipe holds only a few steps' outputs;
a stream that falls behind gets the steps it missed merged into one chunk). The loop drains the inbox between
steps and blocks on it while no request is unfinished; it ends on Shutdown or when the inputs channel closes.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from server.engine.core.core_driver import CoreDriver
from server.engine.core.engine_core import EngineCore
from server.engine.core_args import Channel, CoreArgs
from server.engine.core_messages import (
    AbortRequest,
    AddRequest,
    EngineDied,
    LoadFailed,
    Ready,
    Shutdown,
    StepOutputs,
    encode_deliveries,
)
from server.engine.outputs import Delivery
from server.engine.stats import StatsRecorder

logger = logging.getLogger(__name__)
MAX_UNSENT_MESSAGES = 1024  # steps the client may fall behind before the engine waits for it


def serve_engine_core(args: CoreArgs, inputs: Channel, outputs: Channel, engine: Any | None = None,
                      on_ready: Callable[[EngineCore], None] | None = None) -> None:
    """Load the engine, report Ready (or LoadFailed), then run the core loop until Shutdown or the inputs close.

    Args:
        args: what to load and how to run it.
        inputs: receives AddRequest, AbortRequest and Shutdown from the client.
        outputs: sends Ready or LoadFailed, then StepOutputs (and EngineDied if the engine dies); closed at the end.
        engine: an engine loaded already (the in-thread transport of tests); None loads `args.load`.
        on_ready: called with the EngineCore once it is built, before Ready is sent.
    """
    recorder = StatsRecorder()
    executor = None  # a tensor-parallel one holds worker processes: shut down on every way out
    try:
        try:
            if args.parallel.tensor_parallel_size > 1:
                from server.runner.multiproc_executor import start_tensor_parallel

                engine, executor = start_tensor_parallel(args)
            elif engine is None:
                assert args.load is not None, "an engine core needs an engine or what to load"
                engine = args.load.load()
            core = EngineCore(engine, args.config, recorder, executor)
            executor = core.executor
            driver = CoreDriver(core, recorder, max_queue_time=args.max_queue_time,
                                max_consecutive_step_failures=args.max_consecutive_step_failures)
            try:
                core.structured_output.prepare()
            except ImportError as error:  # xgrammar missing: response_format requests are refused when they come
                logger.warning("structured output unavailable: %s", error)
        except ValueError as error:  # a model or option that cannot work: one line in the API process
            outputs.send(LoadFailed("value", str(error)))
            return
        except OSError as error:
            outputs.send(LoadFailed("os", str(error)))
            return
        except BaseException as error:
            logger.exception("the engine core could not load the engine")
            outputs.send(LoadFailed("other", f"{type(error).__name__}: {error}"))
            return
        if on_ready is not None:
            on_ready(core)
        assert engine is not None  # given, or loaded above
        outputs.send(Ready(limits=core.limits, device=str(engine.device),
                           dtype=str(engine.dtype).removeprefix("torch.")))
        CoreLoop(driver, recorder, inputs, outputs).run()
    finally:
        if executor is not None:
            executor.shutdown()
        outputs.close()  # the client's reader sees the end


class CoreLoop:
    """Steps the engine while requests are unfinished; sends one StepOutputs per iteration."""

    def __init__(self, driver: CoreDriver, recorder: StatsRecorder, inputs: Channel, outputs: Channel):
        self.driver = driver
        self.core = driver.core
        self.recorder = recorder
        self.inputs = inputs
        self.outputs = outputs
        self.inbox: queue.SimpleQueue[AddRequest | AbortRequest | Shutdown] = queue.SimpleQueue()
        self.outbox: queue.Queue[StepOutputs | EngineDied | None] = queue.Queue(maxsize=MAX_UNSENT_MESSAGES)
        self._sent_num_unfinished = 0  # num_unfinished_requests in the last StepOutputs

    def run(self) -> None:
        threading.Thread(target=self._read_inputs, name="inflight-core-inputs", daemon=True).start()
        writer = threading.Thread(target=self._write_outputs, name="inflight-core-outputs", daemon=True)
        writer.start()
        try:
            self._serve()
        finally:
            self.outbox.put(None)  # after everything queued: the writer sends it all, then stops
            writer.join()

    def _serve(self) -> None:
        try:
            while True:
                deliveries, stop = self._apply_inputs(block=not self.core.has_unfinished_requests)
                if stop:
                    deliveries += self.driver.abort_all()
                    self._send(deliveries)
                    return
                if self.core.has_unfinished_requests:
                    deliveries += self.driver.expire_queued()
                if self.core.has_unfinished_requests:
                    deliveries += self.driver.step()
                self._send(deliveries)
                if self.driver.dead_reason is not None:
                    self.outbox.put(EngineDied(self.driver.dead_reason))
                    return
        except BaseException as error:  # a bug outside a step: nothing can be trusted any more
            logger.exception("engine core loop crashed; the engine is dead")
            self.outbox.put(EngineDied(f"the engine loop crashed: {type(error).__name__}: {error}"))

    def _write_outputs(self) -> None:
        """The writer thread: sends the outbox in order until None; stops early if a message cannot be sent."""
        try:
            while (message := self.outbox.get()) is not None:
                self.outputs.send(message)
            return
        except OSError as error:  # BrokenPipeError, ConnectionResetError: the client is gone, nobody to answer
            logger.warning("could not send the engine's outputs, the client is gone (%s: %s); stopping",
                           type(error).__name__, error)
        except BaseException as error:  # e.g. an output that cannot be pickled: its request would never end
            logger.exception("could not send the engine's outputs to the client; the engine is dead")
            try:
                self.outputs.send(EngineDied(f"could not send the engine's outputs: {type(error).__name__}: {error}"))
            except BaseException:
                logger.exception("could not tell the client that the engine is dead")
        self.inbox.put(Shutdown())  # stop the loop, and let it finish without blocking on a full outbox
        while self.outbox.get() is not None:
            pass

    def _read_inputs(self) -> None:
        """The reader thread: every message from the client into the inbox; Shutdown once the channel closes."""
        try:
            while True:
                self.inbox.put(self.inputs.recv())
        except EOFError:  # the client closed its end: it is gone (it sends Shutdown when it stops in order)
            logger.info("the client closed its end of the inputs channel; stopping the engine")
        except BaseException:  # OSError, or a message that cannot be read: nothing after it can be trusted
            logger.exception("could not read a message from the client; stopping the engine")
        self.inbox.put(Shutdown())

    def _apply_inputs(self, block: bool) -> tuple[list[Delivery], bool]:
        """Apply every message in the inbox (waiting for one first if `block`).

        Returns:
            The deliveries, and whether Shutdown came.
        """
        deliveries: list[Delivery] = []
        message = self.inbox.get() if block else None
        while True:
            if message is None:
                try:
                    message = self.inbox.get_nowait()
                except queue.Empty:
                    return deliveries, False
            if isinstance(message, AddRequest):
                deliveries += self.driver.add(message.request_id, message.prompt_token_ids, message.params,
                                              message.arrival_time)
            elif isinstance(message, AbortRequest):
                deliveries += self.driver.abort(message.request_id)
            else:
                assert isinstance(message, Shutdown), message
                return deliveries, True
            message = None

    def _send(self, deliveries: list[Delivery]) -> None:
        """One StepOutputs, unless nothing at all changed."""
        records = self.recorder.take()
        num_unfinished = len(self.core.scheduler.requests)
        if not deliveries and not records and num_unfinished == self._sent_num_unfinished:
            return
        outputs, errors = encode_deliveries(deliveries)
        self.outbox.put(StepOutputs(outputs, errors, records, num_unfinished))
        self._sent_num_unfinished = num_unfinished
