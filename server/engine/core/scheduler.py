"""Continuous-batching scheduler: which requests run this step and how many tokens each.

One rule (as in vLLM v1): each request's computed tokens catch up with its tokens, under one token
budget per step (`max_num_batched_tokens`) and at most `max_num_seqs` running requests. A prompt
longer than the budget is prefilled in chunks over several steps; decodes (1 token) and chunks share
a step. Running requests go first, oldest first; then waiting ones are admitted in arrival order
while blocks and budget allow (never skipping the head of the queue, so admission is FIFO).

When a running request needs a block and none is free, the most recently admitted running request
is preempted: its blocks are freed and it goes back to the front of the waiting queue, to be
recomputed later (its generated tokens are kept and prefilled with its prompt).

Prefix caching (kv_cache_manager.py): a request being admitted first takes the cached blocks of its
longest cached prefix and starts with them as computed tokens, so only the rest counts against the
token budget (a preempted request finds its own blocks again if they were not evicted). Requests that
ask for prompt logprobs skip the lookup (their prompt must be scored). Blocks a step fills are cached
once the step's results are back, so a failed step caches nothing.

Beam search: the beams of one request are requests with the same `beam_group_id`, kept next to each
other in the running list and the waiting queue, and scheduled, admitted and preempted as one unit.
A beam whose row was computed waits (nothing to compute) until its siblings' rows are computed too
and the engine continues the beams (`continue_beams`). A beam search request reserves `num_beams` of
the `max_num_seqs` sequences from its admission on. A beam about to write into a block it shares with
a sibling gets its own copy first (copy-on-write, see kv_cache_manager.py): the step's `block_copies`.

Async scheduling (engine_core.py): a launched step advances its requests at once, with a placeholder for
each token it samples (`advance_with_placeholders`); the tokens replace them when they reach the host
(`resolve_placeholders`). A request whose placeholder is its last allowed token is not scheduled again.

The plan it emits is data only (step_plan.py): a request the runner does not hold in its current form (new,
resumed after a preemption, a beam just continued, a table changed by copy-on-write) is sent whole once;
afterwards its rows carry only the blocks it gained (`Request.num_blocks_sent`). Finished requests are
listed in the next plan, so that the runner forgets them.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

from server.engine.core.beam_search import BeamChild
from server.engine.core.kv_cache_manager import KVCacheManager
from server.engine.core.request import Request, RequestStatus
from server.engine.core.scheduler_output import SchedulerOutput
from server.engine.outputs import FinishReason
from server.engine.request_limits import check_fits
from server.engine.step_plan import BlockCopy, NewRequest


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
        self._finished_ids: list[str] = []  # finished since the last plan: the runner forgets them

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def check_fits(self, num_prompt_tokens: int, max_tokens: int, num_beams: int = 1) -> None:
        """Raise ValueError if a request of this size could never run, whatever else is running (request_limits.py)."""
        check_fits(num_prompt_tokens, max_tokens, num_beams, max_num_seqs=self.max_num_seqs,
                   max_model_len=self.max_model_len, num_kv_blocks=self.kv_cache_manager.num_blocks,
                   block_size=self.kv_cache_manager.block_size)

    def add_request(self, request: Request) -> None:
        """Queue a new request at the back of the waiting queue (ValueError if it can never fit)."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.check_fits(request.num_prompt_tokens, request.params.max_tokens, self._num_seqs_of(request))
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        """Plan one step: continue running requests (preempting if blocks run out), then admit waiting ones.

        Returns:
            The requests to run, how many new tokens each, which were preempted, and block copies.
        """
        output = SchedulerOutput()
        budget = self.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if request.beam_group_id is None:  # the common unit, one request, without the unit's lists
                used, size = self._schedule_request(request, budget, output), 1
            else:
                unit = self._unit(self.running, index)
                used, size = self._schedule_unit(unit, budget, output), len(unit)
            if used is None:
                break  # it preempted itself: nothing after it is left either
            budget -= used
            index += size
        if not output.preempted_ids:
            self._admit_waiting(budget, output)
        if output.requests:  # an empty plan is not run: the host tier's copies wait for the next one
            output.plan.finished_ids, self._finished_ids = self._finished_ids, []
            output.plan.kv_transfers = self.kv_cache_manager.take_transfers()
        return output

    @staticmethod
    def _unit(requests: Sequence[Request], start: int) -> list[Request]:
        """The requests scheduled as one from `start`: all beams of a beam search request, else one request."""
        group = requests[start].beam_group_id
        end = start + 1
        while group is not None and end < len(requests) and requests[end].beam_group_id == group:
            end += 1
        return [requests[i] for i in range(start, end)]

    @staticmethod
    def _num_seqs_of(request: Request) -> int:
        """Sequences reserved by the unit `request` starts: its beam width, or 1."""
        beam_search = request.params.beam_search
        return 1 if request.beam_group_id is None or beam_search is None else beam_search.num_beams

    def _plan(self, unit: list[Request], budget: int) -> list[tuple[Request, int]]:
        """(request, new tokens) for the unit's members that have work, in order, within the budget."""
        plan = []
        for request in unit:
            if budget == 0:
                break
            if request.num_placeholders and request.num_tokens >= min(request.max_num_tokens, self.max_model_len):
                continue  # its last token is sampled (still on the device): it finishes when that is resolved
            num_new = min(request.num_uncomputed_tokens, budget)
            if num_new == 0:
                assert request.beam_group_id is not None, (
                    f"running request {request.request_id!r} has nothing to compute"
                )
                continue  # a beam waiting for its siblings' rows
            plan.append((request, num_new))
            budget -= num_new
        return plan

    def _schedule_unit(self, unit: list[Request], budget: int, output: SchedulerOutput) -> int | None:
        """Allocate and schedule a running unit's next tokens, preempting later units as blocks require.

        Returns:
            Tokens of budget used, or None when the unit itself had to be preempted.
        """
        plan = self._plan(unit, budget)
        copies: list[BlockCopy] = []
        for request, num_new in plan:
            request_copies = self._allocate_or_preempt(request, num_new, unit, output)
            if request_copies is None:
                return None
            if request_copies:  # blocks of its table were replaced, not only appended: send it whole
                request.num_blocks_sent = None
            copies.extend(request_copies)
        output.plan.block_copies.extend(copies)
        for request, num_new in plan:
            self._add_to_output(request, num_new, output)
        return sum(num_new for _, num_new in plan)

    def _schedule_request(self, request: Request, budget: int, output: SchedulerOutput) -> int | None:
        """_schedule_unit for a unit of one request (not a beam): the same rules, for the per-step hot path."""
        num_tokens = request.num_tokens
        if request.num_placeholders and num_tokens >= min(request.max_num_tokens, self.max_model_len):
            return 0  # its last token is sampled (still on the device): it finishes when that is resolved
        num_new = min(num_tokens - request.num_computed_tokens, budget)
        assert num_new > 0, f"running request {request.request_id!r} has nothing to compute"
        copies = self._allocate_or_preempt(request, num_new, [request], output)
        if copies is None:
            return None
        if copies:  # blocks of its table were replaced, not only appended: send it whole
            request.num_blocks_sent = None
            output.plan.block_copies.extend(copies)
        self._add_to_output(request, num_new, output)
        return num_new

    def _allocate_or_preempt(
        self, request: Request, num_new: int, unit: list[Request], output: SchedulerOutput
    ) -> list[BlockCopy] | None:
        """Make `request`'s blocks ready for its next tokens, preempting the newest running units as needed.

        Returns:
            The copy-on-write block copies; None when `unit` (holding `request`) itself had to be preempted.
        """
        start = request.num_computed_tokens
        while (copies := self.kv_cache_manager.prepare_write(request.request_id, start, start + num_new)) is None:
            victims = self._unit(self.running, self._unit_start(len(self.running) - 1))
            del self.running[len(self.running) - len(victims) :]
            for victim in reversed(victims):  # the unit keeps its order at the front of the queue
                self._preempt(victim)
            output.preempted_ids.extend(victim.request_id for victim in victims)
            if victims[0] is unit[0]:
                return None
        return copies

    def _unit_start(self, index: int) -> int:
        """Index in the running list of the first member of the unit holding running[index]."""
        group = self.running[index].beam_group_id
        while group is not None and index > 0 and self.running[index - 1].beam_group_id == group:
            index -= 1
        return index

    def _admit_waiting(self, budget: int, output: SchedulerOutput) -> int:
        """Admit waiting units in order while sequences, budget and blocks allow; returns the budget left."""
        num_seqs = sum(self._num_seqs_of(self.running[i]) for i in self._unit_starts())
        while self.waiting and budget > 0:
            unit = self._unit(self.waiting, 0)
            if num_seqs + self._num_seqs_of(unit[0]) > self.max_num_seqs:
                break
            num_queries, num_hits = self._take_cached_prefixes(unit)
            plan = self._plan(unit, budget)
            if not self._allocate_all(plan):
                for request in unit:  # its cached blocks go back to the cache
                    self.kv_cache_manager.free(request.request_id)
                    request.num_computed_tokens = 0
                break  # FIFO: later requests wait behind the head
            output.num_prefix_queries += num_queries
            output.num_prefix_hits += num_hits
            now = time.monotonic()
            for request in unit:
                self.waiting.popleft()
                request.status = RequestStatus.RUNNING
                if request.first_scheduled_time is None:
                    request.first_scheduled_time = now
                self.running.append(request)
            for request, num_new in plan:
                self._add_to_output(request, num_new, output)
                budget -= num_new
            num_seqs += self._num_seqs_of(unit[0])
        return budget

    def _take_cached_prefixes(self, unit: list[Request]) -> tuple[int, int]:
        """Give the unit's requests their cached prefixes (as computed tokens); returns (tokens looked up, found)."""
        num_queries = num_hits = 0
        if not self.kv_cache_manager.prefix_caching:
            return 0, 0
        for request in unit:
            if request.params.prompt_logprobs is not None or self.kv_cache_manager.has_blocks(request.request_id):
                continue
            assert request.num_computed_tokens == 0, "a waiting request holding no blocks has computed nothing"
            request.num_computed_tokens = self.kv_cache_manager.take_cached_prefix(
                request.request_id, request.token_ids(0, request.num_tokens), request.params.cache_salt)
            num_queries += request.num_tokens
            num_hits += request.num_computed_tokens
        return num_queries, num_hits

    def cache_written_blocks(self, output: SchedulerOutput) -> None:
        """A step's results are back: cache the blocks its rows filled (prefix caching).

        A request preempted since the step was planned (its blocks were freed, maybe re-taken) is skipped.
        """
        if not self.kv_cache_manager.prefix_caching:
            return
        plan = output.plan
        for request, admission, start, num_new in zip(output.requests, output.admissions, plan.num_computed_tokens,
                                                      plan.num_new_tokens):
            if request.is_finished or request.num_preemptions != admission:
                continue
            self.kv_cache_manager.cache_full_blocks(request.request_id, request.token_ids, start + num_new,
                                                    request.params.cache_salt)

    def _unit_starts(self) -> list[int]:
        """Indices in the running list where units begin."""
        return [i for i, r in enumerate(self.running) if i == 0 or r.beam_group_id is None
                or r.beam_group_id != self.running[i - 1].beam_group_id]

    def _allocate_all(self, plan: list[tuple[Request, int]]) -> bool:
        """Allocate blocks for every planned waiting request, or for none of them."""
        for position, (request, num_new) in enumerate(plan):
            start = request.num_computed_tokens
            copies = self.kv_cache_manager.prepare_write(request.request_id, start, start + num_new)
            if copies is None:
                for earlier, _ in plan[:position]:
                    self.kv_cache_manager.free(earlier.request_id)
                return False
            assert not copies, "a waiting request shares no blocks"
        return True

    def _add_to_output(self, request: Request, num_new: int, output: SchedulerOutput) -> None:
        table = self.kv_cache_manager.block_table(request.request_id)
        if request.num_blocks_sent is None:  # the runner learns it whole
            output.plan.new_requests.append(NewRequest(
                request.request_id, request.prompt_token_ids, list(request.output_token_ids), request.params,
                list(table),
            ))
            new_block_ids = []
        else:
            new_block_ids = list(table[request.num_blocks_sent:])
        request.num_blocks_sent = len(table)
        output.requests.append(request)
        output.admissions.append(request.num_preemptions)
        output.plan.add_row(request.request_id, request.num_computed_tokens, num_new,
                            request.num_computed_tokens + num_new == request.num_tokens, new_block_ids)

    def _preempt(self, request: Request) -> None:
        """Free the request's blocks and put it at the front of the waiting queue for recompute (not running)."""
        self.kv_cache_manager.free(request.request_id)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_blocks_sent = None
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(request)

    def update_from_output(self, output: SchedulerOutput, sampled_token_ids: dict[str, list[int]]) -> list[Request]:
        """Advance each scheduled request by its new tokens and append its sampled tokens.

        Args:
            output: the step that ran.
            sampled_token_ids: request id -> tokens sampled this step (rows with needs_sample).

        Returns:
            The requests that received a new token, in batch order.
        """
        now = time.monotonic()
        updated = []
        for request, num_new in zip(output.requests, output.plan.num_new_tokens):
            if request.is_finished:
                continue
            request.num_computed_tokens += num_new
            tokens = sampled_token_ids.get(request.request_id)
            if tokens:
                for token in tokens:
                    request.append_output(token, now)
                updated.append(request)
        return updated

    def advance_with_placeholders(self, output: SchedulerOutput) -> None:
        """Async scheduling: a step was launched; advance its requests before its tokens reach the host.

        Each scheduled request's computed tokens move on by its new tokens, and each one that samples
        gets a placeholder token, so the next step can be planned (and fed from the device) at once.
        """
        for request, num_new, sample in zip(output.requests, output.plan.num_new_tokens, output.plan.needs_sample):
            request.num_computed_tokens += num_new
            if sample:
                request.append_placeholder()

    def resolve_placeholders(self, output: SchedulerOutput, sampled_token_ids: dict[str, list[int]]) -> list[Request]:
        """Async scheduling: a launched step's tokens are on the host; fill in its requests' placeholders.

        Args:
            output: the step, as advanced by advance_with_placeholders.
            sampled_token_ids: request id -> tokens sampled in that step (one per placeholder).

        Returns:
            The unfinished requests that received their token, in batch order.
        """
        now = time.monotonic()
        updated = []
        for request in output.requests:
            tokens = sampled_token_ids.get(request.request_id)
            if not tokens or request.is_finished:
                continue
            for token in tokens:
                request.resolve_placeholder(token, now)
            updated.append(request)
        return updated

    def continue_beams(self, beams: list[Request], children: list[BeamChild]) -> list[Request]:
        """Make a beam search request's running beams continue as `children`, sharing their parents' blocks.

        Beam j becomes children[j]: its parent's tokens plus one, its parent's block table (reference
        counted; the partly filled last block is copied on the next write). Beams that no child continues
        lose their blocks. The first step of a request turns its one beam into num_beams beams.

        Args:
            beams: the request's running beams (all computed up to their last token), in beam order.
            children: the next running beams, from BeamSearch.step.

        Returns:
            The new running beams, in the order of `children`.
        """
        assert len(children) == len(beams) or len(beams) == 1, "a step keeps the beam width"
        root, group = beams[0], beams[0].beam_group_id
        parent_ids = [beam.request_id for beam in beams]  # read before any beam is overwritten
        parent_tokens = [list(beam.output_token_ids) for beam in beams]
        parent_computed = [beam.num_computed_tokens for beam in beams]
        new_beams = list(beams)
        position = self.running.index(beams[-1]) + 1
        while len(new_beams) < len(children):
            beam = Request(
                f"{group}#beam{len(new_beams)}", root.prompt_token_ids, root.params, root.arrival_time,
                status=RequestStatus.RUNNING, first_scheduled_time=root.first_scheduled_time, beam_group_id=group,
            )
            self.requests[beam.request_id] = beam
            self.running.insert(position, beam)
            position += 1
            new_beams.append(beam)
        self.kv_cache_manager.reassign(
            {beam.request_id: parent_ids[child.parent] for beam, child in zip(new_beams, children)}
        )
        now = time.monotonic()
        for beam, child in zip(new_beams, children):
            beam.output_token_ids = list(parent_tokens[child.parent])
            beam.num_computed_tokens = parent_computed[child.parent]
            beam.num_blocks_sent = None  # its tokens and table changed: the runner learns it whole
            beam.append_output(child.token_id, now)
        return new_beams

    def finish_request(self, request_id: str, finish_reason: FinishReason) -> Request | None:
        """Finish a request wherever it is and free its blocks.

        Args:
            request_id: the request.
            finish_reason: why it ended.

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
        self._finished_ids.append(request_id)
        request.drop_placeholders()
        request.status = RequestStatus.FINISHED
        request.finish_reason = finish_reason
        return request
