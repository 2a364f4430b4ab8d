"""What the scheduler decided for one step: the boundary between scheduler and model runner."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from server.engine.core.kv_cache_manager import BlockCopy
from server.engine.core.request import Request


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step."""

    request: Request  # live state; the runner reads its tokens and params, never writes
    num_computed_tokens: int  # tokens already in its KV blocks before this step
    num_new_tokens: int  # tokens processed this step: a prompt chunk, or 1 for a decode
    block_ids: list[int]  # its block table, covering num_computed_tokens + num_new_tokens
    needs_sample: bool  # this step reaches its last token, so a new token is sampled

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def new_token_ids(self) -> list[int]:
        """The tokens to feed this step."""
        start = self.num_computed_tokens
        return self.request.token_ids(start, start + self.num_new_tokens)


@dataclass(slots=True)
class SchedulerOutput:
    """The whole step."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)  # in batch order
    preempted_ids: list[str] = field(default_factory=list)  # requests sent back to waiting this step
    num_batched_tokens: int = 0  # sum of num_new_tokens
    block_copies: list[BlockCopy] = field(default_factory=list)  # copy-on-write, done before the forward pass
    grammar_request_ids: list[str] = field(default_factory=list)  # requests sampled under a grammar, bitmask row order
    grammar_bitmask: torch.Tensor | None = None  # [len(grammar_request_ids), ceil(vocab / 32)] int32 on the host

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
