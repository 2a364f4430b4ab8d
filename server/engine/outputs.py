"""What the engine streams back to the API layer for each request."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class FinishReason(str, Enum):
    """Why a request (or a beam) ended. A str: it compares, formats and serializes as its value ("stop")."""

    STOP = "stop"  # a stop id, stop string, EOS, or a complete response_format JSON
    LENGTH = "length"  # max_tokens, or the model's context
    ABORT = "abort"  # aborted: the client left, or a shutdown ended it
    ERROR = "error"  # its part of a step failed; its stream raises RequestFailedError

    __str__ = str.__str__
    __format__ = str.__format__


@dataclass(slots=True)
class TokenLogprob:
    """Log-probability of one token (generated, or of the prompt) and its most likely alternatives."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)  # alternative token id -> logprob
    rank: int | None = None  # 1 + tokens more likely than it at its position (prompt tokens); None: not computed


@dataclass(slots=True)
class BeamOutput:
    """One returned beam of a beam search request."""

    token_ids: list[int]  # generated tokens (a final stop id included)
    text: str  # their text (stop ids not rendered)
    logprobs: list[TokenLogprob] | None  # one per token, when logprobs were asked for
    finish_reason: FinishReason  # STOP (a stop id) or LENGTH (max_tokens)
    cumulative_logprob: float  # sum of the tokens' logprobs
    score: float  # cumulative_logprob / len(token_ids) ** length_penalty, what the beams were ranked by


@dataclass(slots=True)
class RequestOutput:
    """One increment of a request's output; the last one has finished=True."""

    request_id: str
    new_token_ids: list[int]  # tokens produced since the previous output
    new_text: str  # text that became final since the previous output (stop strings held back and cut)
    new_logprobs: list[TokenLogprob] | None  # one per new token, when logprobs were asked for
    finished: bool
    finish_reason: FinishReason | None  # None while running
    num_prompt_tokens: int
    num_generated_tokens: int
    beams: list[BeamOutput] | None = None  # beam search: the best beams, best first, in the final output only
    # prompt_logprobs: one per prompt token, None for the first (nothing predicts it); in the first output only
    prompt_logprobs: list[TokenLogprob | None] | None = None


def merge_outputs(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One output covering both increments (a consumer that fell behind takes them as one chunk)."""
    logprobs = None
    if earlier.new_logprobs is not None or later.new_logprobs is not None:
        logprobs = (earlier.new_logprobs or []) + (later.new_logprobs or [])
    return RequestOutput(
        request_id=later.request_id,
        new_token_ids=earlier.new_token_ids + later.new_token_ids,
        new_text=earlier.new_text + later.new_text,
        new_logprobs=logprobs,
        finished=later.finished,
        finish_reason=later.finish_reason,
        num_prompt_tokens=later.num_prompt_tokens,
        num_generated_tokens=later.num_generated_tokens,
        beams=later.beams,
        prompt_logprobs=earlier.prompt_logprobs if earlier.prompt_logprobs is not None else later.prompt_logprobs,
    )


@dataclass(slots=True)
class Delivery:
    """What one request's stream receives next."""

    request_id: str  # the request as it was added (a beam search request once, not per beam)
    item: RequestOutput | Exception  # its next output, or the error its stream raises (the request has ended)
