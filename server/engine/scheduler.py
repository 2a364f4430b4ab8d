"""Continuous-batching scheduler: which requests run this step and how many tokens each.

One rule (as in vLLM v1): each request's computed tokens catch up with its tokens, under one token
budget per step (`max_num_batched_tokens`) and at most `max_num_seqs` running requests. A prompt
longer than the budget is prefilled in chunks over several steps; decodes (1 token) and chunks share
a step. Running requests go first, oldest first; then waiting ones are admitted in arrival order
while blocks and budget allow (never skipping the head of the queue, so admission is FIFO).

When a running request needs a block and none is free, the most recently admitted running request
is preempted: its blocks are freed and it goes back to the front of the waiting queue, to be
recomputed later (its generated tokens are kept and prefilled with its prompt).
"""

from __future__ import annotations

import time
from collections import deque

from server.engine.kv_cache_manager import KVCacheManager
from server.engine.request import Request, RequestStatus
from server.engine.scheduler_output import ScheduledRequest, SchedulerOutput


class Scheduler:
    """Holds the waiting queue and the running list; plans each step."""

    def __init__(
        self,
        kv_cache_manager: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
    ):
        """Create an empty scheduler.

        Args:
            kv_cache_manager: the block pool it allocates from.
            max_num_seqs: running requests at most.
            max_num_batched_tokens: new tokens per step at most (prompt chunks plus decodes).
            max_model_len: prompt plus generated tokens of one request at most.
        """
        for name, value in (
            ("max_num_seqs", max_num_seqs),
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("max_model_len", max_model_len),
        ):
            if value < 1:
                raise ValueError(f"{name} {value} must be at least 1")
        self.kv_cache_manager = kv_cache_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order; the last is preempted first
        self.requests: dict[str, Request] = {}  # every unfinished request by id
        self.num_preemptions_total = 0  # preemptions since start

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise ValueError if a request of this size could never run, whatever else is running.

        Args:
            num_prompt_tokens: prompt length.
            max_tokens: tokens it may generate.
        """
        if num_prompt_tokens < 1:
            raise ValueError("prompt must contain at least one token")
        total = num_prompt_tokens + max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total} exceeds the "
                f"model's maximum context length {self.max_model_len}; shorten the prompt or lower max_tokens"
            )
        # The last sampled token is never fed back, so at most total - 1 tokens need KV slots.
        num_blocks = self.kv_cache_manager.num_blocks_for(total - 1)
        if num_blocks > self.kv_cache_manager.num_blocks:
            capacity = self.kv_cache_manager.num_blocks * self.kv_cache_manager.block_size
            raise ValueError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) needs {num_blocks} KV blocks "
                f"but the whole cache has {self.kv_cache_manager.num_blocks} ({capacity} tokens); "
                "lower max_tokens or give the server more KV cache"
            )

    def add_request(self, request: Request) -> None:
        """Queue a new request at the back of the waiting queue (ValueError if it can never fit)."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.check_fits(request.num_prompt_tokens, request.params.max_tokens)
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        """Plan one step: continue running requests (preempting if blocks run out), then admit waiting ones.

        Returns:
            The requests to run, how many new tokens each, and which were preempted.
        """
        output = SchedulerOutput()
        budget = self.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_uncomputed_tokens, budget)
            assert num_new > 0, f"running request {request.request_id!r} has nothing to compute"
            if not self._allocate_or_preempt(request, num_new, output):
                break  # it preempted itself: nothing after it is left either
            self._add_to_output(request, num_new, output)
            budget -= num_new
            index += 1
        if not output.preempted_ids:
            budget = self._admit_waiting(budget, output)
        output.num_batched_tokens = self.max_num_batched_tokens - budget
        return output

    def _allocate_or_preempt(self, request: Request, num_new: int, output: SchedulerOutput) -> bool:
        """Allocate blocks for `request`'s next tokens, preempting the newest running requests as needed.

        Returns:
            True when allocated; False when `request` itself had to be preempted.
        """
        target = request.num_computed_tokens + num_new
        while not self.kv_cache_manager.allocate_slots(request.request_id, target):
            victim = self.running.pop()
            self._preempt(victim)
            output.preempted_ids.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _admit_waiting(self, budget: int, output: SchedulerOutput) -> int:
        """Admit waiting requests in order while sequences, budget and blocks allow; returns the budget left."""
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            num_new = min(request.num_uncomputed_tokens, budget)
            if not self.kv_cache_manager.allocate_slots(request.request_id, request.num_computed_tokens + num_new):
                break  # FIFO: later requests wait behind the head
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            self._add_to_output(request, num_new, output)
            budget -= num_new
        return budget

    def _add_to_output(self, request: Request, num_new: int, output: SchedulerOutput) -> None:
        output.scheduled.append(
            ScheduledRequest(
                request=request,
                num_computed_tokens=request.num_computed_tokens,
                num_new_tokens=num_new,
                block_ids=list(self.kv_cache_manager.block_table(request.request_id)),
                needs_sample=request.num_computed_tokens + num_new == request.num_tokens,
            )
        )

    def _preempt(self, request: Request) -> None:
        """Free the request's blocks and put it at the front of the waiting queue for recompute."""
        self.kv_cache_manager.free(request.request_id)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(request)

    def update_from_output(self, output: SchedulerOutput, sampled_token_ids: dict[str, int]) -> list[Request]:
        """Advance each scheduled request by its new tokens and append its sampled token.

        Args:
            output: the step that ran.
            sampled_token_ids: request id -> token sampled this step (requests with needs_sample).

        Returns:
            The requests that received a new token, in batch order.
        """
        now = time.monotonic()
        updated = []
        for item in output.scheduled:
            request = item.request
            if request.is_finished:
                continue
            request.num_computed_tokens += item.num_new_tokens
            token = sampled_token_ids.get(request.request_id)
            if token is not None:
                request.append_output(token, now)
                updated.append(request)
        return updated

    def finish_request(self, request_id: str, finish_reason: str) -> Request | None:
        """Finish a request wherever it is and free its blocks.

        Args:
            request_id: the request.
            finish_reason: "stop", "length", "abort" or "error".

        Returns:
            The finished request, or None if no unfinished request has that id.
        """
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.kv_cache_manager.free(request_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = finish_reason
        return request
