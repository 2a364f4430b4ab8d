"""What the engine reports about itself: plain records, and the sink protocol that takes them.

The engine core records `StepStats` once per step, `FinishedRequestStats` once per finished request, the gauges'
state when it changes outside a step, and failed steps, into a `StatsSink`. In the API process that sink is the
Prometheus exporter (server/api/metrics.py); an engine core in its own process records into a `StatsRecorder`,
whose plain-tuple records travel with each step's message and are replayed into the exporter (`replay`).
Nothing here imports Prometheus (or torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Protocol


@dataclass(slots=True)
class StepStats:
    """What happened in one engine step, and the state after it."""

    step_seconds: float  # wall time of schedule + forward + sample + update
    num_batched_tokens: int  # new tokens processed (prompt chunks + decodes)
    num_running: int  # running requests after the step
    num_waiting: int  # waiting requests after the step
    num_used_blocks: int  # KV blocks held after the step
    num_free_blocks: int  # KV blocks free after the step
    num_preemptions: int  # requests preempted in this step
    num_prompt_tokens: int  # prompt lengths of requests that got their first token this step
    num_generation_tokens: int  # tokens sampled this step
    time_to_first_token_seconds: list[float] = field(default_factory=list)  # arrival -> first token, per request
    inter_token_latency_seconds: list[float] = field(default_factory=list)  # previous -> this token, per request
    num_prefix_queries: int = 0  # tokens of the requests admitted this step that looked up the prefix cache
    num_prefix_hits: int = 0  # of those, tokens found in the cache (not computed)
    num_cached_blocks: int = 0  # KV blocks held only by the prefix cache after the step (counted as free too)
    num_offload_bytes: int = 0  # host memory the KV offload tier holds after the step
    num_blocks_offloaded: int = 0  # blocks copied device -> host this step
    num_blocks_restored: int = 0  # blocks copied host -> device this step


@dataclass(slots=True)
class FinishedRequestStats:
    """One request's life, recorded when it finishes."""

    finish_reason: str  # why it ended: a FinishReason (a str)
    e2e_latency_seconds: float  # arrival -> finish
    queue_time_seconds: float | None  # arrival -> first scheduled; None if it never ran
    num_prompt_tokens: int  # prompt length
    num_generation_tokens: int  # tokens generated


class StatsSink(Protocol):
    """Where the engine core's records go."""

    def record_state(self, num_running: int, num_waiting: int, num_used_blocks: int, num_free_blocks: int) -> None:
        """The gauges' state (also outside steps, e.g. after an abort)."""

    def record_step(self, stats: StepStats) -> None:
        """One step."""

    def record_finished(self, stats: FinishedRequestStats) -> None:
        """One finished request."""

    def record_step_failure(self) -> None:
        """One step that raised."""


class ClientStatsSink(StatsSink, Protocol):
    """What the engine's client side (streams, health) records besides the engine core's records."""

    def record_cancelled(self) -> None:
        """A request aborted because nobody reads it any more (its client left)."""

    def record_engine_healthy(self, healthy: bool) -> None:
        """The engine started serving (True) or stopped (False)."""

    def record_engine_dead(self) -> None:
        """The engine died: unhealthy, and nothing runs, waits or holds KV blocks any more."""


def replay(records: list[tuple[str, tuple]], sink: StatsSink) -> None:
    """Record into `sink` what a StatsRecorder recorded (in the engine core process), in the same order."""
    for kind, values in records:
        if kind == "step":
            sink.record_step(StepStats(*values))
        elif kind == "finished":
            sink.record_finished(FinishedRequestStats(*values))
        elif kind == "state":
            sink.record_state(*values)
        else:
            assert kind == "step_failure", kind
            sink.record_step_failure()


def _field_values(stats: StepStats | FinishedRequestStats) -> tuple:
    """A record's fields in declaration order (cheaper to pickle than the dataclass; rebuilt with Cls(*values))."""
    return tuple(getattr(stats, item.name) for item in fields(stats))


class StatsRecorder:
    """The StatsSink of an engine core in its own process: keeps each record as plain tuples until `take()` ships
    them to the API process, which replays them (`replay`)."""

    def __init__(self) -> None:
        self._records: list[tuple[str, tuple]] = []

    def record_state(self, num_running: int, num_waiting: int, num_used_blocks: int, num_free_blocks: int) -> None:
        self._records.append(("state", (num_running, num_waiting, num_used_blocks, num_free_blocks)))

    def record_step(self, stats: StepStats) -> None:
        self._records.append(("step", _field_values(stats)))

    def record_finished(self, stats: FinishedRequestStats) -> None:
        self._records.append(("finished", _field_values(stats)))

    def record_step_failure(self) -> None:
        self._records.append(("step_failure", ()))

    def take(self) -> list[tuple[str, tuple]]:
        """The records so far (oldest first); the recorder starts empty again."""
        records, self._records = self._records, []
        return records
