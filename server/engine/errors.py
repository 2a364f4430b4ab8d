"""Errors the engine raises to the API layer (user errors are plain ValueError)."""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine loop is not running (not started, shut down, or crashed): answer 503."""


class EngineOverloadedError(RuntimeError):
    """Too many requests are already queued (EngineConfig.max_queued_requests): answer 503 and retry later."""


class RequestFailedError(RuntimeError):
    """A step that included this request raised; the request was ended (answer 500). The cause is chained."""
