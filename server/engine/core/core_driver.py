"""The rules around EngineCore, in one synchronous place: add, abort, expire, step, and what a failure ends.

The core loop (core_loop.py, in the engine core process or a thread) drives the engine through it. Every method
returns *deliveries*, what each request's stream
receives next: an output, or the exception the stream raises (its request has ended).

    add / abort / expire_queued / step / abort_all ──▶ list[Delivery] ──▶ the request's stream

Failures stay as small as they can be:

    one request's token cannot be processed (detokenizer, non-finite logits) -> that request fails
    a step raises in the forward pass or sampling (e.g. out of memory)       -> that step's requests fail
    a step raises while updating requests                                    -> every request fails
    max_consecutive_step_failures steps fail in a row                        -> the engine is dead
                                                                                (`dead_reason` says why)
"""

from __future__ import annotations

import logging
import time

from server.engine.core.engine_core import EngineCore, StepError
from server.engine.core_args import check_policy
from server.engine.errors import InvalidRequest, QueueTimeoutError, RequestFailedError
from server.engine.outputs import Delivery, FinishReason, RequestOutput
from server.engine.sampling_params import SamplingParams
from server.engine.stats import StatsSink

logger = logging.getLogger(__name__)


class CoreDriver:
    """Applies adds, aborts, queue expiry and steps to one EngineCore; called from one thread at a time."""

    def __init__(self, core: EngineCore, metrics: StatsSink | None = None, *, max_queue_time: float | None = None,
                 max_consecutive_step_failures: int = 3):
        """
        Args:
            core: the engine core it drives.
            metrics: the stats sink (a StatsRecorder in the engine core process) counting failed steps; None
                counts nothing.
            max_queue_time: seconds a request may wait before its first step; longer waiters are dropped
                with QueueTimeoutError. None waits forever.
            max_consecutive_step_failures: failed steps in a row after which the engine counts as dead.
        """
        check_policy(max_queue_time, max_consecutive_step_failures)
        self.core = core
        self.metrics = metrics
        self.max_queue_time = max_queue_time
        self.max_consecutive_step_failures = max_consecutive_step_failures
        self.dead_reason: str | None = None  # set once the engine counts as dead
        self._num_failed_steps_in_a_row = 0
        self._num_steps = 0

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
            arrival_time: float) -> list[Delivery]:
        """Queue a request; one that cannot be added fails alone (an InvalidRequest is the user's mistake: a 400)."""
        try:
            self.core.add_request(request_id, prompt_token_ids, params, arrival_time)
        except InvalidRequest as error:
            return [Delivery(request_id, error)]
        except Exception as error:  # e.g. its detokenizer could not be set up
            logger.exception("request %r could not be added to the engine; failing it", request_id)
            return self._fail([request_id], error)
        return []

    def abort(self, request_id: str) -> list[Delivery]:
        """End a request with finish_reason "abort"; unknown ids give nothing."""
        try:
            return self._delivery(self.core.abort_request(request_id))
        except Exception:  # the request is left as it is; its stream has already gone
            logger.exception("could not abort request %r", request_id)
            return []

    def abort_all(self) -> list[Delivery]:
        """End every unfinished request with finish_reason "abort" (shutdown)."""
        deliveries = []
        for request_id in self.core.request_ids:
            try:
                deliveries += self._delivery(self.core.abort_request(request_id))
            except Exception:  # after a crash the core may be inconsistent; the caller still ends the stream
                logger.exception("could not abort request %r during shutdown", request_id)
        return deliveries

    def expire_queued(self) -> list[Delivery]:
        """Drop waiting requests that were never scheduled and waited longer than max_queue_time."""
        if self.max_queue_time is None:
            return []
        now = time.monotonic()
        expired = {request.beam_group_id or request.request_id: now - request.arrival_time
                   for request in self.core.scheduler.waiting
                   if request.first_scheduled_time is None and now - request.arrival_time > self.max_queue_time}
        deliveries = []
        for request_id, waited in expired.items():
            try:
                self.core.abort_request(request_id)
            except Exception:  # its stream still ends below
                logger.exception("could not drop request %r after its queue time", request_id)
            deliveries.append(Delivery(request_id, QueueTimeoutError(
                f"the request waited {waited:.1f} s in the queue, longer than max_queue_time "
                f"({self.max_queue_time:g} s); the server is overloaded, retry later")))
        return deliveries

    def step(self) -> list[Delivery]:
        """Run one engine step; a failure ends the requests it concerns (and, repeated, the engine)."""
        self._num_steps += 1
        try:
            outputs = self.core.step()
        except StepError as error:  # forward pass or sampling: only the step's requests are affected
            return self._step_failed(error.request_ids, error.__cause__ or error, "in the forward pass or sampling")
        except Exception as error:  # after the forward pass: every request's state is suspect
            return self._step_failed(self.core.request_ids, error, "while updating requests")
        self._num_failed_steps_in_a_row = 0
        deliveries = []
        for output in outputs:
            deliveries += self._delivery(output)
        return deliveries

    def _delivery(self, output: RequestOutput | None) -> list[Delivery]:
        if output is None:
            return []
        if output.finish_reason is FinishReason.ERROR:  # the engine could not process this request's token
            return [Delivery(output.request_id, RequestFailedError(
                f"request {output.request_id!r} failed while processing its output (the server log has the cause)"))]
        return [Delivery(output.request_id, output)]

    def _step_failed(self, request_ids: list[str], cause: BaseException, stage: str) -> list[Delivery]:
        """Log a failed step with its context, fail its requests, and give up after too many in a row."""
        self._num_failed_steps_in_a_row += 1
        if self.metrics is not None:
            self.metrics.record_step_failure()
        core = self.core
        shown = ", ".join(request_ids[:8]) + (f" and {len(request_ids) - 8} more" if len(request_ids) > 8 else "")
        logger.error(
            "engine step %d failed %s (%d in a row): %s: %s; failing its %d requests (%s); %d running, %d waiting, "
            "%d of %d KV blocks used", self._num_steps, stage, self._num_failed_steps_in_a_row, type(cause).__name__,
            cause, len(request_ids), shown, core.scheduler.num_running, core.scheduler.num_waiting,
            core.kv_cache_manager.num_used_blocks, core.num_kv_blocks, exc_info=cause,
        )
        deliveries = self._fail(request_ids, cause)
        _release_cached_device_memory()
        if self._num_failed_steps_in_a_row >= self.max_consecutive_step_failures:
            logger.error("%d engine steps failed in a row; the engine is dead (/health answers 503)",
                         self._num_failed_steps_in_a_row)
            self.dead_reason = (f"{self._num_failed_steps_in_a_row} engine steps failed in a row, the last with "
                                f"{type(cause).__name__}: {cause}")
        return deliveries

    def _fail(self, request_ids: list[str], error: BaseException) -> list[Delivery]:
        """End requests with finish_reason "error"; their streams raise RequestFailedError."""
        cause = error.__cause__ if isinstance(error, StepError) else error
        deliveries = []
        for request_id in request_ids:
            try:
                self.core.abort_request(request_id, finish_reason=FinishReason.ERROR)
            except Exception:  # keep failing the others; the loop's health check will tell
                logger.exception("could not end request %r after a failed step", request_id)
            failure = RequestFailedError(f"request {request_id!r} failed: {type(cause).__name__}: {cause}")
            failure.__cause__ = cause
            deliveries.append(Delivery(request_id, failure))
        return deliveries


def _release_cached_device_memory() -> None:
    """After a failed step (often out of memory), give cached CUDA blocks back so the next step can fit."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception:  # best effort; the next step will tell
        logger.exception("could not release cached device memory")
