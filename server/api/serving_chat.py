"""POST /v1/chat/completions: messages through the tokenizer's chat template, the assistant's reply out.

A streamed reply, per choice, as OpenAI sends it::

    {"delta": {"role": "assistant", "content": ""}}   first
    {"delta": {"content": "Hel"}}  {"delta": {"content": "lo"}}   one per engine output with text
    {"delta": {}, "finish_reason": "stop"}   last
    then (stream_options.include_usage) a chunk with "choices": [] and "usage", then [DONE]
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from server.api.decoding import num_sequences
from server.api.errors import InvalidRequestError
from server.api.logprobs import chat_logprobs
from server.api.protocol import (
    APIFinishReason,
    ChatCompletionLogProbs,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    DeltaMessage,
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


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as the chat template expects them: role and content text (text parts joined).

    Args:
        messages: the request's messages.

    Returns:
        A list of plain dicts. Raises InvalidRequestError for a content part that is not text.
    """
    result = []
    for position, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            texts = []
            for part_position, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    param = f"messages[{position}].content[{part_position}]"
                    raise InvalidRequestError(f"'{param}': content of type {part.type!r} is not supported; send text",
                                              param)
                texts.append(part.text)
            content = "".join(texts)
        entry = {**(message.model_extra or {}), "role": "system" if message.role == "developer" else message.role,
                 "content": content or ""}
        if message.name is not None:
            entry["name"] = message.name
        result.append(entry)
    return result


class OpenAIServingChat:
    """Serves /v1/chat/completions on top of OpenAIServing."""

    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving

    def check_unsupported(self, request: ChatCompletionRequest) -> None:
        """Reject parameters we accept in the schema but cannot honour (400 naming each)."""
        if request.tools:
            raise InvalidRequestError("'tools' (function calling) is not supported", "tools")
        if request.tool_choice not in (None, "none"):
            raise InvalidRequestError("'tool_choice' is not supported", "tool_choice")
        if request.top_logprobs is not None and not request.logprobs:
            raise InvalidRequestError("'top_logprobs' needs 'logprobs' set to true", "top_logprobs")

    def prepare(self, request: ChatCompletionRequest) -> PreparedPrompt:
        """Check the request and render its messages through the chat template into prompt tokens."""
        check_encodable(request)
        self.serving.check_model(request.model)
        self.serving.check_ready()
        self.check_unsupported(request)
        tokenizer = self.serving.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequestError("the served model has no chat template; use /v1/completions", "messages")

        def render(messages: list[dict[str, Any]]) -> str:
            try:
                return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except InvalidRequestError:
                raise
            except Exception as error:  # jinja2 errors, raise_exception() in the template
                raise InvalidRequestError(f"the chat template rejected the messages: {error}", "messages") from None

        text, token_ids = self.serving.prompt_encoder.encode_chat(template_messages(request.messages), render)
        max_tokens = request.max_completion_tokens or request.max_tokens
        param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        return self.serving.prepare_prompt(token_ids, text, max_tokens, "messages", param,
                                           num_sequences=num_sequences(request))

    async def create(self, request: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        """Run a chat completion request.

        Args:
            request: the validated request.

        Returns:
            A ChatCompletionResponse, or (stream=True) an async iterator of SSE strings ending in [DONE].
            Raises APIError / InvalidRequest for bad requests before any output is produced.
        """
        prompt = self.prepare(request)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        num_top = (request.top_logprobs or 0) if request.logprobs else None

        def params_for(prepared: PreparedPrompt, choice: int) -> SamplingParams:
            return self.serving.sampling_params(request, prepared.max_tokens, choice, num_top)

        params_for(prompt, 0)  # bad parameters fail before any engine request starts
        outputs = self.serving.generate(request_id, [prompt], params_for, request.n)
        if request.stream:
            return self.stream(request, request_id, created, await first_and_rest(outputs))
        results = await collect(outputs, request.n)
        return self.response(request, request_id, created, results)

    def response(self, request: ChatCompletionRequest, request_id: str, created: int,
                 results: list[ChoiceResult]) -> ChatCompletionResponse:
        """The non-streamed response from the accumulated choices."""
        choices = [
            ChatCompletionResponseChoice(
                index=result.index,
                message=ChatCompletionMessage(content=result.text),
                logprobs=chat_logprobs(result.logprobs, self.serving.tokenizer, request.top_logprobs or 0)
                if request.logprobs else None,
                finish_reason=result.finish_reason,
            )
            for result in results
        ]
        return ChatCompletionResponse(id=request_id, created=created, model=self.serving.model_name,
                                      choices=choices, usage=usage_of(results, 1, request.n))

    async def stream(self, request: ChatCompletionRequest, request_id: str, created: int,
                     outputs: AsyncGenerator[ChoiceOutput, None]) -> AsyncIterator[str]:
        """SSE events: a role chunk per choice, a content chunk per engine output, a finish chunk, usage."""
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        results = [ChoiceResult(index=index) for index in range(request.n)]

        text_chunk = TextChunkFormatter(request_id, created, self.serving.model_name, True, include_usage)

        def chunk(index: int, delta: DeltaMessage, logprobs: ChatCompletionLogProbs | None = None,
                  reason: APIFinishReason | None = None) -> str:
            choice = ChatCompletionStreamChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=reason)
            return chunk_event(ChatCompletionStreamResponse(id=request_id, created=created,
                                                            model=self.serving.model_name, choices=[choice]),
                               include_usage)
        try:
            for index in range(request.n):
                yield chunk(index, DeltaMessage(role="assistant", content=""))
            async for item in outputs:
                output = item.output
                results[item.index].add(output)
                if output.new_text or (request.logprobs and output.new_logprobs):
                    logprobs = chat_logprobs(output.new_logprobs or [], self.serving.tokenizer,
                                             request.top_logprobs or 0) if request.logprobs else None
                    if logprobs is None:
                        yield text_chunk(item.index, output.new_text)
                    else:
                        yield chunk(item.index, DeltaMessage(content=output.new_text), logprobs)
                if output.finished:
                    yield chunk(item.index, DeltaMessage(), reason=finish_reason(output))
            if include_usage:
                final = ChatCompletionStreamResponse(id=request_id, created=created, model=self.serving.model_name,
                                                     choices=[], usage=usage_of(results, 1, request.n))
                yield chunk_event(final, include_usage)
        except Exception as error:  # after the first byte only an event can tell the client
            yield error_event(stream_error(error).to_response())
        finally:
            await outputs.aclose()
        yield DONE
