"""The messages between the API process and the engine core process (multiprocessing Pipe connections).

    API process                                      engine core process
    AddRequest / AbortRequest / Shutdown  ──────────▶  reader thread ─▶ inbox ─▶ core loop
    Ready | LoadFailed, then per step:    ◀──────────  StepOutputs (every output of the step), EngineDied

A StepOutputs carries a step's outputs as plain tuples, which pickle several times faster than the
dataclasses they stand for (the encode/decode pairs below are the only code that knows their layout):

    output:  (request_id, new_token_ids, new_text, logprobs, finished, finish_reason,
              num_prompt_tokens, num_generated_tokens, beams, prompt_logprobs)
             logprobs: [(token_id, logprob, {token_id: logprob}, rank)] or None
             prompt_logprobs: [None, (token_id, logprob, {token_id: logprob}, rank), ...] or None
             beams:    [(token_ids, text, logprobs, finish_reason, cumulative_logprob, score)] or None
    error:   (request_id, kind, message, param)   kind: "invalid" (InvalidRequest, param its parameter),
             "queue_timeout", "failed"
"""

from __future__ import annotations

from typing import NamedTuple

from server.engine.errors import InvalidRequest, QueueTimeoutError, RequestFailedError
from server.engine.outputs import BeamOutput, Delivery, RequestOutput, TokenLogprob
from server.engine.request_limits import RequestLimits
from server.engine.sampling_params import SamplingParams

# ---------------------------------------------------------------------------------- API -> engine core


class AddRequest(NamedTuple):
    """Queue a new request."""

    request_id: str  # unique among the API process's open streams
    prompt_token_ids: list[int]  # the tokenized prompt
    params: SamplingParams  # validated by the engine core when it adds the request (an InvalidRequest comes back)
    arrival_time: float  # time.monotonic() in the API process (CLOCK_MONOTONIC: the same clock in every process)


class AbortRequest(NamedTuple):
    """End a request with finish_reason "abort" (client gone, abort() or a drain that timed out)."""

    request_id: str  # unknown ids (already finished) are ignored


class Shutdown(NamedTuple):
    """Stop after the step in flight, abort what is left, send its outputs and exit."""


# ---------------------------------------------------------------------------------- engine core -> API


class Ready(NamedTuple):
    """The engine is loaded and its KV cache allocated: what the API process needs to know about it."""

    limits: RequestLimits  # max_model_len, KV pool, vocabulary...: every request is checked against them first
    device: str  # e.g. "cuda:0", for the start-up log
    dtype: str  # e.g. "bfloat16", for the start-up log


class LoadFailed(NamedTuple):
    """The engine could not be loaded; the process exits."""

    kind: str  # "value" (ValueError: a bad model or option), "os" (OSError), "other" (a bug; the child logged it)
    message: str


class StepOutputs(NamedTuple):
    """Everything one iteration of the core loop (inputs applied, one step) produced."""

    outputs: list[tuple]  # encoded RequestOutputs, in delivery order
    errors: list[tuple]  # encoded errors; each ends its request, so they follow the outputs
    records: list[tuple[str, tuple]]  # StatsRecorder records to replay into the API process's stats sink
    num_unfinished_requests: int  # requests in the engine (waiting or running) after the step


class EngineDied(NamedTuple):
    """The engine is dead (steps kept failing, or the core loop crashed); the process exits."""

    reason: str


# ---------------------------------------------------------------------------------- deliveries


def encode_deliveries(deliveries: list[Delivery]) -> tuple[list[tuple], list[tuple]]:
    """Deliveries as (outputs, errors) of plain tuples (see the module docstring)."""
    outputs, errors = [], []
    for delivery in deliveries:
        item = delivery.item
        if isinstance(item, RequestOutput):
            outputs.append(_encode_output(item))
        else:
            errors.append(_encode_error(delivery.request_id, item))
    return outputs, errors


def decode_deliveries(outputs: list[tuple], errors: list[tuple]) -> list[Delivery]:
    """The deliveries encode_deliveries encoded (errors after outputs)."""
    deliveries = [Delivery(values[0], _decode_output(values)) for values in outputs]
    deliveries += [Delivery(request_id, _decode_error(kind, message, param))
                   for request_id, kind, message, param in errors]
    return deliveries


def _encode_output(output: RequestOutput) -> tuple:
    beams = None
    if output.beams is not None:
        beams = [(beam.token_ids, beam.text, _encode_logprobs(beam.logprobs), beam.finish_reason,
                  beam.cumulative_logprob, beam.score) for beam in output.beams]
    return (output.request_id, output.new_token_ids, output.new_text, _encode_logprobs(output.new_logprobs),
            output.finished, output.finish_reason, output.num_prompt_tokens, output.num_generated_tokens, beams,
            _encode_prompt_logprobs(output.prompt_logprobs))


def _decode_output(values: tuple) -> RequestOutput:
    (request_id, new_token_ids, new_text, logprobs, finished, finish_reason, num_prompt_tokens, num_generated_tokens,
     beams, prompt_logprobs) = values
    return RequestOutput(
        request_id=request_id, new_token_ids=new_token_ids, new_text=new_text,
        new_logprobs=_decode_logprobs(logprobs), finished=finished, finish_reason=finish_reason,
        num_prompt_tokens=num_prompt_tokens, num_generated_tokens=num_generated_tokens,
        beams=None if beams is None else [
            BeamOutput(token_ids=token_ids, text=text, logprobs=_decode_logprobs(beam_logprobs),
                       finish_reason=reason, cumulative_logprob=cumulative_logprob, score=score)
            for token_ids, text, beam_logprobs, reason, cumulative_logprob, score in beams
        ],
        prompt_logprobs=_decode_prompt_logprobs(prompt_logprobs),
    )


def _encode_logprobs(logprobs: list[TokenLogprob] | None) -> list[tuple] | None:
    if logprobs is None:
        return None
    return [(item.token_id, item.logprob, item.top, item.rank) for item in logprobs]


def _decode_logprobs(values: list[tuple] | None) -> list[TokenLogprob] | None:
    if values is None:
        return None
    return [TokenLogprob(token_id=token_id, logprob=logprob, top=top, rank=rank)
            for token_id, logprob, top, rank in values]


def _encode_prompt_logprobs(logprobs: list[TokenLogprob | None] | None) -> list[tuple | None] | None:
    if logprobs is None:
        return None
    return [None if item is None else (item.token_id, item.logprob, item.top, item.rank) for item in logprobs]


def _decode_prompt_logprobs(values: list[tuple | None] | None) -> list[TokenLogprob | None] | None:
    if values is None:
        return None
    return [None if item is None else TokenLogprob(token_id=item[0], logprob=item[1], top=item[2], rank=item[3])
            for item in values]


def _encode_error(request_id: str, error: Exception) -> tuple[str, str, str, str | None]:
    """An error as (request_id, kind, message, param); anything but a user error or a queue timeout is "failed"."""
    if isinstance(error, QueueTimeoutError):
        return request_id, "queue_timeout", str(error), None
    if isinstance(error, RequestFailedError):
        return request_id, "failed", str(error), None
    if isinstance(error, InvalidRequest):
        return request_id, "invalid", str(error), error.param
    return request_id, "failed", f"request {request_id!r} failed: {type(error).__name__}: {error}", None


def _decode_error(kind: str, message: str, param: str | None) -> Exception:
    if kind == "invalid":
        return InvalidRequest(message, param)
    if kind == "queue_timeout":
        return QueueTimeoutError(message)
    return RequestFailedError(message)
