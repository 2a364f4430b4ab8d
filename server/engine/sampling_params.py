"""Per-request generation parameters, validated once when the request is created."""

from __future__ import annotations

from dataclasses import dataclass, field


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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
