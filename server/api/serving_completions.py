"""POST /v1/completions: prompts in, text out (whole, or streamed as SSE chunks)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import cast

from server.api import decoding
from server.api.choices import ChoiceOutput, ChoiceResult, collect, finish_reason, first_and_rest, usage_of
from server.api.decoding import num_sequences
from server.api.errors import InvalidRequestError
from server.api.logprobs import completion_logprobs, echoed_prompt_logprobs, joined, vllm_prompt_logprobs
from server.api.protocol import (
    APIFinishReason,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
    PromptLogprobs,
    UsageInfo,
)
from server.api.serving import OpenAIServing, PreparedPrompt, stream_error
from server.api.streaming import DONE, TextChunkFormatter, chunk_event, error_event
from server.api.user_text import check_encodable
from server.engine.outputs import TokenLogprob
from server.engine.sampling_params import SamplingParams


def prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The request's `prompt` as a list of prompts, each a string or a list of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequestError("'prompt' must not be an empty list", "prompt")
    # The first element says which kind of list it is (a narrowing pyright cannot make).
    if isinstance(prompt[0], int):
        return [cast("list[int]", prompt)]  # one prompt of token ids
    return [*cast("list[str] | list[list[int]]", prompt)]


class OpenAIServingCompletion:
    """Serves /v1/completions on top of OpenAIServing."""

    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving

    def prepare(self, request: CompletionRequest) -> list[PreparedPrompt]:
        """Check the request and tokenize its prompts; raises APIError/InvalidRequestError (4xx)."""
        check_encodable(request)
        self.serving.check_model(request.model)
        self.serving.check_ready()
        if request.suffix:
            raise InvalidRequestError("'suffix' is not supported", "suffix")
        if request.max_tokens == 0 and not request.echo:
            raise InvalidRequestError("'max_tokens' 0 returns only the prompt, which needs 'echo': true (or ask for "
                                      "at least 1 token)", "max_tokens")
        decoding.best_of_candidates(request)  # checks best_of against n and stream
        max_tokens = 1 if request.max_tokens == 0 else request.max_tokens  # the prompt's one sampled token is dropped
        tokenizer = self.serving.tokenizer
        prompts = []
        for prompt in prompt_list(request.prompt):
            if isinstance(prompt, str):
                token_ids, text = self.serving.prompt_encoder.encode_prompt(prompt), prompt
            else:
                self.serving.check_token_ids(prompt, "prompt")
                token_ids, text = list(prompt), tokenizer.decode(prompt)
            prompts.append(self.serving.prepare_prompt(token_ids, text, max_tokens, "prompt",
                                                       num_sequences=num_sequences(request)))
        return prompts

    def _params(self, request: CompletionRequest) -> Callable[[PreparedPrompt, int], SamplingParams]:
        """(prompt, choice number) -> the SamplingParams of that choice."""

        logprobs = request.logprobs
        if logprobs is None and decoding.best_of_candidates(request) is not None:
            logprobs = 0  # candidates are ranked by their tokens' logprobs
        prompt_logprobs = request.prompt_logprobs
        if request.echo and request.logprobs is not None:  # the echoed prompt's tokens get logprobs too
            prompt_logprobs = max(prompt_logprobs or 0, request.logprobs)

        def params_for(prompt: PreparedPrompt, choice: int) -> SamplingParams:
            return self.serving.sampling_params(request, prompt.max_tokens, choice, logprobs, prompt_logprobs)
        return params_for

    async def create(self, request: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        """Run a completion request.

        Args:
            request: the validated request.

        Returns:
            A CompletionResponse, or (stream=True) an async iterator of SSE strings ending in [DONE].
            Raises APIError / InvalidRequest for bad requests before any output is produced.
        """
        prompts = self.prepare(request)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        params_for = self._params(request)
        for prompt in prompts:  # check every choice's params before starting any engine request
            params_for(prompt, 0)
        outputs = self.serving.generate(request_id, prompts, params_for, request.n,
                                        decoding.best_of_candidates(request))
        if request.stream:
            return self.stream(request, request_id, created, prompts, await first_and_rest(outputs))
        results = await collect(outputs, len(prompts) * request.n)
        if request.max_tokens == 0:
            for result in results:
                prompt_only(result)
        return self.response(request, request_id, created, prompts, results)

    def response(self, request: CompletionRequest, request_id: str, created: int,
                 prompts: list[PreparedPrompt], results: list[ChoiceResult]) -> CompletionResponse:
        """The non-streamed response from the accumulated choices."""
        choices = []
        for result in results:
            prompt = prompts[result.index // request.n]
            prefix = prompt.text if request.echo else ""
            logprobs = None
            if request.logprobs is not None:
                logprobs = completion_logprobs(result.logprobs, self.serving.tokenizer, request.logprobs, len(prefix))
                if request.echo:
                    logprobs = joined(self._echoed_logprobs(request, prompt, result.prompt_logprobs), logprobs)
            choices.append(CompletionResponseChoice(index=result.index, text=prefix + result.text,
                                                    logprobs=logprobs, finish_reason=result.finish_reason,
                                                    prompt_logprobs=self._prompt_logprobs(request, result)))
        return CompletionResponse(id=request_id, created=created, model=self.serving.model_name, choices=choices,
                                  usage=usage_of(results, len(prompts), request.n))

    def _echoed_logprobs(self, request: CompletionRequest, prompt: PreparedPrompt,
                         scored: list[TokenLogprob | None] | None) -> CompletionLogProbs:
        """The echoed prompt's part of the logprobs (echo + logprobs)."""
        assert request.logprobs is not None and scored is not None, "the engine scored the prompt"
        return echoed_prompt_logprobs(prompt.token_ids, scored, self.serving.tokenizer, request.logprobs, prompt.text)

    def _prompt_logprobs(self, request: CompletionRequest, result: ChoiceResult) -> PromptLogprobs | None:
        """vLLM's prompt_logprobs field of a choice, when the request asked for it."""
        if request.prompt_logprobs is None or result.prompt_logprobs is None:
            return None
        return vllm_prompt_logprobs(result.prompt_logprobs, self.serving.tokenizer, request.prompt_logprobs)

    async def stream(self, request: CompletionRequest, request_id: str, created: int,
                     prompts: list[PreparedPrompt], outputs: AsyncGenerator[ChoiceOutput, None]) -> AsyncIterator[str]:
        """SSE events: one chunk per engine output (text delta), each choice's echoed prompt first, usage last.

        An echoed prompt whose tokens get logprobs is sent with the choice's first output (which carries them);
        otherwise at once. With stream_options.continuous_usage_stats every chunk carries the usage so far.
        """
        options = request.stream_options
        include_usage = bool(options and options.include_usage)
        continuous_usage = bool(options and options.continuous_usage_stats)
        results = [ChoiceResult(index=index) for index in range(len(prompts) * request.n)]
        offsets = [0] * len(results)  # characters sent so far per choice, for text_offset
        echo_pending = [request.echo] * len(results)
        num_prompt_tokens = sum(len(prompt.token_ids) for prompt in prompts)
        text_chunk = TextChunkFormatter(request_id, created, self.serving.model_name, False, include_usage)

        def chunk(index: int, text: str, logprobs: CompletionLogProbs | None, reason: APIFinishReason | None,
                  prompt_logprobs: PromptLogprobs | None = None) -> str:
            if logprobs is None and prompt_logprobs is None and not continuous_usage:
                return text_chunk(index, text, reason)
            choice = CompletionResponseChoice(index=index, text=text, logprobs=logprobs, finish_reason=reason,
                                              prompt_logprobs=prompt_logprobs)
            usage = None
            if continuous_usage:
                completion_tokens = sum(result.num_generated_tokens for result in results)
                usage = UsageInfo(prompt_tokens=num_prompt_tokens, completion_tokens=completion_tokens,
                                  total_tokens=num_prompt_tokens + completion_tokens)
            response = CompletionStreamResponse(id=request_id, created=created, model=self.serving.model_name,
                                                choices=[choice], usage=usage)
            return chunk_event(response, include_usage or continuous_usage)

        def echo_chunk(index: int) -> str:
            echo_pending[index] = False
            prompt = prompts[index // request.n]
            offsets[index] = len(prompt.text)
            logprobs = None
            if request.logprobs is not None:
                logprobs = self._echoed_logprobs(request, prompt, results[index].prompt_logprobs)
            return chunk(index, prompt.text, logprobs, None)
        try:
            if request.echo and request.logprobs is None:  # nothing to wait for
                for index in range(len(results)):
                    yield echo_chunk(index)
            async for item in outputs:
                output, index = item.output, item.index
                results[index].add(output)
                if echo_pending[index]:
                    yield echo_chunk(index)
                prompt_logprobs = None if output.prompt_logprobs is None else self._prompt_logprobs(
                    request, results[index])
                if request.max_tokens == 0:  # the prompt only: its one sampled token is dropped
                    if output.finished:
                        prompt_only(results[index])
                        yield chunk(index, "", None, "length", prompt_logprobs)
                    elif prompt_logprobs is not None:
                        yield chunk(index, "", None, None, prompt_logprobs)
                    continue
                reason = finish_reason(output) if output.finished else None
                if not output.new_text and not reason and request.logprobs is None and prompt_logprobs is None:
                    continue  # tokens whose text is held back (a possible stop string): nothing to send yet
                logprobs = None
                if request.logprobs is not None:
                    logprobs = completion_logprobs(output.new_logprobs or [], self.serving.tokenizer,
                                                   request.logprobs, offsets[index])
                offsets[index] += len(output.new_text)
                yield chunk(index, output.new_text, logprobs, reason, prompt_logprobs)
            if include_usage:
                final = CompletionStreamResponse(id=request_id, created=created, model=self.serving.model_name,
                                                 choices=[], usage=usage_of(results, len(prompts), request.n))
                yield chunk_event(final, include_usage)
        except Exception as error:  # after the first byte only an event can tell the client
            yield error_event(stream_error(error).to_response())
        finally:
            await outputs.aclose()
        yield DONE


def prompt_only(result: ChoiceResult) -> None:
    """max_tokens 0: the choice keeps only its echoed prompt; the one token the engine sampled is dropped."""
    result.text, result.token_ids, result.logprobs = "", [], []
    result.num_generated_tokens = 0
    result.finish_reason = "length"
