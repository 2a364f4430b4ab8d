"""The engine as the API layer sees it: requests in through an asyncio queue, tokens out per request.

    generate() ──▶ inputs queue ──▶ engine loop (one task) ──▶ EngineCore.step() in a worker thread
        ▲                                │                        (forward + sampling off the event loop)
        └──── per-request asyncio.Queue ◀┘ RequestOutput per new token, an exception if its step failed

Only the loop task touches the EngineCore between steps (adds, aborts); the worker thread touches it
during a step while the loop awaits it, so the two never overlap.

Failures stay as small as they can be:

    one request's token cannot be processed (detokenizer, non-finite logits) -> that request fails
    a step raises in the forward pass or sampling (e.g. out of memory)       -> that step's requests fail
    max_consecutive_step_failures steps fail in a row, or the loop crashes   -> the engine is dead: every
                                                                                request fails, is_running is False
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
from server.engine.errors import EngineDeadError, EngineOverloadedError, QueueTimeoutError, RequestFailedError
from server.engine.kv_cache_manager import KVCacheManager
from server.engine.outputs import RequestOutput, merge_outputs
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

    def __init__(self, engine: Any, config: EngineConfig, metrics: Metrics | None = None, *,
                 max_queue_time: float | None = None, max_consecutive_step_failures: int = 3):
        """Size and allocate the KV cache (the loop starts with `start()`).

        Args:
            engine: a loaded engine_builder.runtime.Engine.
            config: batching and KV cache settings.
            metrics: Prometheus metrics to update; None reports nothing.
            max_queue_time: seconds a request may wait before its first step; longer waiters are dropped
                with QueueTimeoutError. None waits forever.
            max_consecutive_step_failures: failed steps in a row after which the engine counts as dead.
        """
        if max_queue_time is not None and max_queue_time <= 0:
            raise ValueError(f"max_queue_time must be > 0 seconds (or None); got {max_queue_time}")
        if max_consecutive_step_failures < 1:
            raise ValueError(f"max_consecutive_step_failures must be at least 1; got {max_consecutive_step_failures}")
        self.core = EngineCore(engine, config, metrics)
        self.config = config
        self.metrics = metrics
        self.max_queue_time = max_queue_time
        self.max_consecutive_step_failures = max_consecutive_step_failures
        self._num_failed_steps_in_a_row = 0
        self._num_steps = 0
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

    def _num_running_streams(self) -> int:
        """Running requests as the API sees them: the beams of one beam search request count once."""
        return len({r.beam_group_id or r.request_id for r in self.core.scheduler.running})

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

    def _set_healthy(self, healthy: bool) -> None:
        self._healthy = healthy
        if self.metrics is not None:
            self.metrics.engine_healthy.set(1 if healthy else 0)

    async def shutdown(self) -> None:
        """Stop the loop after the step in flight and end every outstanding request with "abort"."""
        self._stopping = True
        if self._loop_task is not None and self._inputs is not None:
            self._inputs.put_nowait(_Wake())
            await asyncio.gather(self._loop_task, return_exceptions=True)
        self._set_healthy(False)
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
        if len(self._streams) - self._num_running_streams() >= self.config.max_queued_requests:
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
            error: BaseException | None = None  # taken from the queue while merging; raised after the merged output
            while True:
                item = error if error is not None else await queue.get()
                error = None
                # A consumer that fell behind (a busy server) takes everything already queued as one output.
                while not isinstance(item, BaseException) and not item.finished and not queue.empty():
                    following = queue.get_nowait()
                    if isinstance(following, BaseException):
                        error = following
                        break
                    item = merge_outputs(item, following)
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished and not self._stopping:  # the consumer left early: the client went away
                self._inputs.put_nowait(_AbortRequest(request_id))
                if self.metrics is not None:
                    self.metrics.requests_cancelled.inc()

    async def abort(self, request_id: str) -> None:
        """End a request with finish_reason "abort" (its stream gets a final output); unknown ids are ignored."""
        if self._inputs is not None:
            self._inputs.put_nowait(_AbortRequest(request_id))

    def abort_all(self) -> int:
        """End every live request with finish_reason "abort" before the next step (a drain that timed out).

        Returns:
            How many requests were told to end.
        """
        if self._inputs is None:
            return 0
        for request_id in list(self._streams):
            self._inputs.put_nowait(_AbortRequest(request_id))
        return len(self._streams)

    @property
    def has_unfinished_requests(self) -> bool:
        """True while any request is queued, waiting or running, or its stream has not ended."""
        return bool(self._streams) or self.core.has_unfinished_requests

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
                self._expire_queued()
                if not self.core.has_unfinished_requests:
                    continue
                self._num_steps += 1
                try:
                    outputs = await loop.run_in_executor(self._executor, self.core.step)
                except StepError as error:  # forward pass or sampling: only the step's requests are affected
                    self._step_failed(error.request_ids, error.__cause__ or error, "in the forward pass or sampling")
                    continue
                except Exception as error:  # after the forward pass: every request's state is suspect
                    self._step_failed(self.core.request_ids, error, "while updating requests")
                    continue
                self._num_failed_steps_in_a_row = 0
                for output in outputs:
                    self._deliver(output)
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # a bug outside a step: nothing can be trusted any more
            logger.exception("engine loop crashed; the engine is dead (/health answers 503)")
            self._die(f"the engine loop crashed: {type(error).__name__}: {error}")

    def _die(self, reason: str) -> None:
        """Mark the engine dead and end every stream with EngineDeadError."""
        self._set_healthy(False)
        self._stopping = True
        for queue in list(self._streams.values()):
            queue.put_nowait(EngineDeadError(reason))

    def _step_failed(self, request_ids: list[str], cause: BaseException, stage: str) -> None:
        """Log a failed step with its context, fail its requests, and give up after too many in a row."""
        self._num_failed_steps_in_a_row += 1
        if self.metrics is not None:
            self.metrics.step_failures.inc()
        shown = ", ".join(request_ids[:8]) + (f" and {len(request_ids) - 8} more" if len(request_ids) > 8 else "")
        logger.error(
            "engine step %d failed %s (%d in a row): %s: %s; failing its %d requests (%s); %d running, %d waiting, "
            "%d of %d KV blocks used", self._num_steps, stage, self._num_failed_steps_in_a_row, type(cause).__name__,
            cause, len(request_ids), shown, self.num_running, self.num_waiting,
            self.kv_cache_manager.num_used_blocks, self.num_kv_blocks, exc_info=cause,
        )
        self._fail(request_ids, cause)
        _release_cached_device_memory()
        if self._num_failed_steps_in_a_row >= self.max_consecutive_step_failures:
            logger.error("%d engine steps failed in a row; the engine is dead (/health answers 503)",
                         self._num_failed_steps_in_a_row)
            self._die(f"{self._num_failed_steps_in_a_row} engine steps failed in a row, the last with "
                      f"{type(cause).__name__}: {cause}")

    def _expire_queued(self) -> None:
        """Drop waiting requests that were never scheduled and waited longer than max_queue_time."""
        if self.max_queue_time is None:
            return
        now = time.monotonic()
        expired = {request.beam_group_id or request.request_id: now - request.arrival_time
                   for request in self.core.scheduler.waiting
                   if request.first_scheduled_time is None and now - request.arrival_time > self.max_queue_time}
        for request_id, waited in expired.items():
            try:
                self.core.abort_request(request_id)
            except Exception:  # its stream still ends below
                logger.exception("could not drop request %r after its queue time", request_id)
            queue = self._streams.get(request_id)
            if queue is not None:
                queue.put_nowait(QueueTimeoutError(
                    f"the request waited {waited:.1f} s in the queue, longer than max_queue_time "
                    f"({self.max_queue_time:g} s); the server is overloaded, retry later"))

    def _drain_inputs(self) -> None:
        while self._inputs is not None and not self._inputs.empty():
            self._handle(self._inputs.get_nowait())

    def _handle(self, message: _AddRequest | _AbortRequest | _Wake) -> None:
        """Apply one message; a failure concerns its request only, never the loop."""
        if isinstance(message, _AddRequest):
            queue = self._streams.get(message.request_id)
            if queue is None:
                return  # the consumer left before the request reached the engine
            try:
                self.core.add_request(message.request_id, message.prompt_token_ids, message.params, message.arrival_time)
            except ValueError as error:
                queue.put_nowait(error)
            except Exception as error:  # e.g. its detokenizer could not be set up
                logger.exception("request %r could not be added to the engine; failing it", message.request_id)
                self._fail([message.request_id], error)
        elif isinstance(message, _AbortRequest):
            try:
                self._deliver(self.core.abort_request(message.request_id))
            except Exception:  # the request is left as it is; its stream has already gone
                logger.exception("could not abort request %r", message.request_id)

    def _deliver(self, output: RequestOutput | None) -> None:
        if output is None:
            return
        queue = self._streams.get(output.request_id)
        if queue is None:
            return
        if output.finish_reason == "error":  # the engine could not process this request's token
            queue.put_nowait(RequestFailedError(
                f"request {output.request_id!r} failed while processing its output (the server log has the cause)"))
        else:
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


def _release_cached_device_memory() -> None:
    """After a failed step (often out of memory), give cached CUDA blocks back so the next step can fit."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception:  # best effort; the next step will tell
        logger.exception("could not release cached device memory")
