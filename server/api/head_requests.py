"""ASGI middleware answering HEAD on every GET route: the GET's status and headers, without its body (RFC 9110 9.3.2).

    HEAD /metrics ─▶ HeadAsGet ─▶ the app sees GET /metrics ─▶ 200, headers (Content-Length of the GET body)
                        └ every body message is passed on empty: the client gets the headers only

FastAPI's routes answer only the methods they name (Starlette's own Route adds HEAD to GET, FastAPI's APIRoute does
not), so without this `HEAD /health` is a 405. Doing it here covers every GET route at once, those of the dashboard and
the docs included, and keeps HEAD out of the OpenAPI schema. A path without GET stays a 405 (its Allow says which
methods it takes). GET routes are safe (no side effects), so running one for a HEAD changes nothing.
"""

from __future__ import annotations

from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]


class HeadAsGet:
    """Wraps an ASGI app: an HTTP HEAD request is served as GET, with every body chunk of the response dropped."""

    def __init__(self, app: Any) -> None:
        """
        Args:
            app: the ASGI application.
        """
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_headers_only)
