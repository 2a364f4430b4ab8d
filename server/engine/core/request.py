"""The engine's state of one request: its tokens, how far its KV cache has caught up, and its timing.

A request's tokens are its prompt followed by what it has generated so far. Scheduling is one rule:
each step, `num_computed_tokens` (tokens whose K/V are in the cache) catches up with `num_tokens`.

    tokens:   | prompt ............ | output ... |
    computed: |=========>                          a prompt chunk is still to be prefilled
    computed: |==================================> | caught up except the last sampled token (decode)

A beam search request runs as several requests, its beams, sharing a `beam_group_id` (see beam_search.py).

After a preemption `num_computed_tokens` goes back to 0 and the output so far is recomputed as if it
were part of the prompt; the generated tokens themselves are kept.

With async scheduling (engine_core.py) the next step is planned before the host knows the token the
current step samples: the request gets a PLACEHOLDER output token at launch, which the runner feeds
from the device, and which `resolve_placeholder` replaces with the real token once it is on the host.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from server.engine.outputs import FinishReason, TokenLogprob
from server.engine.sampling_params import SamplingParams
from server.engine.step_plan import PLACEHOLDER, PromptLogprobsChunk, token_slice


class RequestStatus(enum.Enum):
    """Where a request is in its life."""

    WAITING = "waiting"  # queued, holds no KV blocks (new or preempted)
    RUNNING = "running"  # admitted, holds KV blocks
    FINISHED = "finished"  # done; `finish_reason` says why


@dataclass(slots=True, eq=False)
class Request:
    """One request as the scheduler and runner see it."""

    request_id: str  # unique among live requests
    prompt_token_ids: list[int]  # the prompt, never changed
    params: SamplingParams  # how to sample and when to stop
    arrival_time: float  # time.monotonic() when the engine received it
    output_token_ids: list[int] = field(default_factory=list)  # generated so far, in order
    num_computed_tokens: int = 0  # leading tokens whose K/V are in the cache
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None  # once finished
    num_preemptions: int = 0  # times its blocks were taken back and its tokens recomputed
    first_scheduled_time: float | None = None  # first time it was given a step (ends its queue time)
    first_token_time: float | None = None  # when its first output token was sampled
    last_token_time: float | None = None  # when its latest output token was sampled
    beam_group_id: str | None = None  # the beam search request this is a beam of; None for ordinary requests
    num_placeholders: int = 0  # trailing output tokens still PLACEHOLDER (async scheduling: at most 2)
    num_blocks_sent: int | None = None  # blocks of its table the runner holds; None: send it whole (step_plan.py)
    # prompt_logprobs asked: the prompt tokens scored so far (None for the first), until its first output takes them
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_sent: bool = False  # its first output carried them

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_known_output_tokens(self) -> int:
        """Output tokens the host knows (placeholders not counted)."""
        return len(self.output_token_ids) - self.num_placeholders

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def max_num_tokens(self) -> int:
        """Tokens it can reach: prompt plus max_tokens."""
        return len(self.prompt_token_ids) + self.params.max_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens not yet in the KV cache (a prompt chunk, or the last sampled token)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output (end at most num_tokens), without copying the whole sequence."""
        return token_slice(self.prompt_token_ids, self.output_token_ids, start, end)

    def append_output(self, token_id: int, now: float) -> None:
        """Record a newly sampled token.

        Args:
            token_id: the token.
            now: time.monotonic() when it was sampled.
        """
        self.output_token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now

    def append_placeholder(self) -> None:
        """Record that a token was sampled on the device (its value is filled in by resolve_placeholder)."""
        self.output_token_ids.append(PLACEHOLDER)
        self.num_placeholders += 1

    def resolve_placeholder(self, token_id: int, now: float) -> None:
        """Replace the oldest placeholder with the token it stood for.

        Args:
            token_id: the sampled token, now on the host.
            now: time.monotonic() when it arrived.
        """
        assert self.num_placeholders > 0, f"request {self.request_id!r} has no placeholder to resolve"
        self.output_token_ids[len(self.output_token_ids) - self.num_placeholders] = token_id
        self.num_placeholders -= 1
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now

    def record_prompt_logprobs(self, chunk: PromptLogprobsChunk) -> None:
        """Keep a prompt chunk's token logprobs (a chunk computed again after a preemption replaces its own)."""
        scored = self.prompt_logprobs
        if scored is None:
            scored = self.prompt_logprobs = self._unscored_prompt()
        scored[chunk.first_token : chunk.first_token + len(chunk.logprobs)] = chunk.logprobs

    def take_prompt_logprobs(self) -> list[TokenLogprob | None] | None:
        """The prompt logprobs for its next output: all of them the first time (if it asked), else None."""
        if self.params.prompt_logprobs is None or self.prompt_logprobs_sent:
            return None
        self.prompt_logprobs_sent = True
        return self.prompt_logprobs if self.prompt_logprobs is not None else self._unscored_prompt()

    def _unscored_prompt(self) -> list[TokenLogprob | None]:
        return [None] * self.num_prompt_tokens

    def drop_placeholders(self) -> None:
        """Forget tokens still on the device (the request finished before they were needed)."""
        if self.num_placeholders:
            del self.output_token_ids[-self.num_placeholders :]
            self.num_placeholders = 0
