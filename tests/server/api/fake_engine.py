"""A stand-in for the engine client (server/engine/protocol.py's EngineClient): fast, deterministic, no model.

It "generates" token ids from a fixed rule (greedy: depends on the prompt only; sampled: on the seed
too), detokenizes the whole output each step, holds back text that could begin a stop string and cuts
at a stop string, like the real engine's detokenizer promises.
"""

from __future__ import annotations

import asyncio
from typing import Any

from server.engine.outputs import FinishReason, RequestOutput, TokenLogprob
from server.engine.sampling_params import SamplingParams


class FakeEngine:
    def __init__(self, tokenizer: Any, max_model_len: int = 128, delay: float = 0.0) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.num_kv_blocks = 64
        self.block_size = 16
        self.is_running = False
        self.delay = delay  # seconds per token, to let tests disconnect mid-stream
        self.active: set[str] = set()  # request ids being generated
        self.aborted: list[str] = []  # request ids whose consumer went away
        self.ending = False  # abort_all/end_streams: every stream ends with "abort" at its next token
        self.vocab = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]

    @property
    def num_running(self) -> int:
        return len(self.active)

    @property
    def num_waiting(self) -> int:
        return 0

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.active)

    async def start(self) -> None:
        self.is_running = True

    def abort_all(self) -> int:
        self.ending = True
        return len(self.active)

    def end_streams(self) -> int:
        return self.abort_all()

    async def shutdown(self) -> None:
        self.is_running = False

    def next_token(self, prompt: list[int], generated: list[int], params: SamplingParams) -> int:
        salt = 0 if params.greedy or params.seed is None else params.seed * 7919
        return self.vocab[(sum(prompt) * 31 + len(generated) * 17 + salt) % len(self.vocab)]

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"max_tokens={params.max_tokens} does not fit the context of {self.max_model_len}")
        self.active.add(request_id)
        generated: list[int] = []
        sent = ""  # text emitted so far
        hold = max((len(stop) - 1 for stop in params.stop), default=0)
        reason: FinishReason | None = None
        try:
            while True:
                await asyncio.sleep(self.delay)
                token = self.next_token(prompt_token_ids, generated, params)
                generated.append(token)
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                reason = (FinishReason.LENGTH if len(generated) >= params.max_tokens
                          else FinishReason.ABORT if self.ending else None)
                cut = min((text.find(stop) for stop in params.stop if stop in text), default=None)
                if cut is not None:
                    text, reason = text[:cut], FinishReason.STOP
                final = text if reason else text[: max(len(sent), len(text) - hold)]
                if final.endswith("\ufffd") and not reason:
                    final = final[:-1]
                new_text, sent = final[len(sent):], max(final, sent, key=len)
                logprobs = None
                if params.logprobs is not None:
                    top = {t: -1.0 - i for i, t in enumerate(self.vocab[: params.logprobs])}
                    logprobs = [TokenLogprob(token_id=token, logprob=-0.5, top=top)]
                yield RequestOutput(request_id=request_id, new_token_ids=[token], new_text=new_text,
                                    new_logprobs=logprobs, finished=reason is not None, finish_reason=reason,
                                    num_prompt_tokens=len(prompt_token_ids), num_generated_tokens=len(generated))
                if reason:
                    return
        finally:
            self.active.discard(request_id)
            if reason is None:
                self.aborted.append(request_id)
