"""Tool calling on /v1/chat/completions against real servers: the bundled model behind the real engine for
tool_choice "required" and named functions (grammar-forced: the arguments always validate), driven by the official
openai client and langchain-openai's bind_tools; a scripted model for tool_choice "auto" with a parser; 400s naming
the parameter; system_fingerprint and stream_options.continuous_usage_stats."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from server.api.metrics import Metrics
from server.api.serving_chat import OpenAIServingChat
from server.engine.outputs import FinishReason, RequestOutput
from server.engine.sampling_params import SamplingParams

MODEL = "inflight-tiny"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 20}},
        "required": ["timezone"], "additionalProperties": False}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now.",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone.",
                                      "parameters": TIME}},
]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Paris, and the time there?"}]
NAMED: Any = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def server(bundled_model_dir: Path, free_port_fn, start_server_fn) -> Any:
    from server.config import ServerSettings
    from server.launch import build_server

    settings = ServerSettings(model=bundled_model_dir, port=free_port_fn(), device="cpu", dtype="float32",
                              served_model_name=MODEL, num_kv_blocks=128, max_num_seqs=8, max_num_batched_tokens=512,
                              log_level="warning", engine_process=False)
    running = start_server_fn(build_server(settings), settings.url)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=120)


def check_calls(tool_calls: Any, names: set[str]) -> list[tuple[str, dict]]:
    """Every call names one of `names` and its arguments validate against that tool's schema."""
    assert tool_calls, "no tool calls"
    found = []
    for call in tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        found.append((call.function.name, arguments))
    return found


def reassemble(chunks: list[Any]) -> tuple[str | None, list[tuple[str, str]], str | None]:
    """Content, (name, arguments) calls and finish reason of a streamed chat reply (one choice)."""
    content, calls, reason = "", [], None
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                if call.id is not None:
                    assert call.index == len(calls) and call.function.name
                    calls.append([call.function.name, call.function.arguments or ""])
                else:
                    assert call.function.name is None
                    calls[call.index][1] += call.function.arguments
            reason = choice.finish_reason or reason
    return content or None, [tuple(call) for call in calls], reason


# ------------------------------------------------------------------------------- forced calls, real engine


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.0, "seed": 3}], ids=["greedy", "seed"])
def test_required_returns_a_call_that_validates(client: openai.OpenAI, sampling: dict) -> None:
    response = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                              parallel_tool_calls=False, max_completion_tokens=200, **sampling)
    (choice,) = response.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(check_calls(choice.message.tool_calls, set(SCHEMAS))) == 1
    assert response.system_fingerprint and response.system_fingerprint.startswith("fp_")


def test_required_parallel_calls_each_validate(client: openai.OpenAI) -> None:
    # the tiny model never closes the array of calls by itself: every call but the one max_tokens cut validates
    for seed in range(3):
        response = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                                  max_completion_tokens=120, seed=seed)
        choice = response.choices[0]
        calls = choice.message.tool_calls or []
        assert choice.finish_reason in ("tool_calls", "length") and calls
        finished = calls[:-1] if choice.finish_reason == "length" else calls
        assert len(check_calls(finished, set(SCHEMAS))) >= 1


def test_named_function_is_the_one_call(client: openai.OpenAI) -> None:
    for seed in range(3):
        response = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=NAMED,
                                                  max_completion_tokens=200, seed=seed)
        (choice,) = response.choices
        assert choice.finish_reason == "tool_calls"
        assert [name for name, _ in check_calls(choice.message.tool_calls, {"get_weather"})] == ["get_weather"]


