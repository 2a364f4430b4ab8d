"""The engine as the API layer sees it: requests in through an asyncio queue, tokens out per request.

    generate() ──▶ inputs queue ──▶ engine loop (one task) ──▶ EngineCore.step() in a worker thread
        ▲                                │                        (forward + sampling off the event loop)
        └──── per-request asyncio.Queue ◀┘ RequestOutput per new token, an exception if its step failed

Only the loop task touches the EngineCore between steps (adds, aborts); the worker thread touches it
during a step while the loop awaits it, so the two never overlap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from server.engine.engine_config import EngineConfig
from server.engine.engine_core import EngineCore, StepError
from server.engine.errors import EngineDeadError, EngineOverloadedError, RequestFailedError
from server.engine.kv_cache_manager import KVCacheManager
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams
from server.metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _AddRequest:
    """Message: queue a new request."""

    request_id: str  # its id
    prompt_token_ids: list[int]  # its prompt
    params: SamplingParams  # its parameters
    arrival_time: float  # time.monotonic() when generate() was called


@dataclass(slots=True)
class _AbortRequest:
    """Message: end a request (client gone or abort() called)."""

    request_id: str  # its id


@dataclass(slots=True)
class _Wake:
    """Message: re-check the stop flag."""


class AsyncEngine:
    """Continuous batching behind an asyncio interface; one loop task steps the engine."""

    def __init__(self, engine: Any, config: EngineConfig, metrics: Metrics | None = None):
        """Size and allocate the KV cache (the loop starts with `start()`).

        Args:
            engine: a loaded engine_builder.runtime.Engine.
            config: batching and KV cache settings.
            metrics: Prometheus metrics to update; None reports nothing.
        """
        self.core = EngineCore(engine, config, metrics)
        self.config = config
        self._engine = engine
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._inputs: asyncio.Queue[_AddRequest | _AbortRequest | _Wake] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop_task: asyncio.Task | None = None
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
        self._healthy = True
        self._loop_task = asyncio.create_task(self._run(), name="inflight-engine-loop")

    async def shutdown(self) -> None:
        """Stop the loop after the step in flight and end every outstanding request with "abort"."""
        self._stopping = True
        if self._loop_task is not None and self._inputs is not None:
            self._inputs.put_nowait(_Wake())
            await asyncio.gather(self._loop_task, return_exceptions=True)
        self._healthy = False
        self._drain_inputs()  # adds become streams to end, aborts are applied
        for request_id in self.core.request_ids:
            try:
                self._deliver(self.core.abort_request(request_id))
            except Exception:  # after a crash the core may be inconsistent; the stream still ends below
                logger.exception("could not abort request %r during shutdown", request_id)
        for request_id, queue in list(self._streams.items()):  # requests never added, or not ended above
            queue.put_nowait(
                RequestOutput(
                    request_id=request_id, new_token_ids=[], new_text="", new_logprobs=None, finished=True,
                    finish_reason="abort", num_prompt_tokens=0, num_generated_tokens=0,
                )
            )
        if self._executor is not None:
            self._executor.shutdown(wait=True)

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
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        if len(self._streams) - self.num_running >= self.config.max_queued_requests:
            raise EngineOverloadedError(
                f"{self.config.max_queued_requests} requests are already queued (max_queued_requests); retry later"
            )
        return self._stream(request_id, list(prompt_token_ids), params, time.monotonic())

    async def _stream(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival_time: float
    ) -> AsyncIterator[RequestOutput]:
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not self.is_running:
            raise EngineDeadError("the engine is not running (not started, shut down, or crashed)")
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = queue
        self._inputs.put_nowait(_AddRequest(request_id, prompt_token_ids, params, arrival_time))
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished and not self._stopping:
                self._inputs.put_nowait(_AbortRequest(request_id))

    async def abort(self, request_id: str) -> None:
        """End a request with finish_reason "abort" (its stream gets a final output); unknown ids are ignored."""
        if self._inputs is not None:
            self._inputs.put_nowait(_AbortRequest(request_id))

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
                try:
                    outputs = await loop.run_in_executor(self._executor, self.core.step)
                except StepError as error:
                    logger.exception("engine step failed; failing its %d requests", len(error.request_ids))
                    self._fail(error.request_ids, error)
                    continue
                except Exception as error:  # after the forward pass: every request's state is suspect
                    logger.exception("engine step failed while updating; failing all requests")
                    self._fail(self.core.request_ids, error)
                    continue
                for output in outputs:
                    self._deliver(output)
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # a bug outside a step: nothing can be trusted any more
            logger.exception("engine loop crashed")
            self._healthy = False
            for queue in list(self._streams.values()):
                queue.put_nowait(EngineDeadError(f"the engine loop crashed: {type(error).__name__}: {error}"))

    def _drain_inputs(self) -> None:
        while self._inputs is not None and not self._inputs.empty():
            self._handle(self._inputs.get_nowait())

    def _handle(self, message: _AddRequest | _AbortRequest | _Wake) -> None:
        if isinstance(message, _AddRequest):
            queue = self._streams.get(message.request_id)
            if queue is None:
                return  # the consumer left before the request reached the engine
            try:
                self.core.add_request(message.request_id, message.prompt_token_ids, message.params, message.arrival_time)
            except ValueError as error:
                queue.put_nowait(error)
        elif isinstance(message, _AbortRequest):
            output = self.core.abort_request(message.request_id)
            if output is not None:
                self._deliver(output)

    def _deliver(self, output: RequestOutput | None) -> None:
        if output is None:
            return
        queue = self._streams.get(output.request_id)
        if queue is not None:
            queue.put_nowait(output)

    def _fail(self, request_ids: list[str], error: Exception) -> None:
        """End the requests of a failed step with finish_reason "error" and raise in their streams."""
        cause = error.__cause__ if isinstance(error, StepError) else error
        for request_id in request_ids:
            try:
                self.core.abort_request(request_id, finish_reason="error")
            except Exception:  # keep failing the others; the loop's health check will tell
                logger.exception("could not end request %r after a failed step", request_id)
            queue = self._streams.get(request_id)
            if queue is not None:
                failure = RequestFailedError(f"request {request_id!r} failed: {type(cause).__name__}: {cause}")
                failure.__cause__ = cause
                queue.put_nowait(failure)
