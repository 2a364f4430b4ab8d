"""Per-request generation parameters, validated once when the request is created."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from server.engine.errors import InvalidRequest

MAX_LOGIT_BIAS = 100.0  # |bias| at most, as in OpenAI's API
# length_penalty in [-10, 10]: num_tokens ** 10 stays finite for any num_tokens below 2**102 (1e308 overflowed).
MIN_LENGTH_PENALTY, MAX_LENGTH_PENALTY = -10.0, 10.0


@dataclass(slots=True)
class BeamSearchParams:
    """Beam search instead of sampling, with the meanings transformers' generate(num_beams=...) gives."""

    num_beams: int  # beams kept after every step (the API's best_of)
    num_return: int = 1  # best finished beams returned (the API's n), at most num_beams
    length_penalty: float = 1.0  # a finished beam scores sum(logprobs) / num_generated_tokens ** length_penalty
    early_stopping: bool | Literal["never"] = (
        False  # True: stop once num_beams beams finished; False: heuristic; "never"
    )

    def num_candidates(self, num_stop_ids: int) -> int:
        """Continuations kept per step, K = max(2, 1 + #stop ids) x num_beams: enough that num_beams never end."""
        return max(2, 1 + num_stop_ids) * self.num_beams

    def validate(self) -> None:
        """Raise InvalidRequest naming the first parameter out of range."""
        if self.num_beams < 1:
            raise InvalidRequest(f"best_of={self.num_beams} (the beam width) must be at least 1", "best_of")
        if not 1 <= self.num_return <= self.num_beams:
            raise InvalidRequest(f"n={self.num_return} must be in [1, best_of={self.num_beams}] with beam search", "n")
        if not MIN_LENGTH_PENALTY <= self.length_penalty <= MAX_LENGTH_PENALTY:  # False for NaN too
            raise InvalidRequest(f"length_penalty={self.length_penalty!r} must be in [{MIN_LENGTH_PENALTY:g}, "
                                 f"{MAX_LENGTH_PENALTY:g}]", "length_penalty")
        if self.early_stopping not in (True, False, "never"):
            raise InvalidRequest(f"early_stopping={self.early_stopping!r} must be true, false or \"never\"",
                                 "early_stopping")


@dataclass(slots=True)
class StructuredOutputParams:
    """A grammar the generated text must follow (compiled by server/engine/core/structured_output.py)."""

    kind: Literal["json_object", "json_schema"]  # any JSON object, or JSON valid against `json_schema`
    json_schema: dict[str, Any] | None = None  # the JSON Schema, for kind "json_schema"


@dataclass(slots=True)
class SamplingParams:
    """How to choose the tokens of one completion (one of `n` choices)."""

    max_tokens: int = 16  # new tokens at most
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus mass kept; 1.0 keeps all
    top_k: int | None = None  # keep the k most likely tokens; None keeps all
    min_p: float = 0.0  # drop tokens below min_p * p(most likely)
    seed: int | None = None  # per-request generator; same tokens whatever else is batched
    stop: list[str] = field(default_factory=list)  # stop strings; never emitted
    stop_token_ids: list[int] = field(default_factory=list)  # extra ids that end generation
    ignore_eos: bool = False  # keep going past the model's EOS ids
    min_tokens: int = 0  # EOS and stop ids are masked until this many tokens exist
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # number of top alternatives to return per token; None = no logprobs
    prompt_logprobs: int | None = None  # alternatives per prompt token: the prompt is scored too; None = not
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit, in [-100, 100]
    beam_search: BeamSearchParams | None = None  # beam search instead of sampling; None samples
    structured_output: StructuredOutputParams | None = None  # grammar the output must follow; None = free text
    cache_salt: str | None = None  # prefix-cache blocks are shared only between requests with the same salt

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        """True if presence, frequency or repetition penalties change the logits."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def needs_host_tokens(self) -> bool:
        """True if each step can be planned only once the previous step's tokens are on the host (beam search,
        a grammar, penalties over the output so far): no async scheduling while such a request runs."""
        return self.beam_search is not None or self.structured_output is not None or self.uses_penalties

    def stop_ids(self, eos_token_ids: Iterable[int]) -> set[int]:
        """Token ids that end this request: its stop_token_ids, and the model's EOS ids unless ignore_eos."""
        return set(self.stop_token_ids) | (set() if self.ignore_eos else set(eos_token_ids))

    def num_beam_row_tokens(self, eos_token_ids: Iterable[int]) -> int:
        """Most likely tokens the runner reports per beam row of this beam search request: its candidates, and
        the logprob alternatives."""
        assert self.beam_search is not None
        return max(self.beam_search.num_candidates(len(self.stop_ids(eos_token_ids))), self.logprobs or 0)

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise InvalidRequest naming the first parameter out of range.

        Args:
            vocab_size: the model's vocabulary size, to check token ids (None skips that check).
        """
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be at least 1"),
            ("temperature", 0 <= self.temperature < math.inf, "must be finite and >= 0 (0 means greedy)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k is None or self.top_k >= 1, "must be at least 1 (or null to keep all tokens)"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("repetition_penalty", 0 < self.repetition_penalty < math.inf, "must be finite and > 0 (1: no penalty)"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, f"must be in [0, max_tokens={self.max_tokens}]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "must be in [0, 20]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise InvalidRequest(f"{name}={getattr(self, name)!r} {rule}", name)
        for token, bias in self.logit_bias.items():
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise InvalidRequest(f"logit_bias of token {token} is {bias}; biases must be in [-100, 100]",
                                     "logit_bias")
        if vocab_size is not None:
            for name, tokens in (("stop_token_ids", self.stop_token_ids), ("logit_bias", list(self.logit_bias))):
                for token in tokens:
                    if not 0 <= token < vocab_size:
                        raise InvalidRequest(
                            f"{name} contains token id {token}, outside the vocabulary [0, {vocab_size})", name)
        if self.structured_output is not None:
            for name in ("min_tokens", "stop", "stop_token_ids"):
                if getattr(self, name):
                    raise InvalidRequest(f"{name} cannot be combined with response_format: the grammar decides where "
                                         "the output ends", name)
        if self.beam_search is not None:
            self.beam_search.validate()
            self._validate_beam_search()

    def _validate_beam_search(self) -> None:
        """Refuse, naming it, each parameter that beam search cannot honour."""
        unsupported = [
            ("stop", bool(self.stop), "stop strings; use stop_token_ids"),
            ("top_p", self.top_p != 1.0, "top_p"),
            ("top_k", self.top_k is not None, "top_k"),
            ("min_p", self.min_p != 0.0, "min_p"),
            ("presence_penalty", self.presence_penalty != 0.0, "presence_penalty"),
            ("frequency_penalty", self.frequency_penalty != 0.0, "frequency_penalty"),
            ("repetition_penalty", self.repetition_penalty != 1.0, "repetition_penalty"),
            ("response_format", self.structured_output is not None, "structured output (response_format)"),
            ("prompt_logprobs", self.prompt_logprobs is not None, "prompt logprobs (echo with logprobs)"),
        ]
        for name, used, what in unsupported:
            if used:
                raise InvalidRequest(f"beam search does not support {what}; remove '{name}' or turn beam search off",
                                     name)
