"""Tool-call parsers on recorded model outputs (Llama 3.1 JSON, Hermes/Qwen2.5 <tool_call>, the forced formats):
the calls and content they find, and that streaming the same text in pieces adds up to the non-streamed message."""

from __future__ import annotations

import json

import pytest

from server.api.protocol import ChatCompletionMessage, DeltaMessage
from server.api.tool_calls import ToolCallReader
from server.api.tool_parsers import TOOL_PARSERS, CallFormat, tool_parser
from server.api.tool_parsers.forced import CallArray, NamedCall
from server.api.tool_parsers.hermes import HermesToolParser
from server.api.tool_parsers.json_scan import NotJson, scan_object, scan_value
from server.api.tool_parsers.llama3_json import Llama3JsonToolParser

WEATHER_PARIS = {"city": "Paris", "unit": "celsius"}
WEATHER_ROME = {"city": "Rome", "unit": "celsius"}

# Outputs as the models write them (Qwen2.5-7B-Instruct and Hermes-3 with their tool-use templates; Llama-3.1-8B-
# Instruct with its JSON tool prompt), special tokens stripped as the detokenizer does.
HERMES = [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
     None, [("get_weather", WEATHER_PARIS)]),
    (('I will look both cities up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
     '"celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": '
     '"celsius"}}\n</tool_call>'),
     "I will look both cities up.", [("get_weather", WEATHER_PARIS), ("get_weather", WEATHER_ROME)]),
    (('<tool_call>\n{"name": "search", "arguments": {"query": "a \\"quoted\\" {brace} </tool_call> inside", '
     '"filters": {"year": [2023, 2024], "open": true, "score": -1.5e3}}}\n</tool_call>'),
     None, [("search", {"query": 'a "quoted" {brace} </tool_call> inside',
                        "filters": {"year": [2023, 2024], "open": True, "score": -1500.0}})]),
    ('<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', None, [("get_time", {})]),
    ("Paris is the capital of France. Use <b>bold</b> < or <tool> freely.",
     "Paris is the capital of France. Use <b>bold</b> < or <tool> freely.", []),
    ('<tool_call>\nnot json at all\n</tool_call>', '<tool_call>\nnot json at all\n</tool_call>', []),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',  # no closing tag
     None, [("get_weather", WEATHER_PARIS)]),
    (('Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
     '\nDone.'), "Sure.\n\nDone.", [("get_weather", WEATHER_PARIS)]),
]
LLAMA3 = [
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
     None, [("get_weather", WEATHER_PARIS)]),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
     None, [("get_weather", WEATHER_PARIS)]),
    (('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; {"name": "get_weather", '
     '"parameters": {"city": "Rome", "unit": "celsius"}}'),
     None, [("get_weather", WEATHER_PARIS), ("get_weather", WEATHER_ROME)]),
    ('Let me check the weather for you.\n{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
     "Let me check the weather for you.", [("get_weather", WEATHER_PARIS)]),
    ('{"type": "function", "name": "get_weather", "parameters": {"city": "Rome", "unit": "celsius"}}',
     None, [("get_weather", WEATHER_ROME)]),
    ('{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',  # "arguments" for "parameters"
     None, [("get_weather", WEATHER_PARIS)]),
    ("The answer is 42; nothing to call.", "The answer is 42; nothing to call.", []),
    ('Here is the JSON you asked for:\n{"city": "Paris"}', 'Here is the JSON you asked for:\n{"city": "Paris"}', []),
    ('An inline {"name": "x"} is prose, not a call.', 'An inline {"name": "x"} is prose, not a call.', []),
]
FORMATS: list[tuple[CallFormat, str, str | None, list]] = [
    *[(HermesToolParser(), text, content, calls) for text, content, calls in HERMES],
    *[(Llama3JsonToolParser(), text, content, calls) for text, content, calls in LLAMA3],
    (CallArray(), ('[{"name":"get_weather","parameters":{"city":"Paris","unit":"celsius"}},{"name":"get_weather",'
     '"parameters":{"city":"Rome","unit":"celsius"}}]'), None,
     [("get_weather", WEATHER_PARIS), ("get_weather", WEATHER_ROME)]),
    (NamedCall("get_weather"), '{"city":"Paris","unit":"celsius"}', None, [("get_weather", WEATHER_PARIS)]),
]
IDS = [f"{type(fmt).__name__}-{i}" for i, (fmt, *_) in enumerate(FORMATS)]


def streamed(call_format: CallFormat, text: str, sizes: list[int]) -> tuple[list[DeltaMessage], ChatCompletionMessage]:
    """The deltas of `text` fed in pieces of the given sizes (cycled), and the message they add up to."""
    reader = ToolCallReader(call_format)
    deltas, position, step = [], 0, 0
    while position < len(text):
        piece = text[position:position + sizes[step % len(sizes)]]
        position += len(piece)
        step += 1
        delta = reader.feed(piece, final=position >= len(text))
        if delta is not None:
            deltas.append(delta)
    content, calls = "", []
    for delta in deltas:
        content += delta.content or ""
        for call in delta.tool_calls or []:
            if call.id is not None:
                assert call.index == len(calls) and call.type == "function" and call.function is not None
                assert call.function.name and call.function.arguments == ""
                calls.append({"id": call.id, "name": call.function.name, "arguments": ""})
            else:
                assert call.function is not None and call.function.name is None and call.function.arguments
                calls[call.index]["arguments"] += call.function.arguments
    message = ChatCompletionMessage(content=content or None, tool_calls=None)
    message.tool_calls = [reader_call(c) for c in calls] or None
    if message.content is None and not message.tool_calls:
        message.content = ""
    return deltas, message


