"""POST /v1/completions: prompts in, text out (whole, or streamed as SSE chunks)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import cast

from server.api.decoding import num_sequences
from server.api.errors import InvalidRequestError
from server.api.logprobs import completion_logprobs
from server.api.protocol import (
    APIFinishReason,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
)
from server.api.serving import (
    ChoiceOutput,
    ChoiceResult,
    OpenAIServing,
    PreparedPrompt,
    collect,
    finish_reason,
    first_and_rest,
    stream_error,
    usage_of,
)
from server.api.streaming import DONE, TextChunkFormatter, chunk_event, error_event
from server.api.user_text import check_encodable
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
        if request.echo and request.logprobs is not None:
            raise InvalidRequestError("'echo' together with 'logprobs' is not supported (no prompt logprobs)", "echo")
        tokenizer = self.serving.tokenizer
        prompts = []
        for prompt in prompt_list(request.prompt):
            if isinstance(prompt, str):
                token_ids, text = self.serving.prompt_encoder.encode_prompt(prompt), prompt
            else:
                self.serving.check_token_ids(prompt, "prompt")
                token_ids, text = list(prompt), tokenizer.decode(prompt)
            prompts.append(self.serving.prepare_prompt(token_ids, text, request.max_tokens, "prompt",
                                                       num_sequences=num_sequences(request)))
        return prompts

    def _params(self, request: CompletionRequest) -> Callable[[PreparedPrompt, int], SamplingParams]:
        """(prompt, choice number) -> the SamplingParams of that choice."""

        def params_for(prompt: PreparedPrompt, choice: int) -> SamplingParams:
            return self.serving.sampling_params(request, prompt.max_tokens, choice, request.logprobs)
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
        outputs = self.serving.generate(request_id, prompts, params_for, request.n)
        if request.stream:
            return self.stream(request, request_id, created, prompts, await first_and_rest(outputs))
        results = await collect(outputs, len(prompts) * request.n)
        return self.response(request, request_id, created, prompts, results)

    def response(self, request: CompletionRequest, request_id: str, created: int,
                 prompts: list[PreparedPrompt], results: list[ChoiceResult]) -> CompletionResponse:
        """The non-streamed response from the accumulated choices."""
        choices = []
        for result in results:
            prefix = prompts[result.index // request.n].text if request.echo else ""
            logprobs = None
            if request.logprobs is not None:
                logprobs = completion_logprobs(result.logprobs, self.serving.tokenizer, request.logprobs, len(prefix))
            choices.append(CompletionResponseChoice(index=result.index, text=prefix + result.text,
                                                    logprobs=logprobs, finish_reason=result.finish_reason))
        return CompletionResponse(id=request_id, created=created, model=self.serving.model_name, choices=choices,
                                  usage=usage_of(results, len(prompts), request.n))

    async def stream(self, request: CompletionRequest, request_id: str, created: int,
                     prompts: list[PreparedPrompt], outputs: AsyncGenerator[ChoiceOutput, None]) -> AsyncIterator[str]:
        """SSE events: one chunk per engine output (text delta), the echoed prompt first, usage last."""
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        results = [ChoiceResult(index=index) for index in range(len(prompts) * request.n)]
        offsets = [0] * len(results)  # characters sent so far per choice, for text_offset

        text_chunk = TextChunkFormatter(request_id, created, self.serving.model_name, False, include_usage)

        def chunk(index: int, text: str, logprobs: CompletionLogProbs | None, reason: APIFinishReason | None) -> str:
            if logprobs is None:
                return text_chunk(index, text, reason)
            choice = CompletionResponseChoice(index=index, text=text, logprobs=logprobs, finish_reason=reason)
            return chunk_event(CompletionStreamResponse(id=request_id, created=created, model=self.serving.model_name,
                                                        choices=[choice]), include_usage)
        try:
            if request.echo:
                for index in range(len(results)):
                    text = prompts[index // request.n].text
                    offsets[index] = len(text)
                    yield chunk(index, text, None, None)
            async for item in outputs:
                output = item.output
                results[item.index].add(output)
                reason = finish_reason(output) if output.finished else None
                if not output.new_text and not reason and request.logprobs is None:
                    continue  # tokens whose text is held back (a possible stop string): nothing to send yet
                logprobs = None
                if request.logprobs is not None:
                    logprobs = completion_logprobs(output.new_logprobs or [], self.serving.tokenizer,
                                                   request.logprobs, offsets[item.index])
                offsets[item.index] += len(output.new_text)
                yield chunk(item.index, output.new_text, logprobs, reason)
            if include_usage:
                final = CompletionStreamResponse(id=request_id, created=created, model=self.serving.model_name,
                                                 choices=[], usage=usage_of(results, len(prompts), request.n))
                yield chunk_event(final, include_usage)
        except Exception as error:  # after the first byte only an event can tell the client
            yield error_event(stream_error(error).to_response())
        finally:
            await outputs.aclose()
        yield DONE
