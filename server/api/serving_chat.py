"""POST /v1/chat/completions: messages (and tools) through the tokenizer's chat template, the assistant's reply out.

A streamed reply, per choice, as OpenAI sends it::

    {"delta": {"role": "assistant", "content": ""}}   first
    {"delta": {"content": "Hel"}}  {"delta": {"content": "lo"}}   one per engine output with text
    {"delta": {"tool_calls": [{"index": 0, "id": ..., "function": {"name": ..., "arguments": ""}}]}}  with tools
    {"delta": {}, "finish_reason": "stop"}   last ("tool_calls" when the reply called tools)
    then (stream_options.include_usage) a chunk with "choices": [] and "usage", then [DONE]

Every chunk and response carries system_fingerprint; with stream_options.continuous_usage_stats every chunk carries
the usage so far (vLLM's extension). Tools: tool_choice.py decides the grammar and call format, chat_template.py
how the template sees them, tool_calls.py how the text becomes tool_calls.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from server.api.chat_template import template_messages, template_source, with_tools_described
from server.api.choices import ChoiceOutput, ChoiceResult, collect, finish_reason, first_and_rest, usage_of
from server.api.decoding import num_sequences
from server.api.errors import InvalidRequestError
from server.api.fingerprint import system_fingerprint
from server.api.logprobs import chat_logprobs, vllm_prompt_logprobs
from server.api.protocol import (
    ChatCompletionLogProbs,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatFinishReason,
    DeltaMessage,
    UsageInfo,
)
from server.api.serving import OpenAIServing, PreparedPrompt, stream_error
from server.api.streaming import DONE, TextChunkFormatter, chunk_event, error_event
from server.api.tool_calls import ToolCallReader, finish_reason_with_calls
from server.api.tool_choice import ToolPlan, plan_tools
from server.api.tool_parsers import tool_parser
from server.api.user_text import check_encodable, strings_of
from server.engine.sampling_params import SamplingParams


class OpenAIServingChat:
    """Serves /v1/chat/completions on top of OpenAIServing."""

    def __init__(self, serving: OpenAIServing, tool_call_parser: str | None = None) -> None:
        """
        Args:
            serving: what completions and chat share (the engine, tokenizer, limits).
            tool_call_parser: the format the model writes tool calls in (server/api/tool_parsers: "hermes",
                "llama3_json"), for tool_choice "auto"; None refuses "auto" ("required" and named functions work
                without one). Raises ValueError naming --tool-call-parser for an unknown name.
        """
        self.serving = serving
        self.tool_parser = tool_parser(tool_call_parser)
        self._system_fingerprint: str | None = None

    @property
    def system_fingerprint(self) -> str:
        """The served engine's fingerprint (server/api/fingerprint.py), computed once the engine is known."""
        if self._system_fingerprint is None:
            serving = self.serving
            self._system_fingerprint = system_fingerprint(serving.model_name, serving.tokenizer,
                                                          serving.max_model_len, serving.vocab_size)
        return self._system_fingerprint

    def check_unsupported(self, request: ChatCompletionRequest) -> None:
        """Reject parameter combinations we accept in the schema but cannot honour (400 naming each)."""
        if request.top_logprobs is not None and not request.logprobs:
            raise InvalidRequestError("'top_logprobs' needs 'logprobs' set to true", "top_logprobs")
        if request.prompt_logprobs is not None and request.stream:  # as vLLM
            raise InvalidRequestError("'prompt_logprobs' cannot be streamed on chat completions; set 'stream' to "
                                      "false (or use /v1/completions)", "prompt_logprobs")

    def prepare(self, request: ChatCompletionRequest) -> PreparedPrompt:
        """Check the request and render its messages through the chat template into prompt tokens."""
        return self.prepare_with_tools(request)[0]

    def prepare_with_tools(self, request: ChatCompletionRequest) -> tuple[PreparedPrompt, ToolPlan]:
        """Check the request, plan its tool use and render messages and tools through the chat template.

        Returns:
            (the prompt, the ToolPlan). Raises InvalidRequestError (400) naming the parameter that is wrong.
        """
        check_encodable(request)
        self.serving.check_model(request.model)
        self.serving.check_ready()
        self.check_unsupported(request)
        plan = plan_tools(request, self.tool_parser)
        tokenizer = self.serving.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequestError("the served model has no chat template; use /v1/completions", "messages")
        template = template_source(tokenizer)
        template_tools = plan.template_tools if "tools" in template else None
        self.check_tools_text(request)

        def render(messages: list[dict[str, Any]]) -> str:
            try:
                return tokenizer.apply_chat_template(messages, tools=template_tools, tokenize=False,
                                                     add_generation_prompt=True)
            except InvalidRequestError:
                raise
            except Exception as error:  # jinja2 errors, raise_exception() in the template
                raise InvalidRequestError(f"the chat template rejected the messages: {error}", "messages") from None

        messages = with_tools_described(template_messages(request.messages), plan.template_tools, template,
                                        self.tool_parser)
        text, token_ids = self.serving.prompt_encoder.encode_chat(messages, render)
        max_tokens = request.max_completion_tokens or request.max_tokens
        param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        prompt = self.serving.prepare_prompt(token_ids, text, max_tokens, "messages", param,
                                             num_sequences=num_sequences(request))
        return prompt, plan

    def check_tools_text(self, request: ChatCompletionRequest) -> None:
        """Refuse special-token text in tools (they reach the template outside the messages, whose strings are kept
        plain text), unless the server lets such text through (--special-tokens-in-input)."""
        encoder = self.serving.prompt_encoder
        if encoder.special_tokens_in_input:
            return
        for param, string in strings_of(request.tools or [], "tools"):
            if encoder.has_special_text(string):
                raise InvalidRequestError(f"'{param}' holds the text of a special token; remove it", param)

    async def create(self, request: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        """Run a chat completion request.

        Args:
            request: the validated request.

        Returns:
            A ChatCompletionResponse, or (stream=True) an async iterator of SSE strings ending in [DONE].
            Raises APIError / InvalidRequest for bad requests before any output is produced.
        """
        prompt, plan = self.prepare_with_tools(request)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        num_top = (request.top_logprobs or 0) if request.logprobs else None

        def params_for(prepared: PreparedPrompt, choice: int) -> SamplingParams:
            params = self.serving.sampling_params(request, prepared.max_tokens, choice, num_top,
                                                  request.prompt_logprobs)
            if plan.grammar is not None:  # "required" or a named function (tool_choice.py)
                params.structured_output = plan.grammar
            return params

        params_for(prompt, 0)  # bad parameters fail before any engine request starts
        outputs = self.serving.generate(request_id, [prompt], params_for, request.n)
        if request.stream:
            return self.stream(request, plan, prompt, request_id, created, await first_and_rest(outputs))
        results = await collect(outputs, request.n)
        return self.response(request, plan, request_id, created, results)

    def message_of(self, plan: ToolPlan, result: ChoiceResult) -> tuple[ChatCompletionMessage, ChatFinishReason | None]:
        """A finished choice's message (tool calls read from its text when the request uses tools) and reason."""
        if plan.call_format is None:
            return ChatCompletionMessage(content=result.text), result.finish_reason
        message = ToolCallReader(plan.call_format, plan.max_calls).message(result.text)
        return message, finish_reason_with_calls(result.finish_reason, bool(message.tool_calls))

    def response(self, request: ChatCompletionRequest, plan: ToolPlan, request_id: str, created: int,
                 results: list[ChoiceResult]) -> ChatCompletionResponse:
        """The non-streamed response from the accumulated choices."""
        choices = []
        for result in results:
            message, reason = self.message_of(plan, result)
            logprobs = chat_logprobs(result.logprobs, self.serving.tokenizer, request.top_logprobs or 0) \
                if request.logprobs else None
            choices.append(ChatCompletionResponseChoice(index=result.index, message=message, logprobs=logprobs,
                                                        finish_reason=reason))
        prompt_logprobs = None
        if request.prompt_logprobs is not None and results[0].prompt_logprobs is not None:
            prompt_logprobs = vllm_prompt_logprobs(results[0].prompt_logprobs, self.serving.tokenizer,
                                                   request.prompt_logprobs)
        return ChatCompletionResponse(id=request_id, created=created, model=self.serving.model_name,
                                      choices=choices, usage=usage_of(results, 1, request.n),
                                      system_fingerprint=self.system_fingerprint, prompt_logprobs=prompt_logprobs)

    async def stream(self, request: ChatCompletionRequest, plan: ToolPlan, prompt: PreparedPrompt, request_id: str,
                     created: int, outputs: AsyncGenerator[ChoiceOutput, None]) -> AsyncIterator[str]:
        """SSE events: a role chunk per choice, a delta chunk per engine output, a finish chunk, usage."""
        options = request.stream_options
        include_usage = bool(options and options.include_usage)
        continuous_usage = bool(options and options.continuous_usage_stats)
        results = [ChoiceResult(index=index) for index in range(request.n)]
        readers = [ToolCallReader(plan.call_format, plan.max_calls) if plan.call_format is not None else None
                   for _ in range(request.n)]
        fingerprint = self.system_fingerprint
        text_chunk = TextChunkFormatter(request_id, created, self.serving.model_name, True, include_usage,
                                        fingerprint)

        def usage_so_far() -> UsageInfo:
            completion_tokens = sum(result.num_generated_tokens for result in results)
            return UsageInfo(prompt_tokens=len(prompt.token_ids), completion_tokens=completion_tokens,
                             total_tokens=len(prompt.token_ids) + completion_tokens)

        def chunk(index: int, delta: DeltaMessage, logprobs: ChatCompletionLogProbs | None = None,
                  reason: ChatFinishReason | None = None) -> str:
            choice = ChatCompletionStreamChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=reason)
            response = ChatCompletionStreamResponse(id=request_id, created=created, model=self.serving.model_name,
                                                    system_fingerprint=fingerprint, choices=[choice],
                                                    usage=usage_so_far() if continuous_usage else None)
            return chunk_event(response, include_usage or continuous_usage)
        try:
            for index in range(request.n):
                yield chunk(index, DeltaMessage(role="assistant", content=""))
            async for item in outputs:
                output, reader = item.output, readers[item.index]
                results[item.index].add(output)
                logprobs = chat_logprobs(output.new_logprobs or [], self.serving.tokenizer, request.top_logprobs or 0) \
                    if request.logprobs and output.new_logprobs else None
                if reader is not None:
                    delta = reader.feed(output.new_text, output.finished)
                    if delta is not None or logprobs is not None:
                        yield chunk(item.index, delta or DeltaMessage(), logprobs)
                elif output.new_text or logprobs is not None:
                    if logprobs is None and not continuous_usage:
                        yield text_chunk(item.index, output.new_text)
                    else:
                        yield chunk(item.index, DeltaMessage(content=output.new_text), logprobs)
                if output.finished:
                    reason = finish_reason_with_calls(finish_reason(output), reader is not None and reader.has_calls)
                    yield chunk(item.index, DeltaMessage(), reason=reason)
            if include_usage:
                final = ChatCompletionStreamResponse(id=request_id, created=created, model=self.serving.model_name,
                                                     system_fingerprint=fingerprint, choices=[],
                                                     usage=usage_of(results, 1, request.n))
                yield chunk_event(final, include_usage)
        except Exception as error:  # after the first byte only an event can tell the client
            yield error_event(stream_error(error).to_response())
        finally:
            await outputs.aclose()
        yield DONE
