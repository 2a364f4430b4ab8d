"""Pydantic schemas of the OpenAI API we serve; schemas only, no behaviour.

Fields follow the order of the OpenAI API reference (requests) and of the JSON the OpenAI API
returns (responses). Parameters OpenAI does not have (top_k, min_p, repetition_penalty, min_tokens,
stop_token_ids, ignore_eos) come last, as in vLLM. Simple range checks live here as Field constraints;
checks that need the model (context length, vocabulary) live in serving.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from server.engine.sampling_params import MAX_LENGTH_PENALTY, MIN_LENGTH_PENALTY

MAX_STOP_STRINGS = 16  # stop strings per request, as OpenAI allows at most 4 (vLLM: any)
MAX_STOP_STRING_CHARS = 256  # characters per stop string
MAX_STOP_TOKEN_IDS = 64  # extra stop token ids per request
MAX_N = 128  # choices per prompt
MAX_PROMPT_LOGPROBS = 20  # prompt_logprobs alternatives per token at most
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 10.0  # beyond these logits overflow to inf
# torch generators take 64-bit seeds; choices use seed + i
SEED_RANGE: dict[str, Any] = {"ge": -(2**63), "le": 2**63 - 1 - MAX_N}
MAX_TOKENS = 2**31 - 1  # max_tokens, min_tokens and top_k at most (the context length limits tokens further)
# max_tokens, max_completion_tokens and top_k (>= vocab: keep all)
TOKENS_RANGE: dict[str, Any] = {"ge": 1, "le": MAX_TOKENS}
MIN_TOKENS_RANGE: dict[str, Any] = {"ge": 0, "le": MAX_TOKENS}
# beam scores stay finite within it
LENGTH_PENALTY_RANGE: dict[str, Any] = {"ge": MIN_LENGTH_PENALTY, "le": MAX_LENGTH_PENALTY}
# A choice's finish_reason ("abort": ended by a server shutdown; a failed request is an error, not a choice)
APIFinishReason = Literal["stop", "length", "abort"]
# A request's stop: one string or a list of up to MAX_STOP_STRINGS strings, each of MAX_STOP_STRING_CHARS at most
# (a single string's length is checked in serving: as a constrained union member its error would name no parameter).
StopString = Annotated[str, Field(max_length=MAX_STOP_STRING_CHARS)]
Stop = str | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]
StopTokenIds = Annotated[list[int], Field(max_length=MAX_STOP_TOKEN_IDS)]
MAX_LOGIT_BIAS_ENTRIES = 1024  # tokens a request may bias
# logit_bias: token id (as a string, JSON keys are strings) -> bias in [-100, 100] added to that token's logit.
LogitBias = Annotated[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]], Field(max_length=MAX_LOGIT_BIAS_ENTRIES)]
# Request models refuse NaN and infinity in every float field (JSON has neither, Python's json reads both), and
# take values only of their own JSON type (strict): "5" or true for an integer is a 400, not quietly 5 or 1.
REQUEST_CONFIG = ConfigDict(allow_inf_nan=False, strict=True)

# ----------------------------------------------------------------------------------------------- errors


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ----------------------------------------------------------------------------------------------- shared


class StreamOptions(BaseModel):
    include_usage: bool = False  # a last chunk with empty choices and the usage of the whole request
    continuous_usage_stats: bool = False  # extension (vLLM): every chunk carries the usage so far too


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "inflight"
    max_model_len: int | None = None  # extension (as in vLLM): prompt + completion tokens at most


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ----------------------------------------------------------------------------------------------- completions


class CompletionRequest(BaseModel):
    """POST /v1/completions."""

    model_config = REQUEST_CONFIG

    model: str | None = None  # None: the served model
    prompt: str | list[str] | list[int] | list[list[int]]
    # candidates per prompt: the n with the highest logprob per token are returned (beam width with use_beam_search)
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    echo: bool = False
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: LogitBias | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    # None: up to the model's context; 0 (with echo): the prompt only, e.g. to score it with logprobs
    max_tokens: int | None = Field(default=16, **MIN_TOKENS_RANGE)
    n: int = Field(default=1, ge=1, le=MAX_N)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, **SEED_RANGE)
    stop: Stop | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None  # not supported; rejected when given
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    user: str | None = None
    # extensions
    top_k: int | None = Field(default=None, **TOKENS_RANGE)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    min_tokens: int = Field(default=0, **MIN_TOKENS_RANGE)
    stop_token_ids: StopTokenIds | None = None
    ignore_eos: bool = False
    response_format: ResponseFormat | None = None  # as on chat: json_object or json_schema constrain the text
    use_beam_search: bool = False  # beam search of width best_of (default n), returning the best n beams
    # beam search: a beam scores sum(logprobs) / num_tokens ** length_penalty
    length_penalty: float = Field(default=1.0, **LENGTH_PENALTY_RANGE)
    early_stopping: bool | Literal["never"] = False  # beam search: as transformers' generate
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_PROMPT_LOGPROBS)  # vLLM's: top-k per prompt token
    # vLLM's: prefix-cache blocks are shared only between requests with the same salt (e.g. one per tenant)
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)


class CompletionLogProbs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's prompt_logprobs entry for one token (the prompt's own token or an alternative)."""

    logprob: float
    rank: int | None = None  # 1 = the most likely token at that position
    decoded_token: str


# One dict per prompt token (None for the first, which nothing predicts): token id (a string) -> its entry.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionResponseChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: APIFinishReason | None = None
    # extension (vLLM), when prompt_logprobs was asked for; left out of the JSON otherwise
    prompt_logprobs: PromptLogprobs | None = Field(default=None, exclude_if=lambda value: value is None)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo | None = None  # only sent when stream_options.include_usage


