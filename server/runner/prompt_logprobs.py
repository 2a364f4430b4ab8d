"""Prompt logprobs: the log-probability of every prompt token under the model, computed in the prefill forward.

The logits at position p predict token p + 1, so a prompt chunk [start, end) of a request that asked for prompt
logprobs returns the logits of all its positions: they score prompt tokens start + 1 .. end (the last one, when
end is the prompt's length, is the first generated token, which the sampler takes instead):

    prompt:      t0   t1   t2   t3   t4        chunk [0, 3) then [3, 5)
    chunk 1:     p0   p1   p2                  -> logprobs of t1, t2, t3
    chunk 2:                    p3   p4        -> logprob of t4; p4's row is sampled (the first output token)

Only the chosen token's logprob, its rank and the top k alternatives go to the host, never a vocabulary-wide
row. The logprobs are the model's own (log_softmax of the raw logits, no temperature or penalties), as vLLM's.
A request scores its prompt once: after a preemption (it has output tokens) its recomputed chunks do not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.outputs import TokenLogprob
from server.engine.step_plan import PromptLogprobsChunk, StepPlan
from server.runner.request_state import RequestState

ROWS_PER_SLICE = 1024  # log_softmax over this many positions at a time (bounds the temporary [rows, vocab] copy)


@dataclass(slots=True)
class PromptRows:
    """The rows of one step that score prompt tokens, and where they are in the step's logits."""

    request_ids: list[str]  # one per request scoring its prompt this step
    first_tokens: list[int]  # per request, the prompt index of its first scored token
    num_tokens: list[int]  # per request, tokens scored (0 when its chunk is only the prompt's last token)
    num_top_wanted: list[int]  # per request, the alternatives it asked for (its prompt_logprobs)
    num_top: int  # alternatives computed per token: the largest of num_top_wanted
    logits_rows: list[int]  # flat: the logits row scoring each token
    target_ids: list[int]  # flat: the token each row scores


@dataclass(slots=True)
class LogitsLayout:
    """Which rows of the forward pass's logits each request gets."""

    num_outputs: list[int]  # per plan row: trailing positions whose logits are returned
    sample_rows: list[int] | None  # logits rows of the sampling requests, in order; None: one row each, all sample
    prompt: PromptRows | None  # None: no request scores its prompt this step


def scores_prompt(state: RequestState) -> bool:
    """True if the request asked for prompt logprobs and has not scored its prompt yet."""
    return state.params.prompt_logprobs is not None and state.num_output_tokens == 0


def logits_layout(rows: list[RequestState], plan: StepPlan) -> LogitsLayout:
    """Decide which positions of the step return logits: the last token of each sampling row, and every position
    of a prompt chunk that scores its prompt.

    Args:
        rows: the plan's rows' states (after the plan was applied), in batch order.
        plan: the step.

    Returns:
        The layout; `sample_rows` and `prompt` are None when no request scores its prompt (the common case).
    """
    plain = [1 if sample else 0 for sample in plan.needs_sample]
    if not any(scores_prompt(state) for state in rows):
        return LogitsLayout(num_outputs=plain, sample_rows=None, prompt=None)
    num_outputs, sample_rows = [], []
    prompt = PromptRows([], [], [], [], 0, [], [])
    offset = 0
    for state, start, num_new, sample in zip(rows, plan.num_computed_tokens, plan.num_new_tokens, plan.needs_sample):
        if not scores_prompt(state):
            num_outputs.append(1 if sample else 0)
            offset += num_outputs[-1]
            if sample:
                sample_rows.append(offset - 1)
            continue
        num_outputs.append(num_new)
        num_scored = min(num_new, len(state.prompt_token_ids) - 1 - start)
        assert state.params.prompt_logprobs is not None  # scores_prompt
        prompt.request_ids.append(state.request_id)
        prompt.first_tokens.append(start + 1)
        prompt.num_tokens.append(num_scored)
        prompt.num_top_wanted.append(state.params.prompt_logprobs)
        prompt.num_top = max(prompt.num_top, state.params.prompt_logprobs)
        prompt.logits_rows.extend(range(offset, offset + num_scored))
        prompt.target_ids.extend(state.prompt_token_ids[start + 1 : start + 1 + num_scored])
        offset += num_new
        if sample:
            sample_rows.append(offset - 1)
    return LogitsLayout(num_outputs=num_outputs, sample_rows=sample_rows, prompt=prompt)


def score_prompt_tokens(logits: torch.Tensor, prompt: PromptRows) -> list[torch.Tensor]:
    """Logprob, rank and top alternatives of each scored token, on the logits' device (nothing waits).

    Args:
        logits: [num_outputs, vocab] float32, the forward pass's raw logits (read only).
        prompt: the rows to score.

    Returns:
        [chosen [M] float32, rank [M] int64, top_logprobs [M, k] float32, top_ids [M, k] int64], M scored tokens.
    """
    device = logits.device
    rows = torch.tensor(prompt.logits_rows, dtype=torch.int64).to(device, non_blocking=True)
    targets = torch.tensor(prompt.target_ids, dtype=torch.int64).to(device, non_blocking=True)
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    for begin in range(0, rows.numel(), ROWS_PER_SLICE):
        logprobs = logits[rows[begin : begin + ROWS_PER_SLICE]].log_softmax(dim=-1)
        chosen = logprobs.gather(1, targets[begin : begin + ROWS_PER_SLICE].unsqueeze(1))
        rank = (logprobs > chosen).sum(dim=-1) + 1
        top_logprobs, top_ids = logprobs.topk(prompt.num_top, dim=-1)
        for part, value in zip(parts, (chosen.squeeze(1), rank, top_logprobs, top_ids)):
            part.append(value)
    if not parts[0]:  # no token scored (chunks of the prompt's last token only)
        empty = logits.new_empty((0, prompt.num_top))
        return [empty[:, 0], empty[:, 0].long(), empty, empty.long()]
    return [torch.cat(part) for part in parts]


def prompt_chunks(prompt: PromptRows, host: list[torch.Tensor]) -> dict[str, PromptLogprobsChunk]:
    """The scored tokens, on the host, per request.

    Args:
        prompt: the rows that were scored.
        host: score_prompt_tokens' tensors, copied to the host.

    Returns:
        request id -> its chunk of prompt logprobs.
    """
    chosen, rank, top_logprobs, top_ids = (tensor.tolist() for tensor in host)
    chunks, flat = {}, 0
    for request_id, first_token, count, wanted in zip(prompt.request_ids, prompt.first_tokens, prompt.num_tokens,
                                                      prompt.num_top_wanted):
        entries = []
        for index in range(flat, flat + count):
            top = dict(zip(top_ids[index][:wanted], top_logprobs[index][:wanted]))
            entries.append(TokenLogprob(token_id=prompt.target_ids[index], logprob=chosen[index], top=top,
                                        rank=rank[index]))
        chunks[request_id] = PromptLogprobsChunk(first_token=first_token, logprobs=entries)
        flat += count
    return chunks
