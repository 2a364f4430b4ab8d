"""Token ids -> streamed text, and the decision of when a request stops.

Incremental detokenization: a byte-level BPE token can be part of a multi-byte UTF-8 character, so
the text of the newest tokens is only emitted once it decodes without a trailing replacement
character. Two offsets into the token list keep the decode window short:

    tokens:  ... | prefix_offset ...... | read_offset ...... |
                   already emitted text   not yet emitted

    new text = decode(tokens[prefix_offset:]) minus decode(tokens[prefix_offset:read_offset])

Stop strings: no part of a stop string is ever emitted. Text that could be the start of a stop
string is held back until it is clear it is not; when a stop string appears, the text is cut
before it and the request finishes with reason "stop". min_tokens delays EOS and stop_token_ids only
(the sampler masks them too); stop strings apply from the first token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.engine.outputs import FinishReason
from server.engine.sampling_params import SamplingParams

# Prompt tokens used as left context, so the first generated token decodes with its leading space.
NUM_PROMPT_CONTEXT_TOKENS = 5


def _fast_decode(tokenizer: Any | None) -> Any | None:
    """The Rust backend's decode when it gives the same text as tokenizer.decode (no clean-up of spaces):
    it skips transformers' per-call Python conversions, which dominate the engine's per-token host time."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return tokenizer.decode
    return backend.decode


@dataclass(slots=True)
class DetokenizerUpdate:
    """The result of adding one token."""

    new_text: str  # text that became final with this token (may be empty)
    finish_reason: FinishReason | None  # STOP or LENGTH when the request ends with this token, else None


class IncrementalDetokenizer:
    """Per-request text state: turns each new token into final text and checks stop conditions."""

    def __init__(
        self,
        tokenizer: Any | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: list[int],
        max_model_len: int | None = None,
    ):
        """Start with no output.

        Args:
            tokenizer: a transformers tokenizer, or None (then no text is produced; stop strings are refused
                earlier by validation).
            prompt_token_ids: the prompt (its tail gives the first token its left context).
            params: the request's stop conditions (stop, stop_token_ids, ignore_eos, min_tokens, max_tokens).
            eos_token_ids: the model's end-of-sequence ids.
            max_model_len: prompt + output at most; reaching it finishes with "length".
        """
        self.tokenizer = tokenizer
        self._decode = _fast_decode(tokenizer)
        self.params = params
        self._stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self._stop_ids.update(eos_token_ids)
        self._max_output = params.max_tokens
        if max_model_len is not None:
            self._max_output = min(self._max_output, max_model_len - len(prompt_token_ids))
        context = prompt_token_ids[-NUM_PROMPT_CONTEXT_TOKENS:]
        self._tokens = list(context)  # prompt context + output tokens
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._num_output = 0
        self._text = ""  # decoded output text not yet emitted, plus held back stop-string prefixes
        self._max_stop_len = max((len(s) for s in params.stop), default=0)

    def add_token(self, token_id: int) -> DetokenizerUpdate:
        """Take the next generated token.

        Args:
            token_id: the token just sampled.

        Returns:
            The newly final text and, if the request ends here, why.
        """
        self._num_output += 1
        if token_id in self._stop_ids and self._num_output > self.params.min_tokens:
            return self._end(FinishReason.STOP)  # the stop token's own text is not emitted
        self._text += self._decode_next(token_id)
        stop_at = self._find_stop()
        if stop_at is not None:
            text, self._text = self._text[:stop_at], ""
            return DetokenizerUpdate(new_text=text, finish_reason=FinishReason.STOP)
        if self._num_output >= self._max_output:
            return self._end(FinishReason.LENGTH)
        return DetokenizerUpdate(new_text=self._take_final_text(), finish_reason=None)

    def finish(self) -> str:
        """Text still held back, when the request ends for a reason outside this object (e.g. abort)."""
        return self._end(FinishReason.ABORT).new_text

    def _end(self, reason: FinishReason) -> DetokenizerUpdate:
        """Emit everything held back (an incomplete character too), still cut at a stop string it completes."""
        self._text = self._flush()
        stop_at = self._find_stop()
        if stop_at is not None:
            text, self._text = self._text[:stop_at], ""
            return DetokenizerUpdate(new_text=text, finish_reason=FinishReason.STOP)
        text, self._text = self._text, ""
        return DetokenizerUpdate(new_text=text, finish_reason=reason)

    def _decode_next(self, token_id: int) -> str:
        self._tokens.append(token_id)
        if self.tokenizer is None:
            return ""
        decode = self._decode
        assert decode is not None  # _fast_decode gives one for every tokenizer
        prefix = decode(self._tokens[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full = decode(self._tokens[self._prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._tokens)
            return full[len(prefix) :]
        return ""

    def _flush(self) -> str:
        """Everything not yet emitted, including a trailing incomplete character (as U+FFFD)."""
        text = self._text
        if self.tokenizer is not None and self._read_offset < len(self._tokens):
            decode = self._decode
            assert decode is not None  # _fast_decode gives one for every tokenizer
            prefix = decode(self._tokens[self._prefix_offset : self._read_offset], skip_special_tokens=True)
            full = decode(self._tokens[self._prefix_offset :], skip_special_tokens=True)
            text += full[len(prefix) :]
            self._prefix_offset = self._read_offset = len(self._tokens)
        self._text = ""
        return text

    def _find_stop(self) -> int | None:
        """Index in the pending text where the earliest stop string begins, or None."""
        if not self.params.stop:
            return None
        hits = [i for i in (self._text.find(stop) for stop in self.params.stop) if i >= 0]
        return min(hits) if hits else None

    def _take_final_text(self) -> str:
        """Emit the pending text except a tail that could still grow into a stop string."""
        hold = 0
        for stop in self.params.stop:
            for length in range(min(len(stop) - 1, len(self._text)), hold, -1):
                if self._text.endswith(stop[:length]):
                    hold = length
                    break
        end = len(self._text) - hold
        text, self._text = self._text[:end], self._text[end:]
        return text