# ----------------------------------------------------------------------------------------------- chat


class ChatContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str  # only "text" is supported
    text: str | None = None


class ChatMessage(BaseModel):
    """One message of the conversation, as the client sends it."""

    model_config = ConfigDict(extra="allow")  # tool_calls, tool_call_id, ... are passed to the template

    role: Literal["developer", "system", "user", "assistant", "tool"]
    content: str | list[ChatContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant message's calls (their arguments: JSON text)
    tool_call_id: str | None = None  # a tool message: the call it answers


class JsonSchemaFormat(BaseModel):
    """response_format.json_schema: the schema the output must validate against."""

    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # the output always follows the schema, whatever this says


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None  # required with type "json_schema"


MAX_TOOLS = 128  # functions per request, as OpenAI allows
# A function name, as OpenAI's API takes it: letters, digits, underscores and dashes, 64 at most.
FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class FunctionDefinition(BaseModel):
    """tools[].function: a function the model may call."""

    model_config = REQUEST_CONFIG

    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of the arguments object; None: no arguments
    strict: bool | None = None  # the arguments always follow the schema with "required" or a named function


class ChatTool(BaseModel):
    """One entry of `tools`."""

    model_config = REQUEST_CONFIG

    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(BaseModel):
    """tool_choice.function: which function to call."""

    model_config = REQUEST_CONFIG

    name: str


class NamedToolChoice(BaseModel):
    """tool_choice {"type": "function", "function": {"name": ...}}: the reply is a call of that function."""

    model_config = REQUEST_CONFIG

    type: Literal["function"]
    function: ToolChoiceFunction


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions."""

    model_config = REQUEST_CONFIG

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None  # None: the served model
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: LogitBias | None = None
    logprobs: bool = False
    max_completion_tokens: int | None = Field(default=None, **TOKENS_RANGE)
    max_tokens: int | None = Field(default=None, **TOKENS_RANGE)  # deprecated by OpenAI; max_completion_tokens wins
    n: int = Field(default=1, ge=1, le=MAX_N)
    parallel_tool_calls: bool = True  # false: at most one tool call per reply
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    response_format: ResponseFormat | None = None  # text, json_object or json_schema
    seed: int | None = Field(default=None, **SEED_RANGE)
    stop: Stop | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    # "none", "auto" (the default with tools; needs --tool-call-parser), "required", or a named function
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    tools: Annotated[list[ChatTool], Field(max_length=MAX_TOOLS)] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    user: str | None = None
    # extensions
    top_k: int | None = Field(default=None, **TOKENS_RANGE)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    min_tokens: int = Field(default=0, **MIN_TOKENS_RANGE)
    stop_token_ids: StopTokenIds | None = None
    ignore_eos: bool = False
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)  # beam width with use_beam_search (default n)
    use_beam_search: bool = False  # beam search of width best_of (default n), returning the best n beams
    # beam search: a beam scores sum(logprobs) / num_tokens ** length_penalty
    length_penalty: float = Field(default=1.0, **LENGTH_PENALTY_RANGE)
    early_stopping: bool | Literal["never"] = False  # beam search: as transformers' generate
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_PROMPT_LOGPROBS)  # vLLM's: top-k per prompt token
    # vLLM's: prefix-cache blocks are shared only between requests with the same salt (e.g. one per tenant)
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)


class ChatCompletionTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[ChatCompletionTopLogprob] = Field(default_factory=list)


class ChatCompletionLogProbs(BaseModel):
    content: list[ChatCompletionTokenLogprob] | None = None


# A chat choice's finish_reason: a completion's, or "tool_calls" when the reply is tool calls
ChatFinishReason = Literal["stop", "length", "abort", "tool_calls"]


class FunctionCall(BaseModel):
    name: str
    arguments: str  # the arguments object as JSON text, as the model wrote it


class ToolCall(BaseModel):
    """One call in an assistant message's tool_calls."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatCompletionMessage(BaseModel):
    """The assistant's reply in a non-streamed response."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None  # None (null) when the reply calls no tool


class ChatCompletionResponseChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: ChatFinishReason | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None  # the served engine and server version (server/api/fingerprint.py)
    # extension (vLLM), when prompt_logprobs was asked for; left out of the JSON otherwise
    prompt_logprobs: PromptLogprobs | None = Field(default=None, exclude_if=lambda value: value is None)


class DeltaFunctionCall(BaseModel):
    """A fragment of a streamed call: the name comes once (in the call's first delta), arguments in pieces."""

    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="plain")
    def _without_nulls(self) -> dict[str, Any]:
        return _without_none(("name", self.name), ("arguments", self.arguments))


class DeltaToolCall(BaseModel):
    """A streamed tool_calls entry: id and type only in a call's first delta; `index` says which call it extends."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None

    @model_serializer(mode="plain")
    def _without_nulls(self) -> dict[str, Any]:
        function = None if self.function is None else self.function.model_dump()
        return _without_none(("index", self.index), ("id", self.id), ("type", self.type), ("function", function))


class DeltaMessage(BaseModel):
    """What a stream chunk adds to the message; unset fields are left out of the JSON."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="plain")
    def _without_nulls(self) -> dict[str, Any]:
        tool_calls = None if self.tool_calls is None else [call.model_dump() for call in self.tool_calls]
        return _without_none(("role", self.role), ("content", self.content), ("tool_calls", tool_calls))


def _without_none(*items: tuple[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in items if value is not None}


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: ChatFinishReason | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None  # as on the response
    choices: list[ChatCompletionStreamChoice]
    # with stream_options.include_usage: null, and the whole request's on a last chunk with no choices;
    # with stream_options.continuous_usage_stats: the usage so far on every chunk
    usage: UsageInfo | None = None
