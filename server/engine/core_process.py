"""The engine core process: loads the engine, then steps it for the API process (core_client.py).

    inputs pipe ─▶ reader thread ─▶ inbox (queue.Queue) ─▶ core loop: apply adds/aborts (CoreDriver),
                                                           expire the queue, one step
    outputs pipe ◀─ writer thread ◀─ outbox ◀─ one StepOutputs per iteration (outputs, metric records, counts)

The reader thread keeps the API process's sends from ever waiting on a step; the writer thread keeps
the steps from waiting on the API process, which reads between serving its streams (a pipe holds only
a few steps' outputs; a stream that falls behind gets the steps it missed merged into one chunk). The
loop drains the inbox between steps and blocks on it while no request is unfinished. The process ignores SIGINT and SIGTERM
(the API process drains on them and then sends Shutdown) and exits when the inputs pipe closes, that is
when the API process is gone.
"""

from __future__ import annotations

import gc
import logging
import queue
import signal
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection

from server.engine.core_driver import CoreDriver
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
from server.engine.engine_config import EngineConfig
from server.engine.engine_core import EngineCore
from server.engine.loading import EngineLoadArgs
from server.engine.outputs import Delivery
from server.engine.stats import StatsRecorder
from server.log import configure_logging
from server.process_exit import exit_now

logger = logging.getLogger(__name__)
MAX_UNSENT_MESSAGES = 1024  # steps the API process may fall behind before the engine waits for it


@dataclass(slots=True)
class CoreProcessArgs:
    """Everything the engine core process needs, sent to it once when it is spawned."""

    load: EngineLoadArgs  # what to load
    config: EngineConfig  # batching and KV cache settings
    max_queue_time: float | None = None  # seconds a request may wait for its first step; None: no limit
    max_consecutive_step_failures: int = 3  # failed steps in a row after which the engine is dead
    log_level: str = "info"  # the API process's --log-level


def run_engine_core(args: CoreProcessArgs, inputs: Connection, outputs: Connection) -> None:
    """The process's entry point: load the engine, report Ready (or LoadFailed), then serve until told to stop.

    Args:
        args: what to load and how to run it.
        inputs: receives AddRequest, AbortRequest and Shutdown from the API process.
        outputs: sends Ready or LoadFailed, then StepOutputs (and EngineDied if the engine dies).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent drains
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(args.log_level)
    recorder = StatsRecorder()
    try:
        engine = args.load.load()
        core = EngineCore(engine, args.config, recorder)
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
        logger.exception("the engine core process could not load the engine")
        outputs.send(LoadFailed("other", f"{type(error).__name__}: {error}"))
        return
    gc.freeze()  # the engine lives until exit: the collector need not pass over it
    outputs.send(Ready(limits=core.limits, device=str(engine.device), dtype=str(engine.dtype).removeprefix("torch.")))
    _CoreLoop(driver, recorder, inputs, outputs).run()
    exit_now(0)


class _CoreLoop:
    """Steps the engine while requests are unfinished; sends one StepOutputs per iteration."""

    def __init__(self, driver: CoreDriver, recorder: StatsRecorder, inputs: Connection, outputs: Connection):
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
        except OSError as error:  # BrokenPipeError, ConnectionResetError: the API process is gone, nobody to answer
            logger.warning("could not send the engine's outputs, the API process is gone (%s: %s); stopping",
                           type(error).__name__, error)
        except BaseException as error:  # e.g. an output that cannot be pickled: its request would never end
            logger.exception("could not send the engine's outputs to the API process; the engine is dead")
            try:
                self.outputs.send(EngineDied(f"could not send the engine's outputs: {type(error).__name__}: {error}"))
            except BaseException:
                logger.exception("could not tell the API process that the engine is dead")
        self.inbox.put(Shutdown())  # stop the loop, and let it finish without blocking on a full outbox
        while self.outbox.get() is not None:
            pass

    def _read_inputs(self) -> None:
        """The reader thread: every message from the API process into the inbox; Shutdown once the pipe closes."""
        try:
            while True:
                self.inbox.put(self.inputs.recv())
        except EOFError:  # the API process closed its end: it is gone (it sends Shutdown when it stops in order)
            logger.info("the API process closed its end of the inputs pipe; stopping the engine")
        except BaseException:  # OSError, or a message that cannot be read: nothing after it can be trusted
            logger.exception("could not read a message from the API process; stopping the engine")
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
