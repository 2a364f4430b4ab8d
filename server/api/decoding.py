"""How a request wants its tokens chosen beyond sampling: beam search, response_format, logit_bias.

Turns those request fields into the engine's parameters (400 naming the parameter when they cannot
work) and a finished beam search output into one output per returned beam, so that beams become
choices like any others:

    one engine request per prompt ──▶ final RequestOutput with beams [b0, b1, ...] (best first)
                                      ──▶ choice prompt_index * n + 0: b0, choice prompt_index * n + 1: b1, ...
"""

from __future__ import annotations

import math

from server.api.errors import InvalidRequestError
from server.api.protocol import ChatCompletionRequest, CompletionRequest, ResponseFormat
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import BeamSearchParams, StructuredOutputParams


def logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    """The request's logit_bias keyed by token id.

    Args:
        bias: token id as a string -> bias (the schema already bounds it to [-100, 100]).
        vocab_size: the model's vocabulary size.

    Returns:
        token id -> bias. Raises InvalidRequestError naming logit_bias for a key that is not a token id.
    """
    result = {}
    for key, value in (bias or {}).items():
        try:
            token_id = int(key)
        except ValueError:
            raise InvalidRequestError(f"'logit_bias' keys must be token ids; got {key!r}", "logit_bias") from None
        if not 0 <= token_id < vocab_size:
            raise InvalidRequestError(
                f"'logit_bias' holds token id {token_id}, outside the vocabulary [0, {vocab_size})", "logit_bias")
        result[token_id] = value
    return result


def num_sequences(request: CompletionRequest | ChatCompletionRequest) -> int:
    """Sequences one prompt of the request runs at once in the engine: the beam width, or 1 when it samples."""
    return (request.best_of or request.n) if request.use_beam_search else 1


def best_of_candidates(request: CompletionRequest | ChatCompletionRequest) -> int | None:
    """Sampled candidates per prompt to rank (best_of > n, completions without beam search), else None.

    Raises InvalidRequestError for best_of < n, best_of > n when streaming (the best are known only at the end)
    and, on chat (which OpenAI gives no best_of), best_of other than n without beam search.
    """
    best_of = request.best_of
    if request.use_beam_search or best_of is None or best_of == request.n:
        return None
    if isinstance(request, ChatCompletionRequest):
        raise InvalidRequestError("'best_of' different from 'n' needs 'use_beam_search': true on chat completions",
                                  "best_of")
    if best_of < request.n:
        raise InvalidRequestError(f"'best_of' ({best_of}) must be at least 'n' ({request.n}): the best n of best_of "
                                  "candidates are returned", "best_of")
    if request.stream:
        raise InvalidRequestError("'best_of' greater than 'n' cannot be streamed (the best candidates are known only "
                                  "when all have finished); set 'stream' to false", "best_of")
    return best_of


def mean_logprob(output: RequestOutput) -> float:
    """A candidate's log probability per generated token (how best_of ranks candidates); -inf without tokens."""
    logprobs = output.new_logprobs or []
    return sum(entry.logprob for entry in logprobs) / len(logprobs) if logprobs else -math.inf


def beam_search(request: CompletionRequest | ChatCompletionRequest) -> BeamSearchParams | None:
    """The request's beam search parameters, or None when it samples.

    Args:
        request: the validated request (use_beam_search, best_of, n, length_penalty, early_stopping, stream).

    Returns:
        BeamSearchParams of width best_of (default n) returning n beams. Raises InvalidRequestError for
        best_of without beam search (unless it equals n), best_of < n, and streaming.
    """
    if not request.use_beam_search:
        best_of_candidates(request)  # checks best_of
        return None
    width = request.best_of or request.n
    if width < request.n:
        raise InvalidRequestError(
            f"'best_of' ({width}) must be at least 'n' ({request.n}): beam search returns the best n of best_of beams",
            "best_of")
    if request.stream:
        raise InvalidRequestError(
            "beam search cannot be streamed (beams are only final when the search ends); set 'stream' to false",
            "stream")
    return BeamSearchParams(num_beams=width, num_return=request.n, length_penalty=request.length_penalty,
                            early_stopping=request.early_stopping)


def structured_output(response_format: ResponseFormat | None) -> StructuredOutputParams | None:
    """The grammar a response_format asks for, or None for free text.

    Args:
        response_format: the request's response_format.

    Returns:
        StructuredOutputParams for json_object / json_schema. Raises InvalidRequestError when
        json_schema is missing.
    """
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return StructuredOutputParams(kind="json_object")
    if response_format.json_schema is None:
        raise InvalidRequestError("'response_format' of type 'json_schema' needs a 'json_schema' object with a "
                                  "'name' and a 'schema'", "response_format")
    schema = response_format.json_schema.schema_
    if schema is None:
        return StructuredOutputParams(kind="json_object")
    return StructuredOutputParams(kind="json_schema", json_schema=schema)


def beam_outputs(output: RequestOutput) -> list[RequestOutput]:
    """A beam search request's final output as one output per returned beam, best first.

    Args:
        output: an engine output of a beam search request.

    Returns:
        One finished output per beam; the output itself when it has no beams (ended early: abort, error).
    """
    if not output.beams:
        return [output]
    return [
        RequestOutput(
            request_id=output.request_id, new_token_ids=beam.token_ids, new_text=beam.text, new_logprobs=beam.logprobs,
            finished=True, finish_reason=beam.finish_reason, num_prompt_tokens=output.num_prompt_tokens,
            num_generated_tokens=len(beam.token_ids),
        )
        for beam in output.beams
    ]
