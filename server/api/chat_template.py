"""The request's messages and tools as the tokenizer's chat template takes them, as transformers'
apply_chat_template(messages, tools=...) does for tool-use templates (Qwen2.5, Llama 3.1, Hermes):

    messages[i].content parts      ──▶ one string
    "developer"                    ──▶ "system"
    assistant tool_calls           ──▶ [{"id", "type", "function": {"name", "arguments": <dict>}}] (arguments decoded:
                                       templates write them with `| tojson`)
    tools                          ──▶ apply_chat_template(tools=[{"type": "function", "function": {...}}])

A template that does not mention `tools` would drop them silently; the tools are then described in the system
message (first message; added when there is none) in the --tool-call-parser's format, and earlier calls written
into their assistant message's content in that format, so that the model can see both.
"""

from __future__ import annotations

import json
from typing import Any

from server.api.errors import InvalidRequestError
from server.api.protocol import ChatMessage
from server.api.tool_parsers import ToolParser


def template_source(tokenizer: Any) -> str:
    """The chat template's Jinja source (all named templates, when there are several)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return "\n".join(str(source) for source in template.values())
    return str(template or "")


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as the chat template expects them: role and content text (text parts joined), tool calls.

    Args:
        messages: the request's messages.

    Returns:
        A list of plain dicts. Raises InvalidRequestError for a content part that is not text, and for tool call
        arguments that are not a JSON object.
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
        if message.tool_calls:
            entry["tool_calls"] = [
                {"id": call.id, "type": call.type,
                 "function": {"name": call.function.name,
                              "arguments": arguments_of(call.function.arguments,
                                                        f"messages[{position}].tool_calls[{index}].function.arguments")}}
                for index, call in enumerate(message.tool_calls)]
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        result.append(entry)
    return result


def arguments_of(arguments: str, param: str) -> dict[str, Any]:
    """A tool call's arguments JSON text decoded (a 400 naming `param` unless it is a JSON object)."""
    try:
        value = json.loads(arguments)
    except ValueError as error:
        raise InvalidRequestError(f"'{param}' is not valid JSON: {error}", param) from None
    if not isinstance(value, dict):
        raise InvalidRequestError(f"'{param}' must be a JSON object of the arguments, got {arguments[:40]!r}", param)
    return value


def with_tools_described(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, template: str,
                         parser: ToolParser | None) -> list[dict[str, Any]]:
    """The messages, with the tools and earlier calls written as text where the template would drop them.

    Args:
        messages: template_messages' output.
        tools: the tools the template is given (None: none).
        template: the chat template's source.
        parser: the --tool-call-parser, whose format the text uses (None: a JSON listing and JSON calls).

    Returns:
        `messages` itself when the template renders tools and tool calls; otherwise changed copies.
    """
    if tools and "tools" not in template:
        instructions = parser.instructions(tools) if parser is not None else generic_instructions(tools)
        if messages and messages[0]["role"] == "system":
            first = messages[0]
            messages = [{**first, "content": f"{first['content']}\n\n{instructions}".lstrip()}, *messages[1:]]
        else:
            messages = [{"role": "system", "content": instructions}, *messages]
    if "tool_calls" not in template and any(message.get("tool_calls") for message in messages):
        messages = [with_calls_in_content(message, parser) if message.get("tool_calls") else message
                    for message in messages]
    return messages


def with_calls_in_content(message: dict[str, Any], parser: ToolParser | None) -> dict[str, Any]:
    """An assistant message whose tool_calls are appended to its content as the model would write them."""
    calls = [(call["function"]["name"], call["function"]["arguments"]) for call in message["tool_calls"]]
    text = parser.render_calls(calls) if parser is not None else json.dumps(
        [{"name": name, "parameters": arguments} for name, arguments in calls], ensure_ascii=False)
    return {**message, "content": f"{message['content']}\n{text}" if message["content"] else text}


def generic_instructions(tools: list[dict[str, Any]]) -> str:
    """The tools described without a parser's format (tool_choice "required" or a named function)."""
    listing = "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)
    return ("You can call these functions (JSON Schema of their parameters):\n" + listing +
            '\n\nTo call functions, reply with a JSON array of {"name": <function name>, "parameters": '
            "<arguments object>}.")
