"""One step as plain data: the scheduler's plan for the model runner, and what the runner sends back.

The plan carries no live object: the runner keeps its own state of every request it has seen (tokens, block
table, sampling parameters, generator) and the plan says only what changed. A request the runner does not
hold yet (new, resumed after a preemption, a beam continued from another) comes in full as a `NewRequest`;
every other row is its id, how far its KV cache is, how many tokens to feed and the blocks it gained. So a
decode step of 256 requests is a few kilobytes, and it pickles as cheaply to another process (tensor
parallel workers) as it passes to the runner in this one.

    scheduler --StepPlan--> executor --> runner(s): apply plan to own state -> forward -> sample
    engine core <--RunnerOutput-- (token ids per request, on the host)

The runner appends what it samples to its own copy of each request (a PLACEHOLDER while the token is still
on the device, as the scheduler does), so both sides agree on every request's tokens without sending them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server.engine.outputs import TokenLogprob
from server.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

PLACEHOLDER = -1  # an output token sampled on the device and not yet copied to the host


def token_slice(prompt_token_ids: list[int], output_token_ids: list[int], start: int, end: int) -> list[int]:
    """Tokens [start, end) of prompt + output, without concatenating the whole sequence."""
    num_prompt = len(prompt_token_ids)
    if end <= num_prompt:
        return prompt_token_ids[start:end]
    if start >= num_prompt:
        return output_token_ids[start - num_prompt : end - num_prompt]
    return prompt_token_ids[start:] + output_token_ids[: end - num_prompt]


@dataclass(slots=True)
class BlockCopy:
    """One block's K/V to copy before a step's forward pass (copy-on-write)."""

    src: int  # the shared block whose contents are copied
    dst: int  # the requester's new private block


@dataclass(slots=True)
class KVTransfer:
    """One block's K/V between the device pool and the host tier, before a step's forward pass (host_tier.py)."""

    to_host: bool  # True: offload device block -> host slot; False: restore host slot -> device block
    block: int  # the device block
    slot: int  # the host slot


@dataclass(slots=True)
class NewRequest:
    """A request as the runner must (re)learn it: its whole state, replacing what the runner held for its id."""

    request_id: str
    prompt_token_ids: list[int]  # read only on both sides
    output_token_ids: list[int]  # generated so far (after a preemption or for a beam); may end in PLACEHOLDERs
    params: SamplingParams
    block_ids: list[int]  # its whole block table


@dataclass(slots=True)
class StepPlan:
    """The whole step, one row per scheduled request in batch order (columns, so that it pickles small)."""

    request_ids: list[str] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)  # tokens already in the row's KV blocks
    num_new_tokens: list[int] = field(default_factory=list)  # tokens fed this step: a prompt chunk, or 1
    needs_sample: list[bool] = field(default_factory=list)  # the row reaches its last token: a token is sampled
    new_block_ids: list[list[int]] = field(default_factory=list)  # blocks appended since the runner last saw it
    new_requests: list[NewRequest] = field(default_factory=list)  # applied before the rows
    finished_ids: list[str] = field(default_factory=list)  # requests the runner may forget (applied first)
    block_copies: list[BlockCopy] = field(default_factory=list)  # copy-on-write, done before the forward pass
    kv_transfers: list[KVTransfer] = field(default_factory=list)  # host tier copies, in order, before anything else
    grammar_request_ids: list[str] = field(default_factory=list)  # rows sampled under a grammar, bitmask row order
    grammar_bitmask: torch.Tensor | None = None  # [len(grammar_request_ids), ceil(vocab / 32)] int32 on the host

    @property
    def num_rows(self) -> int:
        return len(self.request_ids)

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def add_row(self, request_id: str, num_computed_tokens: int, num_new_tokens: int, needs_sample: bool,
                new_block_ids: list[int]) -> None:
        self.request_ids.append(request_id)
        self.num_computed_tokens.append(num_computed_tokens)
        self.num_new_tokens.append(num_new_tokens)
        self.needs_sample.append(needs_sample)
        self.new_block_ids.append(new_block_ids)


@dataclass(slots=True)
class BeamCandidates:
    """One beam row of a step: its most likely next tokens (the runner's output for that row)."""

    token_ids: list[int]  # best first, at least BeamSearchParams.num_candidates of them
    logprobs: list[float]  # their log-probabilities, same order


@dataclass(slots=True)
class PromptLogprobsChunk:
    """Prompt tokens' logprobs computed by one step (one prompt chunk of a request that asked for them)."""

    first_token: int  # index in the prompt of the first token scored (>= 1: nothing predicts token 0)
    logprobs: list[TokenLogprob]  # tokens first_token, first_token + 1, ... in order


@dataclass(slots=True)
class RunnerOutput:
    """What one step produced, on the host, keyed by request id."""

    sampled_token_ids: dict[str, list[int]]  # the tokens each sampling row produced (one today), in order
    logprobs: dict[str, list[TokenLogprob]]  # the logprobs of those tokens, for requests that asked
    beam_candidates: dict[str, BeamCandidates] = field(default_factory=dict)  # beam id -> its row's best tokens
    nonfinite_request_ids: set[str] = field(default_factory=set)  # requests whose logits held NaN/+inf
    prompt_logprobs: dict[str, PromptLogprobsChunk] = field(default_factory=dict)  # requests that asked for them
