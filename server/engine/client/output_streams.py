"""The live requests' outputs on the event loop: one asyncio.Queue per request, read as an async iterator.

The engine client (core_client.py) hands the deliveries of its core's messages here and returns `stream()`
from generate():

    deliveries ──▶ per-request asyncio.Queue ──▶ stream(): outputs (merged when the consumer fell behind),
                                                  an exception raised, or an abort sent when the consumer leaves
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncGenerator, Callable, Iterable

from server.engine.errors import EngineOverloadedError
from server.engine.outputs import Delivery, FinishReason, RequestOutput, merge_outputs
from server.engine.sampling_params import SamplingParams
from server.engine.stats import ClientStatsSink


def num_sequences(params: SamplingParams) -> int:
    """Running slots a request takes: its beam width with beam search, else one."""
    return params.beam_search.num_beams if params.beam_search is not None else 1


class OutputStreams:
    """The output queues of the requests whose streams are open."""

    def __init__(self, abort: Callable[[str], None], metrics: ClientStatsSink | None = None):
        """
        Args:
            abort: tells the engine to end a request (called when its consumer leaves before the end).
            metrics: counts those consumers (record_cancelled); None counts nothing.
        """
        self._abort = abort
        self.metrics = metrics
        self.closing = False  # the engine is stopping: a consumer leaving now is not a cancellation
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._awaiting: set[str] = set()  # open streams whose last output or error has not been delivered yet
        self._widths: dict[str, int] = {}  # admitted request -> sequences it runs as (beam width), in admission order

    def __len__(self) -> int:
        return len(self._queues)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._queues

    @property
    def request_ids(self) -> list[str]:
        return list(self._queues)

    @property
    def awaiting_engine(self) -> bool:
        """True while some open stream still waits for the engine (not merely for its consumer to read)."""
        return bool(self._awaiting)

    def num_queued(self, max_num_seqs: int) -> int:
        """Open requests that wait for a running slot: first come, first served, a beam search taking one slot
        per beam; once one request waits, so do all that came after it."""
        num_free, num_queued = max_num_seqs, 0
        for width in self._widths.values():
            if num_queued == 0 and width <= num_free:
                num_free -= width
            else:
                num_queued += 1
        return num_queued

    def admit(self, request_id: str, submit: Callable[[], None], num_sequences: int, max_num_seqs: int,
              max_queued_requests: int) -> AsyncGenerator[RequestOutput, None]:
        """Admit a request and hold its place at once; return its stream (`stream`, submitted when first iterated).

        The place counts from this call, so requests admitted together (the n choices of one completion) count
        each other; it is given back when the stream ends, or when a stream that never started is dropped.

        Args:
            request_id: the new request's id.
            submit: sends the request to the engine.
            num_sequences: running slots it takes (its beam width with beam search).
            max_num_seqs, max_queued_requests: as for check_admission.

        Returns:
            Its stream. Raises what check_admission raises.
        """
        self.check_admission(request_id, max_num_seqs, max_queued_requests)
        self._widths[request_id] = num_sequences
        stream = self.stream(request_id, submit)
        weakref.finalize(stream, self._widths.pop, request_id, None)  # dropped without being started
        return stream

    def check_admission(self, request_id: str, max_num_seqs: int, max_queued_requests: int) -> None:
        """Raise ValueError for an id in use, EngineOverloadedError when max_queued_requests are queued.

        The count is exact at the moment of the call (`num_queued`, from the admitted requests alone: no engine
        state that may be a step old), so with 2 running slots and 4 queue places the 7th concurrent request is
        refused.

        Args:
            request_id: the new request's id.
            max_num_seqs: sequences the engine runs together (its running slots).
            max_queued_requests: queued requests at most.
        """
        if request_id in self._queues or request_id in self._widths:
            raise ValueError(f"request id {request_id!r} is already in use")
        if self.num_queued(max_num_seqs) >= max_queued_requests:
            raise EngineOverloadedError(
                f"{max_queued_requests} requests are already queued (max_queued_requests); retry later")

    def deliver(self, deliveries: Iterable[Delivery]) -> None:
        """Queue each delivery for its stream; deliveries for streams already closed are dropped."""
        for delivery in deliveries:
            queue = self._queues.get(delivery.request_id)
            if queue is not None:
                queue.put_nowait(delivery.item)
                if isinstance(delivery.item, BaseException) or delivery.item.finished:
                    self._awaiting.discard(delivery.request_id)

    def fail_all(self, error: BaseException) -> None:
        """Make every open stream raise `error` (the engine died)."""
        for queue in self._queues.values():
            queue.put_nowait(error)
        self._awaiting.clear()

    def finish_all(self) -> int:
        """End every open stream with finish_reason "abort" (shutdown; a stream already ended ignores it); what the
        engine still delivers for them is dropped, and consumers leaving from now on are no cancellations.

        Returns:
            How many streams were open.
        """
        self.closing = True
        for request_id, queue in self._queues.items():
            queue.put_nowait(RequestOutput(
                request_id=request_id, new_token_ids=[], new_text="", new_logprobs=None, finished=True,
                finish_reason=FinishReason.ABORT, num_prompt_tokens=0, num_generated_tokens=0,
            ))
        self._awaiting.clear()
        return len(self._queues)

    async def stream(self, request_id: str, submit: Callable[[], None]) -> AsyncGenerator[RequestOutput, None]:
        """Open the request's stream, `submit()` it to the engine, and yield its outputs until the last.

        Args:
            request_id: the request (admitted: its place is held in `_widths` until the stream ends).
            submit: sends the request to the engine; raises EngineDeadError when the engine stopped.

        Returns:
            Its outputs; a consumer that fell behind gets everything queued as one merged output. A delivered
            exception is raised (after the outputs before it). If the consumer stops iterating before the
            last output (aclose, cancellation, client gone), the request is aborted.
        """
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = queue
        self._awaiting.add(request_id)
        try:
            submit()
        except BaseException:
            del self._queues[request_id]
            self._awaiting.discard(request_id)
            self._widths.pop(request_id, None)
            raise
        finished = False
        try:
            error: BaseException | None = None  # taken from the queue while merging; raised after the merged output
            while True:
                item = error if error is not None else await queue.get()
                error = None
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
            self._queues.pop(request_id, None)
            self._awaiting.discard(request_id)
            self._widths.pop(request_id, None)
            if not finished and not self.closing:  # the consumer left early: the client went away
                self._abort(request_id)
                if self.metrics is not None:
                    self.metrics.record_cancelled()
