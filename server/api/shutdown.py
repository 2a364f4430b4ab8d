"""Graceful shutdown: on SIGTERM or SIGINT stop admitting, let running requests finish, then exit 0.

    signal ─▶ draining: new requests 503, /health 503 (load balancers stop sending)
            ─▶ wait until no request is left, at most --drain-timeout seconds
            ─▶ end the rest with finish_reason "abort" (their clients get what was generated so far)
            ─▶ uvicorn closes the listener, lets responses finish, stops the engine; the process exits 0

A second signal while draining stops at once: every request is aborted (its stream still ends with
finish_reason "abort" and [DONE]; if the engine does not answer within a second, the streams are ended
without it), then the server exits. uvicorn alone would stop listening at the first signal, cut open
streams at the second, and re-raise the signal at the end (exit status -15).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType
from typing import Any

import uvicorn

logger = logging.getLogger("server")
ABORT_GRACE_SECONDS = 5.0  # after abort_all at the drain timeout, how long the engine may take to end the requests
STOP_NOW_GRACE_SECONDS = 1.0  # the same after a second signal


class GracefulServer(uvicorn.Server):
    """A uvicorn.Server that drains on SIGTERM/SIGINT and returns normally instead of re-raising the signal."""

    def __init__(self, config: uvicorn.Config, serving: Any, drain_timeout: float) -> None:
        """
        Args:
            config: the uvicorn config.
            serving: the OpenAIServing (its `draining` flag and its engine).
            drain_timeout: seconds running requests may take to finish once draining began.
        """
        super().__init__(config)
        self.serving = serving
        self.drain_timeout = drain_timeout
        self.drain_started = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None
        self._stop_task: asyncio.Task | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The signal handler: the first signal starts a drain, a second one ends every request and stops."""
        if self._loop is None:  # not serving yet
            self.should_exit = True
        elif self.drain_started:
            self._loop.call_soon_threadsafe(self.stop_now, signal.Signals(sig).name)
        else:
            self.drain_started = True
            self._loop.call_soon_threadsafe(self.begin_drain, signal.Signals(sig).name)

    def begin_drain(self, cause: str = "shutdown requested") -> None:
        """Start draining (on the server's event loop); the server exits when the drain is over."""
        self.drain_started = True
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self.drain(cause), name="inflight-drain")

    def stop_now(self, cause: str) -> None:
        """End every request with "abort" and exit (on the server's event loop); a drain in progress is cut short."""
        if self._stop_task is not None:
            return
        logger.warning("%s again: ending every request with finish_reason \"abort\" and stopping now", cause)
        self.serving.draining = True
        self._stop_task = asyncio.get_running_loop().create_task(self._stop_now(), name="inflight-stop-now")

    async def _stop_now(self) -> None:
        await _end_every_request(self.serving.engine, STOP_NOW_GRACE_SECONDS)
        self.should_exit = True

    async def drain(self, cause: str) -> None:
        """Refuse new requests, wait for running ones up to drain_timeout, abort the rest, then exit."""
        self.serving.draining = True
        engine = self.serving.engine
        logger.info("%s: draining; new requests get 503, running requests have %g s to finish",
                    cause, self.drain_timeout)
        finished = await _wait_until_idle(engine, self.drain_timeout)
        if not finished:
            logger.warning("drain timeout (%g s): ending the unfinished requests with finish_reason \"abort\"",
                           self.drain_timeout)
            await _end_every_request(engine, ABORT_GRACE_SECONDS)
        logger.info("drained; shutting down")
        self.should_exit = True


async def _end_every_request(engine: Any, grace: float) -> None:
    """Abort every request; streams the engine has not ended after `grace` seconds are ended without it (an
    engine that stalled), so that each client still gets its final chunk."""
    engine.abort_all()
    if not await _wait_until_idle(engine, grace):
        num_ended = engine.end_streams()
        if num_ended:
            logger.warning("the engine did not end %d requests within %g s; ending their streams without it",
                           num_ended, grace)
        await _wait_until_idle(engine, grace)  # the streams' final chunks reach their clients


async def _wait_until_idle(engine: Any, timeout: float) -> bool:
    """Wait until the engine has no unfinished request, at most `timeout` seconds; True if it got there."""
    deadline = time.monotonic() + timeout
    while engine.has_unfinished_requests:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True
