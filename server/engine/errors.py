"""Errors the engine raises to the API layer (user errors are plain ValueError)."""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine loop is not running (not started, shut down, or crashed): answer 503."""


class EngineOverloadedError(RuntimeError):
    """Too many requests are already queued (EngineConfig.max_queued_requests): answer 429 and retry later."""


class QueueTimeoutError(RuntimeError):
    """A request waited longer than max_queue_time without being scheduled; it was dropped (answer 503)."""


class RequestFailedError(RuntimeError):
    """A step that included this request raised, or processing its token did; the request was ended (answer 500)."""
