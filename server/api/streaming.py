"""Server-Sent Events formatting: pure functions from response chunks to `data: ...` strings.

A stream is a sequence of events, each one JSON object, and ends with the literal [DONE]::

    data: {"id": "cmpl-...", "object": "text_completion", "choices": [...]}\\n\\n
    data: {...}\\n\\n
    data: [DONE]\\n\\n
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

DONE = "data: [DONE]\n\n"
MEDIA_TYPE = "text/event-stream"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(payload: dict[str, Any]) -> str:
    """One SSE event holding `payload` as compact JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def chunk_event(chunk: BaseModel, include_usage: bool) -> str:
    """One stream chunk as an SSE event.

    Args:
        chunk: a CompletionStreamResponse or ChatCompletionStreamResponse.
        include_usage: the client asked for stream_options.include_usage; then every chunk carries a
            "usage" key (null until the last chunk), as OpenAI does; otherwise the key is left out.

    Returns:
        The `data: {...}\\n\\n` string. A chat chunk's system_fingerprint is left out when it is null.
    """
    payload = chunk.model_dump(mode="json")
    if not include_usage:
        payload.pop("usage", None)
    if "system_fingerprint" in payload and payload["system_fingerprint"] is None:
        del payload["system_fingerprint"]
    return event(payload)


def error_event(error: BaseModel) -> str:
    """An error that happened after the stream began (an ErrorResponse), as an SSE event."""
    return event(error.model_dump(mode="json"))


class TextChunkFormatter:
    """The most frequent event of a stream — one choice's text, no logprobs — formatted directly.

    Gives the same bytes as chunk_event on the pydantic chunk models, without building them: per streamed
    token that is several times cheaper, and under load the event loop does this for every running request.
    """

    def __init__(self, request_id: str, created: int, model: str, chat: bool, include_usage: bool,
                 system_fingerprint: str | None = None):
        """Args: the stream's id, creation time and model name; chat picks the chat.completion.chunk shape;
        include_usage adds "usage": null as OpenAI does when the client asked for usage; system_fingerprint
        (chat) follows the model name when given."""
        kind = "chat.completion.chunk" if chat else "text_completion"
        head: dict[str, Any] = {"id": request_id, "object": kind, "created": created, "model": model}
        if system_fingerprint is not None:
            head["system_fingerprint"] = system_fingerprint
        self._head = "data: " + _compact(head)[:-1] + ',"choices":[{"index":'
        self._text_key = ',"delta":{"content":' if chat else ',"text":'
        self._text_end = "}" if chat else ""
        self._tail = "}]" + (',"usage":null' if include_usage else "") + "}\n\n"

    def __call__(self, index: int, text: str, finish_reason: str | None = None) -> str:
        reason = "null" if finish_reason is None else _compact(finish_reason)
        return (f"{self._head}{index}{self._text_key}{_compact(text)}{self._text_end}"
                f',"logprobs":null,"finish_reason":{reason}{self._tail}')


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
