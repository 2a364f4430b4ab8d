"""The synchronous engine: one `step()` is fetch -> schedule -> forward -> sample -> update -> respond.

No asyncio here (core_loop.py runs it; core_client.py is its asyncio side): everything is called from one
thread at a time, which makes it easy to test step by step.

Async scheduling (EngineConfig.async_scheduling) overlaps the host's work with the GPU's. A step is
launched (its kernels and the copy of its tokens queued) and the next step is planned and launched
before the host waits for the first one's tokens; the tokens of step N are detokenized and returned
while the GPU runs step N+1:

    host:  plan N+1 | launch N+1 | wait N, detokenize N, outputs N | plan N+2 | launch N+2 | wait N+1 ...
    GPU:   ......... step N ..........|............ step N+1 ...................|...

Step N+1 feeds each request the token step N sampled straight from the device (a placeholder on the
host until it is resolved). A request that stops at step N has been given one step too many; that
token is dropped. Requests that need their tokens on the host before the next step is planned
(beam search, structured output, penalties over the output so far) switch the engine to plain
steps while any of them is unfinished.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from server.engine.core.beam_search import BeamSearch
from server.engine.core.detokenizer import DetokenizerUpdate, IncrementalDetokenizer
from server.engine.core.kv_cache_manager import KVCacheManager
from server.engine.core.request import Request
from server.engine.core.scheduler import Scheduler
from server.engine.core.scheduler_output import SchedulerOutput
from server.engine.core.structured_output import StructuredOutputManager
from server.engine.engine_config import EngineConfig
from server.engine.outputs import BeamOutput, FinishReason, RequestOutput, TokenLogprob
from server.engine.request_limits import RequestLimits
from server.engine.sampling_params import SamplingParams
from server.engine.stats import FinishedRequestStats, StatsSink, StepStats
from server.engine.step_plan import BeamCandidates, RunnerOutput
from server.runner.executor import Executor, UniprocExecutor, build_runner
from server.runner.kv_sizing import num_host_kv_blocks

logger = logging.getLogger(__name__)


class StepError(RuntimeError):
    """A step raised; `request_ids` are the requests it included (their state is unreliable)."""

    def __init__(self, request_ids: list[str], cause: BaseException):
        super().__init__(f"engine step failed: {type(cause).__name__}: {cause}")
        self.request_ids = request_ids


@dataclass(slots=True)
class _LaunchedStep:
    """Async scheduling: a step whose tokens have not reached the host yet."""

    scheduled: SchedulerOutput  # its plan (the executor holds its results until collected, in launch order)
    start: float  # time.monotonic() when it was planned


@dataclass(slots=True)
class _BeamGroup:
    """A beam search request inside the engine: its ranking state and its beams (scheduled requests)."""

    search: BeamSearch  # which beams continue, and the finished ones
    beams: list[Request]  # its running beams, in the order of search.beams
    pending: dict[str, BeamCandidates] = field(default_factory=dict)  # beam id -> its row, until all beams have one


class EngineCore:
    """Scheduler, KV cache, executor and detokenizers of one engine, stepped synchronously."""

    def __init__(self, engine: Any, config: EngineConfig, metrics: StatsSink | None = None,
                 executor: Executor | None = None):
        """Size and allocate the KV cache and set up scheduling.

        Args:
            engine: an engine_builder.loader.Engine (under tensor parallelism: rank 0's shard of it).
            config: batching and KV cache settings.
            metrics: where to report; None reports nothing.
            executor: what runs the model (a tensor-parallel one, started already); None runs it in this thread.
        """
        config.validate()
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.max_model_len = engine.limits.max_seq_len
        max_num_seqs = min(config.max_num_seqs, engine.limits.max_batch_size)
        self.executor: Executor = executor or UniprocExecutor(build_runner(engine, config, max_num_seqs))
        self.num_kv_blocks = self.executor.num_kv_blocks
        num_host_blocks = num_host_kv_blocks(engine, config) if config.enable_prefix_caching else 0
        self.kv_cache_manager = KVCacheManager(self.num_kv_blocks, config.block_size, config.enable_prefix_caching,
                                               num_host_blocks)
        self._host_block_bytes = engine.kv_cache_spec.bytes_per_block(config.block_size)
        logger.info("prefix caching: %s%s", "on" if config.enable_prefix_caching else "off",
                    f"; host KV tier: {num_host_blocks} blocks" if num_host_blocks else "")
        self.scheduler = Scheduler(
            self.kv_cache_manager,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=min(config.max_num_batched_tokens, engine.limits.max_num_tokens),
            max_model_len=self.max_model_len,
        )
        self.eos_token_ids = list(engine.eos_token_ids)
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._beam_groups: dict[str, _BeamGroup] = {}  # beam search request id -> its state
        self._sync_request_ids: set[str] = set()  # unfinished requests that need plain steps (needs_host_tokens)
        self._launched: _LaunchedStep | None = None  # async scheduling: the step whose tokens are on their way
        self._last_collected = 0.0  # time.monotonic() when the last launched step was collected
        self.structured_output = StructuredOutputManager(
            engine.tokenizer, engine.config.vocab_size, self.eos_token_ids
        )
        self.limits = RequestLimits(  # what every request must fit (the API process checks them before sending one)
            vocab_size=engine.config.vocab_size, max_model_len=self.max_model_len,
            max_num_seqs=self.scheduler.max_num_seqs, num_kv_blocks=self.num_kv_blocks,
            block_size=config.block_size, eos_token_ids=tuple(self.eos_token_ids),
            has_tokenizer=engine.tokenizer is not None,
        )

    @property
    def has_unfinished_requests(self) -> bool:
        """True while a request is unfinished or a launched step's tokens are still to be collected."""
        return self.scheduler.has_unfinished_requests or self._launched is not None

    @property
    def request_ids(self) -> list[str]:
        """Ids of the unfinished requests as they were added (a beam search request once, not per beam)."""
        return list(dict.fromkeys(r.beam_group_id or r.request_id for r in self.scheduler.requests.values()))

    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError (naming the parameter) if the request is malformed or could never fit.

        Args:
            prompt_token_ids: the prompt.
            params: its sampling parameters.
        """
        self.limits.check(prompt_token_ids, params)
        if params.structured_output is not None:
            self.structured_output.compile(params.structured_output)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival_time: float | None = None
    ) -> None:
        """Validate and queue a request.

        Args:
            request_id: unique among unfinished requests.
            prompt_token_ids: the prompt.
            params: sampling parameters.
            arrival_time: time.monotonic() when it arrived (now if None).
        """
        self.validate_request(prompt_token_ids, params)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        if request_id in self._beam_groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        group_id = request_id if params.beam_search is not None else None
        request = Request(request_id, list(prompt_token_ids), params, arrival, beam_group_id=group_id)
        self.scheduler.add_request(request)
        if params.needs_host_tokens:
            self._sync_request_ids.add(request_id)
        if params.beam_search is not None:
            stop_ids = params.stop_ids(self.eos_token_ids)
            max_tokens = min(params.max_tokens, self.max_model_len - request.num_prompt_tokens)
            search = BeamSearch(params.beam_search, max_tokens, stop_ids, params.logprobs)
            self._beam_groups[request_id] = _BeamGroup(search=search, beams=[request])
            return
        self._detokenizers[request_id] = IncrementalDetokenizer(
            self.engine.tokenizer, request.prompt_token_ids, params, self.eos_token_ids, self.max_model_len
        )
        if params.structured_output is not None:
            self.structured_output.add_request(request_id, params.structured_output)

    def abort_request(self, request_id: str, finish_reason: FinishReason = FinishReason.ABORT) -> RequestOutput | None:
        """End a request now and free its blocks.

        Args:
            request_id: the request.
            finish_reason: "abort", or "error" for a request whose step failed.

        Returns:
            Its final output (finished=True), or None if no unfinished request has that id.
        """
        beam = self.scheduler.requests.get(request_id)
        if beam is not None and beam.beam_group_id is not None:
            request_id = beam.beam_group_id  # a beam is ended with its whole request
        if request_id in self._beam_groups:
            output = self._finish_beam_group(request_id, finish_reason)
            self._record_state()
            return output
        detokenizer = self._detokenizers.get(request_id)
        request = self._finish(request_id, finish_reason)
        if request is None:
            return None
        self._record_state()
        text = detokenizer.finish() if detokenizer is not None and finish_reason is FinishReason.ABORT else ""
        return self._output(request, [], text, None)

    def step(self) -> list[RequestOutput]:
        """Run one step of every scheduled request (with async scheduling: launch one, collect the one before).

        Returns:
            One RequestOutput per request that got a new token (finished ones last for them).
            Raises StepError, naming the step's requests, if the forward pass or sampling raised.
        """
        if not self.config.async_scheduling or self._sync_request_ids:
            if self._launched is not None:  # a plain step plans with every token on the host
                return self._collect(self._take_launched())
            return self._step_in_sync()
        return self._step_overlapped()

    def _step_error(self, scheduled: SchedulerOutput, error: BaseException) -> StepError:
        """The StepError of a step that raised; the host tier's copies it planned may not exist, so none is used."""
        self.kv_cache_manager.forget_host_copies()
        return StepError(_request_ids_of(scheduled), error)

    def _take_launched(self) -> _LaunchedStep:
        launched, self._launched = self._launched, None
        assert launched is not None, "called only while a launched step is on its way"
        return launched

    def _step_overlapped(self) -> list[RequestOutput]:
        """Plan and launch the next step, then collect the previous one while the GPU runs it."""
        start = time.monotonic()
        scheduled = self.scheduler.schedule()
        previous = self._launched
        if not scheduled.is_empty:
            try:
                self.executor.launch(scheduled.plan)
            except Exception as error:  # the previous step is still collected by the next call
                raise self._step_error(scheduled, error) from error
            self.scheduler.advance_with_placeholders(scheduled)
            self._launched = _LaunchedStep(scheduled, start)
        elif previous is not None:
            self._launched = None
        return [] if previous is None else self._collect(previous)

    def _collect(self, step: _LaunchedStep) -> list[RequestOutput]:
        """Wait for a launched step's tokens, resolve its placeholders and process them."""
        scheduled = step.scheduled
        previous_token_times = {r.request_id: r.last_token_time for r in scheduled.sampled_requests}
        try:
            result = self.executor.collect()
        except Exception as error:
            raise self._step_error(scheduled, error) from error
        updated = self.scheduler.resolve_placeholders(scheduled, result.sampled_token_ids)
        self.scheduler.cache_written_blocks(scheduled)
        # Its step latency runs from when it was planned or the previous step was collected, whichever is later
        # (planned steps overlap; consecutive latencies add up to the wall time).
        start = max(step.start, self._last_collected)
        outputs = self._process_step(scheduled, result, updated, previous_token_times, start)
        self._last_collected = time.monotonic()
        return outputs

    def _step_in_sync(self) -> list[RequestOutput]:
        """Plan, run and process one step, waiting for its tokens before anything else."""
        start = time.monotonic()
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            return []
        for request_id in scheduled.preempted_ids:  # a preempted beam's row is computed again
            request = self.scheduler.requests[request_id]
            if request.beam_group_id is not None:
                self._beam_groups[request.beam_group_id].pending.pop(request_id, None)
        sampled = scheduled.sampled_requests
        plan = scheduled.plan
        plan.grammar_request_ids = [r.request_id for r in sampled if self.structured_output.has_request(r.request_id)]
        previous_token_times = {r.request_id: r.last_token_time for r in sampled}
        grammar_failures: dict[str, Exception] = {}  # requests whose grammar failed: they end after this step
        try:  # a failure from here to the sampled tokens fails this step's requests only
            if plan.grammar_request_ids:
                plan.grammar_bitmask, grammar_failures = self.structured_output.bitmask(plan.grammar_request_ids)
            result = self.executor.execute(plan)
        except Exception as error:
            raise self._step_error(scheduled, error) from error
        updated = self.scheduler.update_from_output(scheduled, result.sampled_token_ids)
        self.scheduler.cache_written_blocks(scheduled)
        return self._process_step(scheduled, result, updated, previous_token_times, start, grammar_failures)

    def _process_step(
        self, scheduled: SchedulerOutput, result: RunnerOutput, updated: list[Request],
        previous_token_times: dict[str, float | None], start: float, failures: dict[str, Exception] | None = None,
    ) -> list[RequestOutput]:
        """Detokenize the step's new tokens, advance beam searches, record metrics; returns the outputs.

        `failures` are requests whose part of the step failed before their token (their grammar): they end with
        finish_reason "error", as a failure while processing their token would end them.
        """
        for request_id, chunk in result.prompt_logprobs.items():
            scored = self.scheduler.requests.get(request_id)
            if scored is not None:  # still unfinished
                scored.record_prompt_logprobs(chunk)
        first_token_seconds: list[float] = []
        inter_token_seconds: list[float] = []
        outputs = []
        for request in updated:
            previous = previous_token_times.get(request.request_id)
            if request.num_known_output_tokens == 1:
                assert request.first_token_time is not None  # set with its first token
                first_token_seconds.append(request.first_token_time - request.arrival_time)
            elif previous is not None:
                assert request.last_token_time is not None  # set with every token, and it had one before
                inter_token_seconds.append(request.last_token_time - previous)
            outputs.append(self._process_token_or_fail(request, result, (failures or {}).get(request.request_id)))
        outputs.extend(self._advance_beams(result.beam_candidates, result.nonfinite_request_ids))
        if self.metrics is not None:
            self.metrics.record_step(
                StepStats(
                    step_seconds=time.monotonic() - start,
                    num_batched_tokens=scheduled.num_batched_tokens,
                    num_running=self.scheduler.num_running,
                    num_waiting=self.scheduler.num_waiting,
                    num_used_blocks=self.kv_cache_manager.num_used_blocks,
                    num_free_blocks=self.kv_cache_manager.num_free_blocks,
                    num_preemptions=len(scheduled.preempted_ids),
                    num_prompt_tokens=sum(r.num_prompt_tokens for r in updated if r.num_known_output_tokens == 1),
                    num_generation_tokens=len(updated),
                    time_to_first_token_seconds=first_token_seconds,
                    inter_token_latency_seconds=inter_token_seconds,
                    num_prefix_queries=scheduled.num_prefix_queries,
                    num_prefix_hits=scheduled.num_prefix_hits,
                    num_cached_blocks=self.kv_cache_manager.num_cached_blocks,
                    num_offload_bytes=self.kv_cache_manager.num_host_blocks_used * self._host_block_bytes,
                    num_blocks_offloaded=sum(t.to_host for t in scheduled.plan.kv_transfers),
                    num_blocks_restored=sum(not t.to_host for t in scheduled.plan.kv_transfers),
                )
            )
        return outputs

    def _process_token_or_fail(self, request: Request, result: RunnerOutput,
                               failure: Exception | None = None) -> RequestOutput:
        """`_process_token`, isolated: if it raises (or the token's logprob is not finite, or an earlier part of the
        step failed for this request: `failure`), only this request ends.

        Returns:
            The request's output; a failed request's is finished with finish_reason "error" (the cause is logged).
        """
        try:
            if failure is not None:
                raise failure
            if request.request_id in result.nonfinite_request_ids:
                raise FloatingPointError("the model's logits for this request held NaN or +inf; its token is noise")
            for logprob in result.logprobs.get(request.request_id, ()):
                if not math.isfinite(logprob.logprob):
                    raise FloatingPointError(f"sampling produced a non-finite logprob ({logprob.logprob}) "
                                             f"for token {logprob.token_id}")
            return self._process_token(request, result)
        except Exception:
            logger.exception(
                "request %r failed while processing its token %s; ending it with finish_reason "
                "\"error\" (the other requests continue)",
                request.request_id,
                request.output_token_ids[-1:],
            )
            output = self.abort_request(request.request_id, finish_reason=FinishReason.ERROR)
            return output if output is not None else self._output(request, [], "", None)

    def _process_token(self, request: Request, result: RunnerOutput) -> RequestOutput:
        """Detokenize a request's new tokens, finish it if it stopped (dropping what follows), build its output."""
        tokens = result.sampled_token_ids[request.request_id]
        detokenizer = self._detokenizers[request.request_id]
        texts, kept, finish_reason = [], [], None
        for token in tokens:
            update = detokenizer.add_token(token)
            if update.finish_reason is not FinishReason.STOP and self.structured_output.has_request(
                    request.request_id) and self.structured_output.accept(request.request_id, token):
                update = DetokenizerUpdate(new_text=update.new_text + detokenizer.finish(),
                                           finish_reason=FinishReason.STOP)  # the JSON is complete
            texts.append(update.new_text)
            kept.append(token)
            if update.finish_reason is not None:
                finish_reason = update.finish_reason
                break
        if finish_reason is not None:
            self._finish(request.request_id, finish_reason)
        logprobs = result.logprobs.get(request.request_id)
        return self._output(request, kept, "".join(texts), None if logprobs is None else logprobs[:len(kept)])

    def _advance_beams(
        self, candidates: dict[str, BeamCandidates], nonfinite_request_ids: set[str]
    ) -> list[RequestOutput]:
        """Record the beam rows of this step; continue (or finish) each beam search whose rows are all in.

        A beam whose logits held NaN or +inf ends its whole request with finish_reason "error" (ranking
        noise would return meaningless beams).

        Returns:
            The final outputs of the beam search requests that finished.
        """
        ready: dict[str, _BeamGroup] = {}
        failed: dict[str, RequestOutput] = {}
        group_of: dict[str, str] = {}
        for request_id in candidates:
            group_id = self.scheduler.requests[request_id].beam_group_id
            assert group_id is not None, f"beam candidates for {request_id!r}, which is not a beam"
            group_of[request_id] = group_id
        for request_id, row in candidates.items():
            group_id = group_of[request_id]
            if group_id in failed:
                continue
            if request_id in nonfinite_request_ids:
                logger.error("beam search request %r: logits of beam %r held NaN or +inf; ending it with "
                             "finish_reason \"error\"", group_id, request_id)
                ready.pop(group_id, None)
                failed[group_id] = self._finish_beam_group(group_id, FinishReason.ERROR)
                continue
            group = self._beam_groups[group_id]
            group.pending[request_id] = row
            if len(group.pending) == len(group.beams):
                ready[group_id] = group
        outputs = []
        for group_id, group in ready.items():
            try:
                children = group.search.step([group.pending[beam.request_id] for beam in group.beams])
                group.pending.clear()
                if children:
                    group.beams = self.scheduler.continue_beams(group.beams, children)
                else:
                    outputs.append(self._finish_beam_group(group_id, None))
            except Exception:  # ranking, continuing or decoding this search failed: it ends alone
                logger.exception("beam search request %r failed; ending it with finish_reason \"error\" (the other "
                                 "requests continue)", group_id)
                if group_id in self._beam_groups:
                    outputs.append(self._finish_beam_group(group_id, FinishReason.ERROR))
        return outputs + list(failed.values())

    def _finish_beam_group(self, group_id: str, finish_reason: FinishReason | None) -> RequestOutput:
        """End a beam search request: free every beam's blocks and build its final output.

        Args:
            group_id: the request.
            finish_reason: "abort" or "error" to end it early; None when its search is done.

        Returns:
            Its final output, with the best beams when the search is done.
        """
        group = self._beam_groups.pop(group_id)
        self._sync_request_ids.discard(group_id)
        root = group.beams[0]
        beams = [] if finish_reason is not None else self._beam_outputs(root, group.search)
        reason = finish_reason or beams[0].finish_reason
        for beam in group.beams:
            self.scheduler.finish_request(beam.request_id, reason)
        num_generated = sum(len(beam.token_ids) for beam in beams)
        if self.metrics is not None:
            queued = root.first_scheduled_time
            self.metrics.record_finished(
                FinishedRequestStats(
                    finish_reason=reason,
                    e2e_latency_seconds=time.monotonic() - root.arrival_time,
                    queue_time_seconds=None if queued is None else queued - root.arrival_time,
                    num_prompt_tokens=root.num_prompt_tokens,
                    num_generation_tokens=num_generated,
                )
            )
        return RequestOutput(
            request_id=group_id, new_token_ids=[], new_text="", new_logprobs=None, finished=True,
            finish_reason=reason, num_prompt_tokens=root.num_prompt_tokens, num_generated_tokens=num_generated,
            beams=beams,
        )

    def _beam_outputs(self, root: Request, search: BeamSearch) -> list[BeamOutput]:
        """The returned beams with their text (decoded as a stream of them would be)."""
        outputs = []
        for beam in search.best():
            detokenizer = IncrementalDetokenizer(
                self.engine.tokenizer, root.prompt_token_ids, root.params, self.eos_token_ids, self.max_model_len
            )
            text = "".join(detokenizer.add_token(token).new_text for token in beam.token_ids) + detokenizer.finish()
            outputs.append(
                BeamOutput(
                    token_ids=beam.token_ids,
                    text=text,
                    logprobs=beam.logprobs if root.params.logprobs is not None else None,
                    finish_reason=beam.finish_reason,
                    cumulative_logprob=beam.cumulative_logprob,
                    score=beam.score,
                )
            )
        return outputs

    def _finish(self, request_id: str, finish_reason: FinishReason) -> Request | None:
        request = self.scheduler.finish_request(request_id, finish_reason)
        self._sync_request_ids.discard(request_id)
        self._detokenizers.pop(request_id, None)
        self.structured_output.remove_request(request_id)
        if request is not None and self.metrics is not None:
            now = time.monotonic()
            queued = request.first_scheduled_time
            self.metrics.record_finished(
                FinishedRequestStats(
                    finish_reason=finish_reason,
                    e2e_latency_seconds=now - request.arrival_time,
                    queue_time_seconds=None if queued is None else queued - request.arrival_time,
                    num_prompt_tokens=request.num_prompt_tokens,
                    num_generation_tokens=request.num_output_tokens,
                )
            )
        return request

    def _record_state(self) -> None:
        if self.metrics is not None:
            self.metrics.record_state(
                self.scheduler.num_running,
                self.scheduler.num_waiting,
                self.kv_cache_manager.num_used_blocks,
                self.kv_cache_manager.num_free_blocks,
            )

    @staticmethod
    def _output(
        request: Request, new_token_ids: list[int], new_text: str, new_logprobs: list[TokenLogprob] | None
    ) -> RequestOutput:
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=new_token_ids,
            new_text=new_text,
            new_logprobs=new_logprobs,
            finished=request.is_finished,
            finish_reason=request.finish_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_generated_tokens=request.num_known_output_tokens,
            prompt_logprobs=request.take_prompt_logprobs(),
        )


def _request_ids_of(scheduled: SchedulerOutput) -> list[str]:
    """The unfinished requests of a step as the API knows them (a beam search request once). With async
    scheduling a launched step can hold requests that have finished since (stopped, aborted)."""
    return list(dict.fromkeys(request.beam_group_id or request.request_id for request in scheduled.requests
                              if not request.is_finished))
