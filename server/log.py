"""Logging as inflight-serve does it: one format on stderr, in the API process and the engine core process alike."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(log_level: str) -> None:
    """Log to stderr at `log_level` ("debug", "info", ...) in inflight-serve's format."""
    logging.basicConfig(level=logging.getLevelName(log_level.upper()), format=LOG_FORMAT)