@pytest.mark.parametrize("tool_choice", ["required", NAMED], ids=["required", "named"])
def test_streamed_calls_reassemble_to_the_non_streamed_ones(client: openai.OpenAI, tool_choice: Any) -> None:
    common: Any = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": tool_choice,
                   "parallel_tool_calls": False, "max_completion_tokens": 200, "temperature": 0.0}
    whole = client.chat.completions.create(**common).choices[0]
    chunks = list(client.chat.completions.create(**common, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    content, calls, reason = reassemble(chunks)
    assert content is None and reason == whole.finish_reason == "tool_calls"
    assert whole.message.tool_calls is not None
    assert calls == [(call.function.name, call.function.arguments) for call in whole.message.tool_calls]
    assert len({chunk.system_fingerprint for chunk in chunks}) == 1 and chunks[0].system_fingerprint


def test_tool_history_renders_and_continues(client: openai.OpenAI) -> None:
    history: list[Any] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    response = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                              max_completion_tokens=8)
    choice = response.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.tool_calls is None
    assert isinstance(choice.message.content, str)


def test_langchain_bind_tools_gets_valid_calls(server: Any) -> None:
    from langchain_core.messages import AIMessageChunk, HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field, SecretStr

    class get_weather(BaseModel):
        """The weather in a city now."""

        city: str = Field(max_length=20)
        unit: str = Field(pattern="^(celsius|fahrenheit)$")

    llm = ChatOpenAI(base_url=server.api_url, api_key=SecretStr("unused"), model=MODEL, temperature=0, max_retries=0,
                     max_completion_tokens=200)  # pyright: ignore[reportCallIssue]
    schema = get_weather.model_json_schema()
    for tool_choice in ("required", "get_weather"):
        bound = llm.bind_tools([get_weather], tool_choice=tool_choice, parallel_tool_calls=False)
        message = bound.invoke([HumanMessage("Weather in Paris?")])
        assert message.tool_calls and all(call["name"] == "get_weather" for call in message.tool_calls)
        for call in message.tool_calls:
            jsonschema.validate(call["args"], schema)
        streamed = None
        for chunk in bound.stream("Weather in Paris?"):
            streamed = chunk if streamed is None else streamed + chunk
        assert isinstance(streamed, AIMessageChunk)
        pairs = [(c["name"], c["args"]) for c in message.tool_calls]
        assert [(c["name"], c["args"]) for c in streamed.tool_calls] == pairs
    # the calls and their results go back into the conversation
    call = message.tool_calls[0]
    follow_up = bound.invoke(
        [HumanMessage("Weather in Paris?"), message, ToolMessage('{"temperature": 21}', tool_call_id=call["id"])])
    assert follow_up.tool_calls  # type: ignore[attr-defined]


def test_continuous_usage_stats_on_every_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=ASK, max_completion_tokens=12, temperature=0.0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
        extra_body={"ignore_eos": True}))
    assert all(chunk.usage is not None for chunk in chunks)
    completion_tokens = [chunk.usage.completion_tokens for chunk in chunks if chunk.usage is not None]
    assert completion_tokens == sorted(completion_tokens) and completion_tokens[0] == 0
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None and final.usage.completion_tokens == 12
    assert {chunk.usage.prompt_tokens for chunk in chunks if chunk.usage is not None} == {final.usage.prompt_tokens}
    plain = list(client.chat.completions.create(model=MODEL, messages=ASK, max_completion_tokens=4, stream=True,
                                                stream_options={"include_usage": True}))
    assert all(chunk.usage is None for chunk in plain[:-1]) and plain[-1].usage is not None


