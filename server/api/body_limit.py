"""ASGI middleware that refuses request bodies over a size limit with 413 and the OpenAI error JSON.

A body announced by Content-Length is refused before it is read; a chunked body is counted as it
arrives and refused once it passes the limit, so an oversized body is never held in memory.
"""

from __future__ import annotations

from typing import Any

from server.api.errors import RequestTooLargeError, error_json

Scope = dict[str, Any]
Message = dict[str, Any]


class _BodyTooLarge(BaseException):  # not an Exception: FastAPI would turn that into a 400
    """Raised inside `receive` once a chunked body passes the limit."""


class BodySizeLimit:
    """Wraps an ASGI app; HTTP requests whose body exceeds `max_bytes` get 413."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        """
        Args:
            app: the ASGI application to protect.
            max_bytes: the largest body accepted, in bytes.
        """
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> Any:
        return error_json(RequestTooLargeError(
            f"the request body is larger than {self.max_bytes} bytes (--max-request-body-bytes); send a smaller one"))

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._error()(scope, receive, send)
            return
        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not response_started:
                await self._error()(scope, receive, send)
