"""The last error responses the server sent (4xx and 5xx), for the live dashboard.

    client ─▶ RecentErrorsMiddleware ─▶ RequestIdMiddleware ─▶ auth ─▶ body limit ─▶ routes
                 │ a response with status >= 400 (499, "the client left", excepted):
                 │   its status, X-Request-Id and the OpenAI error JSON's type, code and message
                 └ kept in RecentErrors, a ring of the last `capacity` (oldest dropped)

It is the outermost middleware, so that it sees every error answer: a 401 from the key check, a 413 from the body
limit, a 500 that RequestIdMiddleware made of an exception. An error inside a stream that already answered 200 (an
SSE `data: {"error": ...}` event) is not an error response; inflight_request_success_total{finished_reason="error"}
counts those.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

MAX_BODY_BYTES = 4096  # of an error response, read for its message; error JSON is far smaller
MAX_MESSAGE_CHARS = 300  # of a message kept
CLIENT_CLOSED_REQUEST = 499  # nobody reads it; not an error the server made

Scope = dict[str, Any]
Message = dict[str, Any]


@dataclass(slots=True)
class ErrorRecord:
    """One error response."""

    time: float  # when it was sent, seconds since the epoch
    method: str  # the request's HTTP method
    path: str  # the request's path, without the query string
    status: int  # the HTTP status, 400-599
    type: str | None  # OpenAI error "type" (invalid_request_error, server_error, ...); None if the body had none
    code: str | None  # OpenAI error "code" (invalid_api_key, rate_limit_exceeded, ...)
    message: str | None  # the error message the client got, cut to MAX_MESSAGE_CHARS
    request_id: str | None  # the X-Request-Id of the response (the server log's key)


class RecentErrors:
    """A ring of the last `capacity` error responses, and how many were recorded in all."""

    def __init__(self, capacity: int = 20) -> None:
        self.records: deque[ErrorRecord] = deque(maxlen=capacity)
        self.num_recorded = 0  # since the server started, also those the ring dropped

    def add(self, record: ErrorRecord) -> None:
        self.records.append(record)
        self.num_recorded += 1

    def newest_first(self, with_messages: bool) -> list[dict[str, Any]]:
        """The records as JSON objects, newest first.

        Args:
            with_messages: False puts None for every message (they may quote a value of someone's request).
        """
        records = [asdict(record) for record in reversed(self.records)]
        if not with_messages:
            for record in records:
                record["message"] = None
        return records


def error_fields(body: bytes) -> tuple[str | None, str | None, str | None]:
    """(type, code, message) of an OpenAI error JSON body; None for each one the body lacks."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None, None, None
    if not isinstance(error, dict):
        return None, None, None

    def text(key: str) -> str | None:
        value = error.get(key)
        return str(value)[:MAX_MESSAGE_CHARS] if value is not None else None

    return text("type"), text("code"), text("message")


class RecentErrorsMiddleware:
    """Wraps an ASGI app: every HTTP error response it sends is added to `errors`."""

    def __init__(self, app: Any, errors: RecentErrors) -> None:
        self.app = app
        self.errors = errors

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: int | None = None  # of an error response being sent
        request_id: str | None = None
        body = bytearray()

        async def recording_send(message: Message) -> None:
            nonlocal status, request_id
            if message["type"] == "http.response.start" and message["status"] >= 400 \
                    and message["status"] != CLIENT_CLOSED_REQUEST:
                status = message["status"]
                request_id = next((value.decode("latin-1") for name, value in message.get("headers", ())
                                   if name.lower() == b"x-request-id"), None)
            elif message["type"] == "http.response.body" and status is not None:
                body.extend(message.get("body", b"")[: MAX_BODY_BYTES - len(body)])
                if not message.get("more_body", False):
                    error_type, code, text = error_fields(bytes(body))
                    self.errors.add(ErrorRecord(time=time.time(), method=scope.get("method", ""),
                                                path=scope.get("path", ""), status=status, type=error_type, code=code,
                                                message=text, request_id=request_id))
                    status = None
            await send(message)

        await self.app(scope, receive, recording_send)