def test_system_fingerprint_is_stable(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model=MODEL, messages=ASK, max_completion_tokens=2)
    second = client.chat.completions.create(model=MODEL, messages=ASK, max_completion_tokens=2, stream=True)
    fingerprints = {first.system_fingerprint, *(chunk.system_fingerprint for chunk in second)}
    assert len(fingerprints) == 1 and first.system_fingerprint and len(first.system_fingerprint) == 15


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS}, "tool_choice"),  # "auto" by default, and this server has no --tool-call-parser
        ({"tools": [{"type": "function"}], "tool_choice": "required"}, "tools[0].function"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        ({"tools": [TOOLS[0], TOOLS[0]], "tool_choice": "required"}, "tools[1].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}],
          "tool_choice": "required"}, "tools[0].function.parameters"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": TOOLS, "tool_choice": NAMED, "stop": ["}"]}, "stop"),
        ({"tool_choice": "none", "messages": [*ASK, {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
         "messages[1].tool_calls[0].function.arguments"),
    ],
)
def test_bad_tool_requests_are_400_naming_the_param(server: Any, body: dict, param: str) -> None:
    response = httpx.post(server.api_url + "/chat/completions", json={"model": MODEL, "messages": ASK, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and f"'{param}'" in error["message"]


# ------------------------------------------------------------------------------- tool_choice "auto", scripted model

QWEN_REPLY = ('Let me check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
              '"celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"timezone": '
              '"Europe/Paris"}}\n</tool_call>')


class ScriptedEngine:
    """The fake engine's lifecycle, replying with a fixed text a few characters per output; keeps the prompts."""

    def __init__(self, tokenizer: Any, reply: str) -> None:
        from fake_engine import FakeEngine

        self._fake = FakeEngine(tokenizer, max_model_len=4096)
        self.tokenizer = tokenizer
        self.reply = reply
        self.prompts: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fake, name)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        self.prompts.append(self.tokenizer.decode(prompt_token_ids))
        pieces = [self.reply[i:i + 3] for i in range(0, len(self.reply), 3)]
        for number, piece in enumerate(pieces, 1):
            await asyncio.sleep(0)
            done = number == len(pieces)
            yield RequestOutput(request_id=request_id, new_token_ids=[5], new_text=piece, new_logprobs=None,
                                finished=done, finish_reason=FinishReason.STOP if done else None,
                                num_prompt_tokens=len(prompt_token_ids), num_generated_tokens=number)


@pytest.fixture(scope="module")
def scripted(tokenizer_dir: Path, serve_app_fn) -> Any:
    from transformers import AutoTokenizer

    from server.api.app import build_app
    from server.config import ServerSettings

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    engine = ScriptedEngine(tokenizer, QWEN_REPLY)
    app = build_app(ServerSettings(served_model_name="scripted"), engine, Metrics(),  # pyright: ignore[reportArgumentType]
                    device="cpu", dtype="float32", vocab_size=len(tokenizer))
    app.state.serving_chat = OpenAIServingChat(app.state.serving, tool_call_parser="hermes")
    running = serve_app_fn(app)
    yield running, engine
    running.stop()


def test_auto_parses_calls_and_streams_them_without_markup(scripted: Any) -> None:
    running, engine = scripted
    client = openai.OpenAI(base_url=running.api_url, api_key="unused", max_retries=0)
    whole = client.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content == "Let me check both."
    assert check_calls(whole.message.tool_calls, set(SCHEMAS)) == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"timezone": "Europe/Paris"})]
    content, calls, reason = reassemble(list(client.chat.completions.create(
        model="scripted", messages=ASK, tools=TOOLS, tool_choice="auto", stream=True)))
    assert whole.message.tool_calls is not None
    assert (content, reason) == ("Let me check both.", "tool_calls")
    assert calls == [(call.function.name, call.function.arguments)  # pyright: ignore[reportAttributeAccessIssue]
                     for call in whole.message.tool_calls]
    # the bundled template ignores `tools`: they reach the model in the system message, in Hermes' format
    assert "<tools>" in engine.prompts[-1] and '"name": "get_weather"' in engine.prompts[-1]
    # with tool_choice "none" the reply is text, markup and all, and the tools are not shown
    plain = client.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS, tool_choice="none").choices[0]
    assert plain.message.content == QWEN_REPLY and plain.message.tool_calls is None and plain.finish_reason == "stop"
    assert "<tools>" not in engine.prompts[-1]


def test_history_calls_reach_a_template_without_tool_support(scripted: Any) -> None:
    running, engine = scripted
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"timezone": "UTC"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    response = httpx.post(running.api_url + "/chat/completions",
                          json={"model": "scripted", "messages": history, "tools": TOOLS})
    assert response.status_code == 200, response.text
    assert '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "UTC"}}\n</tool_call>' in engine.prompts[-1]
    assert "12:00" in engine.prompts[-1]


def test_the_tool_call_parser_setting_reaches_chat(bundled_model_dir: Path, free_port_fn, start_server_fn,
                                                   client: openai.OpenAI) -> None:
    from server.config import ServerSettings
    from server.launch import build_server

    settings = ServerSettings(model=bundled_model_dir, port=free_port_fn(), device="cpu", dtype="float32",
                              num_kv_blocks=64, max_num_seqs=4, max_num_batched_tokens=256, log_level="warning",
                              engine_process=False, tool_call_parser="hermes")
    running = start_server_fn(build_server(settings), settings.url)
    try:
        with_parser = openai.OpenAI(base_url=running.api_url, api_key="none", max_retries=0)
        reply = with_parser.chat.completions.create(model="inflight-tiny", max_tokens=8, temperature=0, tools=TOOLS,
                                                    messages=[{"role": "user", "content": "Weather in Paris?"}])
        assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")  # "auto": parsed, not a 400
    finally:
        running.stop()
    with pytest.raises(openai.BadRequestError, match="tool-call-parser"):  # the module's server has no parser
        client.chat.completions.create(model="inflight-tiny", max_tokens=8, tools=TOOLS,
                                       messages=[{"role": "user", "content": "Weather in Paris?"}])
