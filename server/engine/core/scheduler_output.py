"""What the scheduler decided for one step, as the engine core sees it: the data-only plan for the runner
(step_plan.StepPlan) next to the live requests behind its rows."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.engine.core.request import Request
from server.engine.step_plan import StepPlan


@dataclass(slots=True)
class SchedulerOutput:
    """The whole step."""

    plan: StepPlan = field(default_factory=StepPlan)  # what the executor runs (no live objects)
    requests: list[Request] = field(default_factory=list)  # the plan's rows' requests, in batch order
    preempted_ids: list[str] = field(default_factory=list)  # requests sent back to waiting this step
    admissions: list[int] = field(default_factory=list)  # per row, its request's num_preemptions when planned
    num_prefix_queries: int = 0  # tokens of the requests admitted this step that looked up the prefix cache
    num_prefix_hits: int = 0  # of those, tokens found cached (not computed)

    @property
    def is_empty(self) -> bool:
        return not self.requests

    @property
    def num_batched_tokens(self) -> int:
        return self.plan.num_batched_tokens

    @property
    def sampled_requests(self) -> list[Request]:
        """The rows that sample a token this step, in batch order."""
        return [request for request, sample in zip(self.requests, self.plan.needs_sample) if sample]
