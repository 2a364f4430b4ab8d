"""The engine stall watchdog: work is pending, yet no step has finished for too long.

A frozen engine core process (SIGSTOP, a wedged device, a deadlock) neither dies nor answers: without
this, /health stays 200 and every request hangs until its client gives up. The engine client runs one watchdog
task on the event loop and calls `progressed()` whenever a step's message arrives:

    pending work, no progress for `timeout` s ──▶ on_stall(seconds): the engine is dead (503, streams end)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)
DEFAULT_STALL_TIMEOUT_SECONDS = 120.0  # --engine-stall-timeout: far above any step, a long GPU prefill included


class StallWatchdog:
    """Calls `on_stall` once when work has been pending for `timeout` seconds without a step finishing."""

    def __init__(self, timeout: float, is_pending: Callable[[], bool], on_stall: Callable[[float], None]):
        """
        Args:
            timeout: seconds without progress while work is pending (> 0).
            is_pending: whether the engine has work it should be making progress on.
            on_stall: called once with the seconds since the last progress; the watchdog stops then.
        """
        assert timeout > 0, timeout
        self.timeout = timeout
        self._is_pending = is_pending
        self._on_stall = on_stall
        self._last_progress = time.monotonic()
        self._was_pending = False

    def progressed(self) -> None:
        """A step finished (or anything else that proves the engine is alive)."""
        self._last_progress = time.monotonic()

    def check(self) -> bool:
        """One look at the clock; True (after calling on_stall) when the engine stalled."""
        now = time.monotonic()
        pending = self._is_pending()
        if pending and not self._was_pending:  # the clock starts when work arrives, not at the last idle step
            self._last_progress = now
        self._was_pending = pending
        stalled_for = now - self._last_progress
        if pending and stalled_for >= self.timeout:
            try:
                self._on_stall(stalled_for)
            except Exception:  # the engine is stalled whatever went wrong here; say so rather than die unheard
                logger.exception("the stall watchdog could not act on a stall of %.0f s", stalled_for)
            return True
        return False

    async def run(self) -> None:
        """Check a few times per timeout (at least once a second) until the engine stalls; cancel it to stop."""
        interval = min(1.0, self.timeout / 10)
        while not self.check():
            await asyncio.sleep(interval)
