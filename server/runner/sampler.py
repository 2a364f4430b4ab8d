"""Batched sampling on the engine's device with per-request parameters as tensors.

Order of operations on the float32 logits [num_requests, vocab_size]:

    1. min_tokens: EOS and stop ids -> -inf while a request has fewer than min_tokens outputs;
       logit_bias added; grammar bitmasks (structured output) -> -inf for tokens the grammar forbids
       (each only on the rows that asked for it)
    1b. beam rows (beam search): log_softmax of these logits, and the most likely tokens per row;
       nothing below applies to them (they are greedy rows for the rest)
    2. penalties: repetition (prompt + output tokens), frequency and presence (output tokens)
    3. greedy rows (temperature 0): exact argmax here, nothing below changes them
    4. temperature: logits / temperature
    5. logprobs, logprobs_mode "processed_logprobs": log_softmax of these logits (after masks, bias,
       penalties and temperature, before any truncation, so alternatives outside top-k/top-p still get
       a finite value; greedy rows use temperature 1). "raw_logprobs" (the default, as vLLM's): the
       log_softmax of the model's logits as they came, before step 1.
    6. min_p, then top_k and top_p: tokens outside -> -inf
    7. sample: argmax(probs / q) with q ~ Exponential(1) (the exponential race, equivalent to drawing
       from probs). A request with a seed draws its q from its own torch.Generator, so its tokens do
       not depend on what else is batched; the others share one draw.

Nothing loops over the vocabulary in Python; only the seeded noise draw goes row by row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.engine_config import LOGPROBS_MODES

_NEG_INF = float("-inf")


@dataclass(slots=True)
class SamplingTensors:
    """Per-request parameters of one batch, one row per request, on the logits' device."""

    temperature: torch.Tensor  # [B] float32; 0 marks a greedy row
    top_k: torch.Tensor | None  # [B] int64 in 1..vocab (vocab = keep all); None when no row uses top-k
    top_p: torch.Tensor | None  # [B] float32 in (0, 1]; None when no row uses top-p
    min_p: torch.Tensor | None  # [B] float32 in [0, 1]; None when no row uses min-p
    presence_penalty: torch.Tensor | None  # [B] float32; None when no row uses penalties
    frequency_penalty: torch.Tensor | None  # [B] float32; None with presence_penalty
    repetition_penalty: torch.Tensor | None  # [B] float32 (1.0 = off); None with presence_penalty
    output_token_ids: torch.Tensor | None  # [B, max_out] int64, padded with vocab_size; for penalties
    prompt_token_ids: torch.Tensor | None  # [B, max_prompt] int64, padded with vocab_size; for repetition
    masked_rows: torch.Tensor | None  # [M] int64 rows of (row, token) pairs to set to -inf (min_tokens)
    masked_token_ids: torch.Tensor | None  # [M] int64 tokens of those pairs
    generators: dict[int, torch.Generator]  # row -> the seeded request's generator
    num_logprobs: list[int | None]  # per row: top alternatives wanted, None = no logprobs
    all_greedy: bool  # every row has temperature 0 (known on the host, so no device sync)
    bias_rows: torch.Tensor | None = None  # [M] int64 rows of (row, token, bias) triples of logit_bias
    bias_token_ids: torch.Tensor | None = None  # [M] int64 tokens of those triples
    bias_values: torch.Tensor | None = None  # [M] float32 biases added to those logits
    grammar_rows: torch.Tensor | None = None  # [G] int64 rows constrained by a grammar; None when none
    grammar_bitmask: torch.Tensor | None = None  # [G, ceil(vocab / 32)] int32, bit set = token allowed
    beam_rows: torch.Tensor | None = None  # [R] int64 rows of beam search beams; None when none
    num_beam_tokens: int = 0  # most likely tokens reported per beam row


@dataclass(slots=True)
class SamplerOutput:
    """Sampled tokens and logprobs, still on the device (the runner copies them to the host once)."""

    sampled_token_ids: torch.Tensor  # [B] int64
    chosen_logprobs: torch.Tensor | None  # [B] float32 logprob of each sampled token; None if no row asked
    top_token_ids: torch.Tensor | None  # [B, N] int64 most likely tokens, N = largest request for logprobs
    top_logprobs: torch.Tensor | None  # [B, N] float32 their logprobs
    beam_token_ids: torch.Tensor | None = None  # [R, W] int64 most likely tokens of each beam row, best first
    beam_logprobs: torch.Tensor | None = None  # [R, W] float32 their logprobs
    nonfinite_rows: torch.Tensor | None = None  # [B] bool: the row's logits held NaN or +inf (its token is noise)

    def tensors(self) -> list[torch.Tensor | None]:
        """Every field, in declaration order (what the runner copies to the host)."""
        return [self.sampled_token_ids, self.chosen_logprobs, self.top_token_ids, self.top_logprobs,
                self.beam_token_ids, self.beam_logprobs, self.nonfinite_rows]


def apply_masks_and_bias(logits: torch.Tensor, tensors: SamplingTensors) -> None:
    """min_tokens masks, logit_bias and grammar bitmasks, in place, each only on the rows that use it."""
    if tensors.masked_rows is not None:
        logits[tensors.masked_rows, tensors.masked_token_ids] = _NEG_INF
    if tensors.bias_rows is not None:
        assert tensors.bias_token_ids is not None and tensors.bias_values is not None  # set with bias_rows
        logits.index_put_((tensors.bias_rows, tensors.bias_token_ids), tensors.bias_values, accumulate=True)
    if tensors.grammar_rows is not None:
        assert tensors.grammar_bitmask is not None  # set with grammar_rows
        vocab = logits.shape[-1]
        bits = torch.arange(32, device=logits.device, dtype=torch.int32)
        allowed = ((tensors.grammar_bitmask.unsqueeze(-1) >> bits) & 1).bool().flatten(1)[:, :vocab]
        rows = logits[tensors.grammar_rows]
        logits[tensors.grammar_rows] = rows.masked_fill(~allowed, _NEG_INF)