def reader_call(call: dict):
    from server.api.protocol import FunctionCall, ToolCall

    return ToolCall(id=call["id"], function=FunctionCall(name=call["name"], arguments=call["arguments"]))


def without_ids(message: ChatCompletionMessage) -> dict:
    return {"content": message.content,
            "tool_calls": [(call.function.name, call.function.arguments) for call in message.tool_calls or []]}


@pytest.mark.parametrize(("call_format", "text", "content", "calls"), FORMATS, ids=IDS)
def test_recorded_outputs_parse_into_content_and_calls(call_format, text, content, calls) -> None:
    message = ToolCallReader(call_format).message(text)
    assert message.content == (content if content is not None or not calls else None)
    if content is None and not calls:
        assert message.content == ""
    found = [(call.function.name, json.loads(call.function.arguments)) for call in message.tool_calls or []]
    assert found == calls
    assert all(call.id.startswith("call_") for call in message.tool_calls or [])
    assert len({call.id for call in message.tool_calls or []}) == len(found)


@pytest.mark.parametrize("sizes", [[1], [2, 3], [7], [1, 5, 1, 13]], ids=["char", "2-3", "7", "mixed"])
@pytest.mark.parametrize(("call_format", "text", "content", "calls"), FORMATS, ids=IDS)
def test_streaming_adds_up_to_the_non_streamed_message(call_format, text, content, calls, sizes) -> None:
    _deltas, message = streamed(call_format, text, sizes)
    assert without_ids(message) == without_ids(ToolCallReader(call_format).message(text))
    markup = ("<tool_call>", "</tool_call>", "<|python_tag|>", '"parameters"', '"arguments"')
    if calls:  # no markup reaches the content
        assert not any(mark in (message.content or "") for mark in markup)


def test_markup_is_held_back_until_it_is_known() -> None:
    reader = ToolCallReader(HermesToolParser())
    assert reader.feed("Checking.\n<tool", final=False) == DeltaMessage(content="Checking.")
    assert reader.feed("_call>\n{\"name\": \"get_w", final=False) is None  # the name is not complete yet
    first = reader.feed('eather", "arguments": {"ci', final=False)
    assert first is not None and first.content is None and first.tool_calls is not None
    opening, fragment = first.tool_calls
    assert opening.id is not None and opening.function is not None and opening.function.name == "get_weather"
    assert fragment.id is None and fragment.function is not None and fragment.function.arguments == '{"ci'
    # a "<" that turns out not to begin a tag is released as content
    plain = ToolCallReader(HermesToolParser())
    assert plain.feed("a <", final=False) == DeltaMessage(content="a")
    assert plain.feed("b> c", final=True) == DeltaMessage(content=" <b> c")


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    text = HERMES[1][0]
    message = ToolCallReader(HermesToolParser(), max_calls=1).message(text)
    assert message.tool_calls is not None and len(message.tool_calls) == 1
    _, streamed_message = streamed(HermesToolParser(), text, [3])
    assert streamed_message.tool_calls is not None and len(streamed_message.tool_calls) == 2


def test_json_scan_reports_unfinished_and_malformed_values() -> None:
    assert scan_value('{"a": [1, {"b": "}"}]} tail', 0) == len('{"a": [1, {"b": "}"}]}')
    assert scan_value('{"a": [1, 2', 0) is None
    assert scan_value("12", 0) is None  # a number at the end may go on
    scan = scan_object('{"name": "f", "arguments": {"x": "y', 0)
    assert scan.end is None and scan.complete_value('{"name": "f", "arguments": {"x": "y', "name") == "f"
    with pytest.raises(NotJson):
        scan_value('{"a": 1]', 0)
    with pytest.raises(NotJson):
        scan_object('{"a" 1}', 0)


def test_registry_names_parsers_as_vllm_does() -> None:
    from server.config import TOOL_CALL_PARSERS

    assert set(TOOL_PARSERS) == {"hermes", "llama3_json"} == set(TOOL_CALL_PARSERS)  # what --tool-call-parser takes
    assert isinstance(tool_parser("hermes"), HermesToolParser) and tool_parser(None) is None
    with pytest.raises(ValueError, match=r"--tool-call-parser 'mistral'.*hermes, llama3_json"):
        tool_parser("mistral")


@pytest.mark.parametrize("parser", [HermesToolParser(), Llama3JsonToolParser()], ids=["hermes", "llama3_json"])
def test_rendered_history_calls_parse_back(parser) -> None:
    calls = [("get_weather", WEATHER_PARIS), ("get_weather", WEATHER_ROME)]
    message = ToolCallReader(parser).message(parser.render_calls(calls))
    assert [(call.function.name, json.loads(call.function.arguments)) for call in message.tool_calls or []] == calls
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    assert '"name": "get_weather"' in parser.instructions(tools)
