"""ASGI middleware giving every HTTP request an id: the X-Request-Id response header, and the key of its log lines.

    client ─▶ RequestIdMiddleware ─▶ auth ─▶ body limit ─▶ routes
                 │ id = "req_<32 hex>" (current_request_id() anywhere below, also in stream tasks)
                 │ every response: X-Request-Id: <id>
                 └ an exception nobody handled: logged with the id and its traceback; the client gets a 500
                   whose message names the id, never the exception's text

The id is made here, never taken from the client: a client-chosen id could forge or split log lines.
"""

from __future__ import annotations

import contextvars
import logging
import uuid
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)
HEADER = "x-request-id"
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("inflight_request_id", default=None)
_request_line: contextvars.ContextVar[str | None] = contextvars.ContextVar("inflight_request_line", default=None)

Scope = dict[str, Any]
Message = dict[str, Any]


def current_request_id() -> str | None:
    """The id of the HTTP request being served (None outside one)."""
    return _request_id.get()


def current_request_line() -> str | None:
    """The method and path of the HTTP request being served ("POST /v1/completions"; None outside one)."""
    return _request_line.get()


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


class RequestIdMiddleware:
    """Wraps an ASGI app: ids each HTTP request, sends the id back, and turns escaped exceptions into a 500."""

    def __init__(self, app: Any, error_response: Callable[[str], Any]) -> None:
        """
        Args:
            app: the ASGI application.
            error_response: the 500 response (an ASGI app) for a request id, sent when `app` raised before answering.
        """
        self.app = app
        self.error_response = error_response

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        token = _request_id.set(request_id)
        line_token = _request_line.set(f"{scope.get('method')} {scope.get('path')}")
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                message["headers"] = [*message.get("headers", ()), (HEADER.encode(), request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("request %s (%s %s) failed", request_id, scope.get("method"), scope.get("path"))
            if not response_started:
                await self.error_response(request_id)(scope, receive, send_with_id)
        finally:
            _request_id.reset(token)
            _request_line.reset(line_token)
