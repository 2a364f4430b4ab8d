"""Structured output: JSON grammars compiled with xgrammar, one matcher per constrained request.

    response_format ──compile()──▶ CompiledGrammar (cached by xgrammar per schema)
    add_request() ──▶ GrammarMatcher per request
    each step:  bitmask(ids) ──▶ [G, ceil(vocab / 32)] int32, bit set = token allowed ──▶ sampler masks logits
                accept(id, sampled token) ──▶ True once the JSON is complete (the request stops: "stop")

Matchers terminate as soon as the grammar is complete, without waiting for an EOS token, so the
generated text is exactly the JSON document. Only requests that asked for structured output have a
matcher; everyone else's logits are never touched.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch

from server.engine.errors import InvalidRequest
from server.engine.sampling_params import StructuredOutputParams

_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")  # xgrammar's C++ prefix


class StructuredOutputManager:
    """Compiles grammars for one tokenizer and tracks the grammar state of each constrained request."""

    def __init__(self, tokenizer: Any | None, vocab_size: int, eos_token_ids: list[int]):
        """Set up; the xgrammar compiler is built on first use.

        Args:
            tokenizer: the model's transformers tokenizer (None: structured output is refused).
            vocab_size: the model's vocabulary size (the logits' width; may exceed the tokenizer's).
            eos_token_ids: the model's end-of-sequence ids.
        """
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self._compiler: Any | None = None
        self._matchers: dict[str, Any] = {}  # request id -> xgrammar.GrammarMatcher

    def compile(self, params: StructuredOutputParams) -> Any:
        """Compile a response format into an xgrammar CompiledGrammar.

        Args:
            params: json_object, or json_schema with its schema.

        Returns:
            The compiled grammar. Raises InvalidRequest naming the problem when the schema cannot be compiled.
        """
        if self.tokenizer is None:
            raise InvalidRequest("structured output (response_format) needs a tokenizer and this model has none",
                                 "response_format")
        schema = {"type": "object"} if params.kind == "json_object" else params.json_schema
        if not isinstance(schema, dict):
            raise InvalidRequest("response_format json_schema needs a 'schema' object", "response_format")
        try:
            return self._get_compiler().compile_json_schema(json.dumps(schema), any_whitespace=False)
        except Exception as error:  # xgrammar raises RuntimeError (C++ checks) and its own error types
            message = _LOCATION.sub("", str(error).strip().splitlines()[0] if str(error).strip() else repr(error))
            raise InvalidRequest(f"response_format: the JSON schema cannot be used: {message}",
                                 "response_format") from None

    def add_request(self, request_id: str, params: StructuredOutputParams) -> None:
        """Start tracking a request's grammar state (InvalidRequest if its schema cannot be compiled)."""
        import xgrammar

        self._matchers[request_id] = xgrammar.GrammarMatcher(self.compile(params), terminate_without_stop_token=True)

    def remove_request(self, request_id: str) -> None:
        """Forget a finished request (unknown ids are ignored)."""
        self._matchers.pop(request_id, None)

    def has_request(self, request_id: str) -> bool:
        return request_id in self._matchers

    def bitmask(self, request_ids: list[str]) -> tuple[torch.Tensor, dict[str, Exception]]:
        """The allowed next tokens of each request, as a host bitmask.

        Args:
            request_ids: tracked requests, in the order of the rows wanted.

        Returns:
            [len(request_ids), ceil(vocab_size / 32)] int32; bit t of a row set = token t allowed. And the
            requests whose grammar failed to fill its row (by id), which must end: their rows allow every token.
        """
        import xgrammar

        mask = xgrammar.allocate_token_bitmask(len(request_ids), self.vocab_size)
        failures: dict[str, Exception] = {}
        for row, request_id in enumerate(request_ids):
            try:
                self._matchers[request_id].fill_next_token_bitmask(mask, row)
            except Exception as error:
                failures[request_id] = error
                mask[row] = -1
        return mask, failures

    def accept(self, request_id: str, token_id: int) -> bool:
        """Advance a request's grammar by its sampled token.

        Args:
            request_id: a tracked request.
            token_id: the token it just generated (always one its bitmask allowed).

        Returns:
            True when the grammar is complete: the request must stop here.
        """
        matcher = self._matchers[request_id]
        if not matcher.accept_token(token_id):
            raise RuntimeError(
                f"request {request_id!r}: token {token_id} is not allowed by its response_format grammar"
            )
        return matcher.is_terminated()

    def prepare(self) -> None:
        """Build the grammar compiler now: its tokenizer table takes a while for large vocabularies, and the
        first response_format request would otherwise build it on the server's event loop."""
        if self.tokenizer is not None:
            self._get_compiler()

    def _get_compiler(self) -> Any:
        if self._compiler is None:
            import xgrammar

            assert self.tokenizer is not None, "structured output is refused without a tokenizer"

            info = xgrammar.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.eos_token_ids or None
            )
            self._compiler = xgrammar.GrammarCompiler(info, max_threads=2)
        return self._compiler
