"""What every request must satisfy, whatever else is running: known once the engine is loaded and its KV
cache sized, so the API process can refuse a request at once (a 400), in the engine's process or not."""

from __future__ import annotations

from dataclasses import dataclass

from engine_builder.arithmetic import ceil_div
from server.engine.errors import InvalidRequest
from server.engine.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """The engine's fixed limits (picklable: the engine core process sends them to the API process)."""

    vocab_size: int  # token ids must be below it
    max_model_len: int  # prompt + output tokens per request
    max_num_seqs: int  # sequences running at once (a beam search needs its width)
    num_kv_blocks: int  # blocks in the KV pool
    block_size: int  # tokens per KV block
    eos_token_ids: tuple[int, ...]  # the model's EOS ids (they end beams unless ignore_eos)
    has_tokenizer: bool  # stop strings need one

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequest (naming the parameter) if the request is malformed or could never run.

        Args:
            prompt_token_ids: the prompt.
            params: its sampling parameters (a response_format grammar is compiled by the engine, not here).
        """
        params.validate(self.vocab_size)
        if params.stop and not self.has_tokenizer:
            raise InvalidRequest("stop strings need a tokenizer and this model has none; use stop_token_ids", "stop")
        bad = next((t for t in prompt_token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"prompt token id {bad} is outside the vocabulary [0, {self.vocab_size})", "prompt")
        num_beams = 1
        if params.beam_search is not None:
            num_beams = params.beam_search.num_beams
            stop_ids = params.stop_ids(self.eos_token_ids)
            if params.beam_search.num_candidates(len(stop_ids)) > self.vocab_size:
                raise InvalidRequest(f"best_of={num_beams} is too large for a vocabulary of {self.vocab_size} tokens",
                                     "best_of")
        self.check_fits(len(prompt_token_ids), params.max_tokens, num_beams)

    def check_fits(self, num_prompt_tokens: int, max_tokens: int, num_beams: int = 1) -> None:
        """check_fits against these limits."""
        check_fits(num_prompt_tokens, max_tokens, num_beams, max_num_seqs=self.max_num_seqs,
                   max_model_len=self.max_model_len, num_kv_blocks=self.num_kv_blocks, block_size=self.block_size)


def check_fits(num_prompt_tokens: int, max_tokens: int, num_beams: int, *, max_num_seqs: int, max_model_len: int,
               num_kv_blocks: int, block_size: int) -> None:
    """Raise InvalidRequest if a request of this size could never run, whatever else is running.

    Args:
        num_prompt_tokens: prompt length.
        max_tokens: tokens it may generate.
        num_beams: sequences it runs at once (its beam width; 1 without beam search).
        max_num_seqs, max_model_len, num_kv_blocks, block_size: the engine's limits.
    """
    if num_beams > max_num_seqs:
        raise InvalidRequest(
            f"beam search with best_of={num_beams} needs {num_beams} sequences at once but the server runs at "
            f"most {max_num_seqs} (max_num_seqs); lower best_of", "best_of")
    if num_prompt_tokens < 1:
        raise InvalidRequest("prompt must contain at least one token", "prompt")
    total = num_prompt_tokens + max_tokens
    if total > max_model_len:
        raise InvalidRequest(
            f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total} exceeds the "
            f"model's maximum context length {max_model_len}; shorten the prompt or lower max_tokens", "max_tokens")
    # The last sampled token is never fed back, so at most total - 1 tokens need KV slots.
    num_blocks = ceil_div(total - 1, block_size) * num_beams
    if num_blocks > num_kv_blocks:
        capacity = num_kv_blocks * block_size
        beams = f" x {num_beams} beams" if num_beams > 1 else ""
        raise InvalidRequest(
            f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}){beams} needs {num_blocks} KV blocks "
            f"but the whole cache has {num_kv_blocks} ({capacity} tokens); "
            "lower max_tokens or give the server more KV cache", "max_tokens")
