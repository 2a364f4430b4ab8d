"""uvicorn's h11 HTTP protocol with the two limits against slow clients (slowloris) that uvicorn lacks.

    connection opens ──▶ more than --max-connections open?  closed at once
          │
          ▼  header timer: --header-read-timeout seconds
    request headers complete? ── no, timer ran out ──▶ closed (the client never got a byte; nothing was started)
          │ yes: timer off while the request runs and its response (a stream of any length) is sent
          ▼
    response complete, keep-alive ──▶ the timer runs again for the next request's headers

uvicorn has no header timeout: its keep-alive timer stops at the first byte, so a client that sends a header
one byte at a time holds its socket forever. Its limit_concurrency does not bound sockets either: it answers
503 to a request once too many are open, and a socket that never finishes its headers is never counted out.
Works on asyncio and uvloop loops alike (it uses only the transport and loop.call_later).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("server")
WARNING_INTERVAL_SECONDS = 10.0  # a flood of refused connections logs one line per interval


@dataclass(slots=True)
class ConnectionLimits:
    """What one server allows each client connection; shared by the connections of that server."""

    header_read_timeout: float  # seconds to send a request's headers, from connect or from the previous response
    max_connections: int  # open connections; more are closed at once
    last_refusal_warning: float = 0.0  # monotonic time of the last "too many connections" log line

    def warn_refused(self, num_open: int) -> None:
        now = time.monotonic()
        if now - self.last_refusal_warning >= WARNING_INTERVAL_SECONDS:
            self.last_refusal_warning = now
            logger.warning("%d connections open, over --max-connections %d: closing new ones at once",
                           num_open, self.max_connections)


class LimitedH11Protocol(H11Protocol):
    """H11Protocol that closes connections over a limit, and those whose request headers are too slow to come."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self.limits.warn_refused(len(self.connections))
            transport.close()
            return
        self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        """Parse what came in; then time the headers of the next request, or stop timing once they are in."""
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a request's headers are in: it runs without a timer
            self._stop_header_timer()
        elif self.header_timer is None:  # the previous request and its response are done (keep-alive)
            self._start_header_timer()

    def _start_header_timer(self) -> None:
        self.header_timer = self.loop.call_later(self.limits.header_read_timeout, self._headers_timed_out)

    def _stop_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _headers_timed_out(self) -> None:
        self.header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            logger.debug("closing a connection from %s: no complete request headers within %g s "
                         "(--header-read-timeout)", self.client, self.limits.header_read_timeout)
            self.conn.send(h11.ConnectionClosed())
            self.transport.close()


def limited_protocol(header_read_timeout: float, max_connections: int) -> Any:
    """The `http` argument of uvicorn.Config for a server with these limits (uvicorn calls it per connection)."""
    limits = ConnectionLimits(header_read_timeout=header_read_timeout, max_connections=max_connections)
    return functools.partial(LimitedH11Protocol, limits=limits)
