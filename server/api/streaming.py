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
        The `data: {...}\\n\\n` string.
    """
    payload = chunk.model_dump(mode="json")
    if not include_usage:
        payload.pop("usage", None)
    return event(payload)


def error_event(error: BaseModel) -> str:
    """An error that happened after the stream began (an ErrorResponse), as an SSE event."""
    return event(error.model_dump(mode="json"))
