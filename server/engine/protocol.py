"""What the API layer needs of the engine: the `EngineClient` protocol it is typed against.

One implementation serves (core_client.EngineCoreClient, its core in a process or a thread); the tests' fake
engine is checked against this protocol too (tests/server/api/test_engine_protocol.py).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, Protocol, runtime_checkable

from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams


@runtime_checkable
class EngineClient(Protocol):
    """The engine as the API layer sees it."""

    tokenizer: Any | None  # the model's transformers tokenizer (chat template, encode, decode); None without one

    @property
    def max_model_len(self) -> int:
        """Prompt + output tokens of one request, at most."""
        ...

    @property
    def num_kv_blocks(self) -> int:
        """The KV cache pool's size, in blocks."""
        ...

    @property
    def block_size(self) -> int:
        """Tokens per KV block."""
        ...

    @property
    def is_running(self) -> bool:
        """True from start() until shutdown or the engine's death: requests are accepted."""
        ...

    @property
    def has_unfinished_requests(self) -> bool:
        """True while any request is in the engine or its stream is open."""
        ...

    async def start(self) -> None:
        """Start serving on the running event loop (the engine loads first if it has not)."""
        ...

    async def shutdown(self) -> None:
        """Stop; every outstanding request ends with finish_reason "abort"."""
        ...

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 ) -> AsyncGenerator[RequestOutput, None]:
        """The request's stream of outputs (see EngineCoreClient.generate for what it raises)."""
        ...

    def abort_all(self) -> int:
        """End every live request with finish_reason "abort" before the next step; returns how many."""
        ...

    def end_streams(self) -> int:
        """End every open stream with finish_reason "abort" now, without the engine; returns how many."""
        ...
