"""The engine as the API layer sees it: requests in through an asyncio queue, tokens out per request.

    generate() ──▶ inputs queue ──▶ engine loop (one task) ──▶ EngineCore.step() in a worker thread
        ▲                                │                        (forward + sampling off the event loop)
        └──── per-request asyncio.Queue ◀┘ RequestOutput per new token, an exception if its step failed

Only the loop task touches the EngineCore between steps (adds, aborts); the worker thread touches it
during a step while the loop awaits it, so the two never overlap. What a failure ends is CoreDriver's
rule (core_driver.py); when it declares the engine dead, or the loop crashes, every request fails and
is_running is False. The streams are OutputStreams (output_streams.py), shared with EngineCoreClient,
which runs the same driver in a child process instead of a thread (core_client.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from server.engine.core_driver import CoreDriver, check_policy
from server.engine.core_messages import AbortRequest, AddRequest
from server.engine.engine_config import EngineConfig
from server.engine.engine_core import EngineCore
from server.engine.errors import EngineDeadError
from server.engine.kv_cache_manager import KVCacheManager
from server.engine.output_streams import OutputStreams, num_sequences
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams
from server.engine.stall_watchdog import DEFAULT_STALL_TIMEOUT_SECONDS, StallWatchdog
from server.engine.stats import ClientStatsSink

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Wake:
    """Message: re-check the stop flag."""


class AsyncEngine:
    """Continuous batching behind an asyncio interface; one loop task steps the engine."""

    def __init__(self, engine: Any, config: EngineConfig, metrics: ClientStatsSink | None = None, *,
                 max_queue_time: float | None = None, max_consecutive_step_failures: int = 3,
                 engine_stall_timeout: float = DEFAULT_STALL_TIMEOUT_SECONDS):
        """Size and allocate the KV cache (the loop starts with `start()`).

        Args:
            engine: a loaded engine_builder.loader.Engine.
            config: batching and KV cache settings.
            metrics: where the engine's stats go (the Prometheus exporter); None reports nothing.
            max_queue_time: seconds a request may wait before its first step; longer waiters are dropped
                with QueueTimeoutError. None waits forever.
            max_consecutive_step_failures: failed steps in a row after which the engine counts as dead.
            engine_stall_timeout: seconds without a finished step, while requests wait for the engine, after which
                the engine counts as dead (a step that never returns).
        """
        check_policy(max_queue_time, max_consecutive_step_failures)
        self.core = EngineCore(engine, config, metrics)
        self.driver = CoreDriver(self.core, metrics, max_queue_time=max_queue_time,
                                 max_consecutive_step_failures=max_consecutive_step_failures)
        self.config = config
        self.metrics = metrics
        self._engine = engine
        self._streams = OutputStreams(self._queue_abort, metrics)
        self._inputs: asyncio.Queue[AddRequest | AbortRequest | _Wake] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop_task: asyncio.Task | None = None
        self._watchdog = StallWatchdog(engine_stall_timeout, lambda: self._streams.awaiting_engine, self._on_stall)
        self._watchdog_task: asyncio.Task | None = None
        self._stalled = False
        self._stopping = False
        self._healthy = False

    @property
    def tokenizer(self) -> Any | None:
        return self._engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def num_kv_blocks(self) -> int:
        return self.core.num_kv_blocks

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def kv_cache_manager(self) -> KVCacheManager:
        return self.core.kv_cache_manager

    @property
    def num_running(self) -> int:
        return self.core.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.core.scheduler.num_waiting

    @property
    def is_running(self) -> bool:
        """True while the loop task is alive and has not crashed."""
        return self._healthy and self._loop_task is not None and not self._loop_task.done()

    async def start(self) -> None:
        """Start the engine loop on the running event loop."""
        if self._loop_task is not None:
            raise RuntimeError("AsyncEngine.start() was already called")
        self._inputs = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inflight-engine")
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.core.structured_output.prepare)
        except ImportError as error:  # xgrammar missing: response_format requests are refused when they come
            logger.warning("structured output unavailable: %s", error)
        self._set_healthy(True)
        self._loop_task = asyncio.create_task(self._run(), name="inflight-engine-loop")
        self._watchdog_task = asyncio.create_task(self._watchdog.run(), name="inflight-stall-watchdog")

    def _set_healthy(self, healthy: bool) -> None:
        self._healthy = healthy
        if self.metrics is not None:
            self.metrics.record_engine_healthy(healthy)

    def _stop(self) -> None:
        """No more steps; consumers leaving from now on are not cancellations."""
        self._stopping = True
        self._streams.closing = True
        if self._watchdog_task is not None and self._watchdog_task is not asyncio.current_task():
            self._watchdog_task.cancel()

    def _on_stall(self, seconds: float) -> None:
        """The watchdog's verdict: requests are pending and no step finished for `seconds` (a step that hangs)."""
        reason = (f"the engine finished no step for {seconds:.0f} s while requests were pending "
                  f"(--engine-stall-timeout {self._watchdog.timeout:g})")
        logger.error("%s; the engine is dead (/health answers 503)", reason)
        self._stalled = True
        self._die(reason)
        if self._loop_task is not None:
            self._loop_task.cancel()  # it waits for the step that hangs

    async def shutdown(self) -> None:
        """Stop the loop after the step in flight and end every outstanding request with "abort"."""
        self._stop()
        if self._loop_task is not None and self._inputs is not None:
            self._inputs.put_nowait(_Wake())
            await asyncio.gather(self._loop_task, return_exceptions=True)
        self._set_healthy(False)
        if not self._stalled:  # the engine core is still the worker thread's while its step hangs
            self._drain_inputs()  # adds become streams to end, aborts are applied
            self._streams.deliver(self.driver.abort_all())
        self._streams.finish_all()  # requests never added, or not ended above
        if self._executor is not None:
            self._executor.shutdown(wait=not self._stalled)

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Validate a request and return the stream of its outputs.

        The request is queued when the stream is first iterated. If the consumer stops iterating
        (aclose, cancellation, client gone), the request is aborted and its blocks are freed.

        Args:
            request_id: unique among live requests.
            prompt_token_ids: the tokenized prompt.
            params: sampling parameters.

        Returns:
            An async iterator of RequestOutput; the last has finished=True. Raises ValueError (naming the
            parameter) for a bad or never-fitting request, EngineDeadError when the loop is not running,
            EngineOverloadedError when max_queued_requests are waiting; the iterator raises
            RequestFailedError if a step including the request failed.
        """
        if not self.is_running:
            raise EngineDeadError("the engine is not running (not started, shut down, or crashed)")
        self.core.validate_request(prompt_token_ids, params)
        self._streams.check_admission(request_id, self.config.max_num_seqs, self.config.max_queued_requests)
        message = AddRequest(request_id, list(prompt_token_ids), params, time.monotonic())
        return self._streams.stream(request_id, lambda: self._queue_add(message), num_sequences(params))

    def _queue_add(self, message: AddRequest) -> None:
        if not self.is_running:
            raise EngineDeadError("the engine is not running (not started, shut down, or crashed)")
        self._inputs.put_nowait(message)

    def _queue_abort(self, request_id: str) -> None:
        if self._inputs is not None:
            self._inputs.put_nowait(AbortRequest(request_id))

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
        if self._inputs is None:
            return 0
        for request_id in self._streams.request_ids:
            self._queue_abort(request_id)
        return len(self._streams)

    @property
    def has_unfinished_requests(self) -> bool:
        """True while any request is queued, waiting or running, or its stream has not ended."""
        return bool(len(self._streams)) or self.core.has_unfinished_requests

    async def _run(self) -> None:
        """The engine loop: apply queued adds/aborts, step in the worker thread, deliver outputs."""
        loop = asyncio.get_running_loop()
        try:
            while not self._stopping:
                self._drain_inputs()
                if self._stopping:
                    break
                if not self.core.has_unfinished_requests:
                    self._handle(await self._inputs.get())
                    continue
                self._streams.deliver(self.driver.expire_queued())
                if not self.core.has_unfinished_requests:
                    continue
                self._streams.deliver(await loop.run_in_executor(self._executor, self.driver.step))
                self._watchdog.progressed()
                if self.driver.dead_reason is not None:
                    self._die(self.driver.dead_reason)
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # a bug outside a step: nothing can be trusted any more
            logger.exception("engine loop crashed; the engine is dead (/health answers 503)")
            self._die(f"the engine loop crashed: {type(error).__name__}: {error}")

    def _die(self, reason: str) -> None:
        """Mark the engine dead and end every stream with EngineDeadError."""
        if self.metrics is not None:
            self.metrics.record_engine_dead()  # nothing runs, waits or holds blocks any more
        self._set_healthy(False)
        self._stop()
        self._streams.fail_all(EngineDeadError(reason))

    def _drain_inputs(self) -> None:
        while self._inputs is not None and not self._inputs.empty():
            self._handle(self._inputs.get_nowait())

    def _handle(self, message: AddRequest | AbortRequest | _Wake) -> None:
        """Apply one message; a failure concerns its request only, never the loop."""
        if isinstance(message, AddRequest):
            if message.request_id not in self._streams:
                return  # the consumer left before the request reached the engine
            self._streams.deliver(self.driver.add(
                message.request_id, message.prompt_token_ids, message.params, message.arrival_time))
        elif isinstance(message, AbortRequest):
            self._streams.deliver(self.driver.abort(message.request_id))
