"""Leaving a server process once everything is said: without the interpreter's teardown."""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def exit_now(status: int) -> NoReturn:
    """Flush the logs and standard streams, then exit at once with `status`.

    The interpreter's teardown (a last garbage collection over torch, the tokenizer and the app, then every
    module's finalizers) took seconds of an idle server's exit and made the grammar library's bindings print
    spurious leak reports; nothing it does matters once the server has stopped and its engine is gone.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone: nothing more to say there
            pass
    os._exit(status)
