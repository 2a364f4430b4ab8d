"""Choices: one engine request per choice, their outputs merged into one stream, and what a response needs of them.

A request with `n` choices (and, for completions, several prompts) becomes one engine request per
choice, `f"{request_id}-{index}"`. Their outputs are merged into one stream of `ChoiceOutput`s; each
engine request is consumed by its own task, so that cancelling the merged stream (client gone) cancels
those tasks and the engine aborts the requests.

    prompt 0: choice 0 -> "<id>-0" ─┐
              choice 1 -> "<id>-1" ─┼─ queue ─▶ merged ChoiceOutput stream ─▶ response / SSE chunks
    prompt 1: choice 2 -> "<id>-2" ─┘

Beam search returns its beams as choices at the end (beam_choices); best_of > n ranks sampled candidates once they
have all finished (best_of_choices).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TypeVar

from server.api import decoding
from server.api.protocol import APIFinishReason, UsageInfo
from server.engine.outputs import FinishReason, RequestOutput, TokenLogprob, merge_outputs

T = TypeVar("T")


@dataclass(slots=True)
class ChoiceOutput:
    """One engine output, tagged with the response choice it belongs to."""

    index: int  # choice index in the response: prompt_index * n + choice number
    output: RequestOutput


@dataclass(slots=True)
class ChoiceResult:
    """Everything one choice produced, accumulated for a non-streamed response."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: APIFinishReason | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token, when the request scored its prompt

    def add(self, output: RequestOutput) -> None:
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        self.text += output.new_text
        self.token_ids.extend(output.new_token_ids)
        self.logprobs.extend(output.new_logprobs or [])
        self.num_prompt_tokens = output.num_prompt_tokens
        self.num_generated_tokens = output.num_generated_tokens
        if output.finished:
            self.finish_reason = finish_reason(output)


_API_FINISH_REASONS: dict[FinishReason, APIFinishReason] = {
    FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.ABORT: "abort",
}


def finish_reason(output: RequestOutput) -> APIFinishReason:
    """The finish_reason of a finished output: "stop", "length", or "abort" (ended by a shutdown's drain)."""
    reason = FinishReason(output.finish_reason)
    assert reason in _API_FINISH_REASONS, reason
    return _API_FINISH_REASONS[reason]


def usage_of(results: list[ChoiceResult], num_prompts: int, n: int) -> UsageInfo:
    """Usage of a request: each prompt counted once (not once per choice), every choice's tokens."""
    prompt_tokens = sum(results[prompt * n].num_prompt_tokens for prompt in range(num_prompts))
    completion_tokens = sum(result.num_generated_tokens for result in results)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


async def merge_choices(
    streams: list[AsyncGenerator[RequestOutput, None]],
) -> AsyncGenerator[ChoiceOutput, None]:
    """Interleave the outputs of several engine requests as they come.

    Args:
        streams: one engine output stream per choice, in choice order.

    Returns:
        An async iterator of ChoiceOutput. An exception from any stream is raised from it. Closing or
        cancelling it cancels every stream's task, which makes the engine abort unfinished requests.
    """
    if len(streams) == 1:  # nothing to interleave: skip the pump task and its queue (one hop less per token)
        try:
            async for output in streams[0]:
                yield ChoiceOutput(index=0, output=output)
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue[ChoiceOutput | BaseException | int] = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator[RequestOutput, None]) -> None:
        try:
            async for output in stream:
                queue.put_nowait(ChoiceOutput(index=index, output=output))
            queue.put_nowait(index)  # this stream is done
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # surfaced to the consumer
            queue.put_nowait(error)

    tasks = [asyncio.create_task(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, int):
                remaining -= 1
                continue
            yield item
    finally:
        for task in tasks:
            task.cancel()


async def beam_choices(stream: AsyncGenerator[ChoiceOutput, None], n: int) -> AsyncGenerator[ChoiceOutput, None]:
    """Beam search outputs (indexed by prompt) as n choices per prompt, one per returned beam."""
    try:
        async for item in stream:
            for beam, output in enumerate(decoding.beam_outputs(item.output)):
                yield ChoiceOutput(index=item.index * n + beam, output=output)
    finally:
        await stream.aclose()


async def best_of_choices(stream: AsyncGenerator[ChoiceOutput, None], n: int, num_candidates: int,
                          ) -> AsyncGenerator[ChoiceOutput, None]:
    """Rank each prompt's sampled candidates once all have finished and yield its n best as its choices.

    Args:
        stream: the merged outputs of num_candidates engine requests per prompt (index prompt * num_candidates + c).
        n: choices returned per prompt.
        num_candidates: best_of.

    Returns:
        One finished output per returned choice (index prompt * n + rank), the most likely per token first.
    """
    merged: dict[int, RequestOutput] = {}
    try:
        async for item in stream:
            earlier = merged.get(item.index)
            merged[item.index] = item.output if earlier is None else merge_outputs(earlier, item.output)
    finally:
        await stream.aclose()
    for prompt in range(len(merged) // num_candidates):
        candidates = [merged[prompt * num_candidates + c] for c in range(num_candidates)]
        ranked = sorted(candidates, key=decoding.mean_logprob, reverse=True)  # stable: ties keep candidate order
        for rank, output in enumerate(ranked[:n]):
            yield ChoiceOutput(index=prompt * n + rank, output=output)


async def first_and_rest(stream: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
    """Pull the first item now (so that errors become an HTTP status, not a broken stream).

    Returns:
        An iterator yielding that first item and then the rest of `stream`.
    """
    first = await stream.__anext__()

    async def chained() -> AsyncGenerator[T, None]:
        try:
            yield first
            async for item in stream:
                yield item
        finally:
            await stream.aclose()

    return chained()


async def collect(stream: AsyncGenerator[ChoiceOutput, None], num_choices: int) -> list[ChoiceResult]:
    """Accumulate a merged stream into one ChoiceResult per choice, in choice order."""
    results = [ChoiceResult(index=index) for index in range(num_choices)]
    try:
        async for item in stream:
            results[item.index].add(item.output)
    finally:
        await stream.aclose()
    return results
