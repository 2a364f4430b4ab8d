"""The runner's own copy of a request: what it needs to feed and sample it, kept up to date from the step plans
(step_plan.py) and from the tokens it samples itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.engine.sampling_params import SamplingParams
from server.engine.step_plan import PLACEHOLDER, NewRequest, StepPlan, token_slice

if TYPE_CHECKING:
    import torch


@dataclass(slots=True, eq=False)
class RequestState:
    """One request as the runner holds it."""

    request_id: str
    prompt_token_ids: list[int]  # read only
    output_token_ids: list[int]  # sampled so far; the last ones are PLACEHOLDERs while still on the device
    params: SamplingParams
    block_ids: list[int]  # its block table
    num_placeholders: int = 0  # trailing PLACEHOLDERs of output_token_ids
    generator: torch.Generator | None = None  # a seeded request's sampling generator, kept across preemptions

    @classmethod
    def of(cls, new: NewRequest) -> RequestState:
        state = cls(new.request_id, new.prompt_token_ids, [], new.params, [])
        state.replace_with(new)
        return state

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def replace_with(self, new: NewRequest) -> None:
        """Take the scheduler's whole view of the request (in place: a launched step still resolves into it)."""
        self.prompt_token_ids = new.prompt_token_ids
        self.output_token_ids = list(new.output_token_ids)
        self.params = new.params
        self.block_ids = list(new.block_ids)
        known = len(self.output_token_ids)
        while known and self.output_token_ids[known - 1] == PLACEHOLDER:
            known -= 1
        self.num_placeholders = len(self.output_token_ids) - known

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output."""
        return token_slice(self.prompt_token_ids, self.output_token_ids, start, end)

    def append_placeholder(self) -> None:
        self.output_token_ids.append(PLACEHOLDER)
        self.num_placeholders += 1

    def resolve_placeholder(self, token_id: int) -> None:
        """Replace the oldest placeholder with the token it stood for (now on the host)."""
        assert self.num_placeholders, f"request {self.request_id!r} has no placeholder to resolve"
        self.output_token_ids[len(self.output_token_ids) - self.num_placeholders] = token_id
        self.num_placeholders -= 1


def apply_plan(states: dict[str, RequestState], plan: StepPlan) -> list[RequestState]:
    """Bring the runner's requests up to a plan: forget the finished, learn the new, extend the block tables.

    Args:
        states: request id -> state, updated in place.
        plan: the step.

    Returns:
        The states of the plan's rows, in batch order.
    """
    for request_id in plan.finished_ids:
        states.pop(request_id, None)
    for new in plan.new_requests:
        state = states.get(new.request_id)
        if state is None:
            states[new.request_id] = RequestState.of(new)
        else:  # resumed or continued: its generator stays
            state.replace_with(new)
    rows = [states[request_id] for request_id in plan.request_ids]
    for state, new_block_ids in zip(rows, plan.new_block_ids):
        if new_block_ids:
            state.block_ids.extend(new_block_ids)
    return rows
