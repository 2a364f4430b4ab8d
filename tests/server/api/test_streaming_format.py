"""The direct text-chunk formatter gives byte-for-byte the events of the pydantic chunk models."""

from __future__ import annotations

import pytest

from server.api.protocol import (
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
    DeltaMessage,
)
from server.api.streaming import TextChunkFormatter, chunk_event

TEXTS = ["", " hello", 'quote " and \\ backslash', "line\nbreak\ttab", "ünïcödé 日本 🙂", "\u2028\x00"]


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("reason", [None, "stop", "length"])
def test_completion_chunks_match_the_models(include_usage, reason):
    fast = TextChunkFormatter('cmpl-"x"', 1700000000, "mödel", chat=False, include_usage=include_usage)
    for index, text in enumerate(TEXTS):
        choice = CompletionResponseChoice(index=index, text=text, logprobs=None, finish_reason=reason)
        model = CompletionStreamResponse(id='cmpl-"x"', created=1700000000, model="mödel", choices=[choice])
        assert fast(index, text, reason) == chunk_event(model, include_usage)


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_chunks_match_the_models(include_usage):
    fast = TextChunkFormatter("chatcmpl-1", 5, "m", chat=True, include_usage=include_usage)
    for index, text in enumerate(TEXTS):
        choice = ChatCompletionStreamChoice(
            index=index, delta=DeltaMessage(content=text), logprobs=None, finish_reason=None
        )
        model = ChatCompletionStreamResponse(id="chatcmpl-1", created=5, model="m", choices=[choice])
        assert fast(index, text) == chunk_event(model, include_usage)
