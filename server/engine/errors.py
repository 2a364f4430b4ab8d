"""Errors the engine raises to the API layer.

A request the client got wrong is an InvalidRequest naming the parameter (a 400); any other ValueError from the
engine is a bug, and a 500.
"""

from __future__ import annotations


class InvalidRequest(ValueError):
    """The client's request cannot be served as asked: answer 400, naming `param` (the API's name for it)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple:  # keeps `param` when pickled (the engine core process sends it back)
        return type(self), (str(self), self.param)


class EngineDeadError(RuntimeError):
    """The engine loop is not running (not started, shut down, or crashed): answer 503."""


class EngineOverloadedError(RuntimeError):
    """Too many requests are already queued (EngineConfig.max_queued_requests): answer 429 and retry later."""


class QueueTimeoutError(RuntimeError):
    """A request waited longer than max_queue_time without being scheduled; it was dropped (answer 503)."""


class RequestFailedError(RuntimeError):
    """A step that included this request raised, or processing its token did; the request was ended (answer 500)."""