def apply_penalties(logits: torch.Tensor, tensors: SamplingTensors) -> torch.Tensor:
    """Repetition, frequency and presence penalties, in place (vLLM's definitions).

    Repetition divides positive logits and multiplies negative ones of every token seen in the prompt
    or output; frequency subtracts penalty x count of the token in the output; presence subtracts the
    penalty once for any token present in the output.
    """
    if tensors.presence_penalty is None:
        return logits
    # All set together (SamplingParams.uses_penalties).
    assert tensors.output_token_ids is not None and tensors.prompt_token_ids is not None
    assert tensors.repetition_penalty is not None and tensors.frequency_penalty is not None
    num_rows, vocab = logits.shape
    counts = torch.zeros(num_rows, vocab + 1, dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, tensors.output_token_ids, torch.ones_like(tensors.output_token_ids, dtype=logits.dtype))
    counts = counts[:, :vocab]
    seen = torch.zeros(num_rows, vocab + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, tensors.prompt_token_ids, True)
    seen = seen[:, :vocab] | (counts > 0)
    repetition = tensors.repetition_penalty.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalized, logits)
    logits -= tensors.frequency_penalty.unsqueeze(1) * counts
    logits -= tensors.presence_penalty.unsqueeze(1) * (counts > 0).to(logits.dtype)
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p x the most likely token's."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, _NEG_INF)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Keep each row's top_k most likely tokens, then the smallest set whose mass reaches top_p.

    Tokens tied with the k-th most likely are kept too. At least one token is always kept.
    """
    if top_k is None and top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    vocab = logits.shape[-1]
    if top_k is not None:
        kth = sorted_logits.gather(1, (vocab - top_k).clamp(0, vocab - 1).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, _NEG_INF)
    if top_p is not None:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p).unsqueeze(1)
        drop[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(drop, _NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def exponential_noise(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """q ~ Exponential(1) per entry; rows with a generator draw from it (one draw of vocab_size each)."""
    noise = torch.empty_like(probs).exponential_()
    for row, generator in generators.items():
        noise[row].exponential_(generator=generator)
    return noise


class Sampler:
    """Chooses one token per row of logits (see the module docstring for the order of operations)."""

    def __init__(self, logprobs_mode: str = "raw_logprobs"):
        """Args: logprobs_mode: what returned logprobs are: "raw_logprobs" (the model's) or "processed_logprobs"
        (of the distribution sampled from, before top-k/top-p/min-p)."""
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode {logprobs_mode!r} must be one of {', '.join(LOGPROBS_MODES)}")
        self.logprobs_mode = logprobs_mode

    def __call__(self, logits: torch.Tensor, tensors: SamplingTensors) -> SamplerOutput:
        """Sample a batch.

        Args:
            logits: [B, vocab] float32 (modified in place).
            tensors: the batch's parameters.

        Returns:
            Sampled ids [B] and, when any row asked, logprobs — all on logits' device.
        """
        wants_logprobs = any(n is not None for n in tensors.num_logprobs)
        raw_logprobs = None
        if wants_logprobs and self.logprobs_mode == "raw_logprobs":
            raw_logprobs = logits.log_softmax(dim=-1)  # a new tensor: what follows changes logits in place
        apply_masks_and_bias(logits, tensors)
        beam_logprobs = beam_ids = None
        if tensors.beam_rows is not None:
            beam_logprobs, beam_ids = (
                logits[tensors.beam_rows].log_softmax(dim=-1).topk(tensors.num_beam_tokens, dim=-1)
            )
        logits = apply_penalties(logits, tensors)
        row_max, greedy_ids = logits.max(dim=-1)  # max propagates NaN, so it also tells which rows hold NaN or +inf
        nonfinite = (row_max < float("inf")).logical_not()  # those requests fail alone, not the whole step
        greedy = None if tensors.all_greedy else tensors.temperature == 0
        if greedy is None:
            sampled = greedy_ids
        else:
            logits = logits / torch.where(greedy, 1.0, tensors.temperature).unsqueeze(1)
        logprobs = raw_logprobs
        if wants_logprobs and logprobs is None:
            logprobs = logits.log_softmax(dim=-1)
        if not tensors.all_greedy:
            if tensors.min_p is not None:
                logits = apply_min_p(logits, tensors.min_p)
            logits = apply_top_k_top_p(logits, tensors.top_k, tensors.top_p)
            probs = logits.softmax(dim=-1)
            random_ids = (probs / exponential_noise(probs, tensors.generators)).argmax(dim=-1)
            assert greedy is not None  # set unless all_greedy
            sampled = torch.where(greedy, greedy_ids, random_ids)
        if logprobs is None:
            return SamplerOutput(sampled, None, None, None, beam_ids, beam_logprobs, nonfinite)
        chosen = logprobs.gather(1, sampled.unsqueeze(1)).squeeze(1)
        num_top = max(n or 0 for n in tensors.num_logprobs)
        top_logprobs, top_ids = logprobs.topk(num_top, dim=-1) if num_top else (None, None)
        return SamplerOutput(sampled, chosen, top_ids, top_logprobs, beam_ids, beam_logprobs, nonfinite)
