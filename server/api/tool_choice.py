"""What a chat request's `tools` and `tool_choice` ask for: the grammar, the call format and the template's tools.

    tool_choice      the model sees the tools   grammar (xgrammar)                        the reply's calls from
    "none"           no                         none (response_format as asked)           nowhere: plain text
    "auto"           yes                        none (response_format as asked)           the --tool-call-parser
    "required"       yes                        [{"name": <tool>, "parameters": <its      CallArray
                                                 schema>}, ...] (at least one)
    named function   yes                        that function's parameters schema         NamedCall

"auto" is the default when tools are given ("none" without tools), as in OpenAI's API; it needs a parser
(--tool-call-parser), since only the model's own format tells calls from text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from server.api.errors import InvalidRequestError
from server.api.protocol import ChatCompletionRequest, ChatTool
from server.api.tool_parsers import TOOL_PARSERS, CallFormat, ToolParser
from server.api.tool_parsers.forced import CallArray, NamedCall
from server.engine.sampling_params import StructuredOutputParams

_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")  # xgrammar's C++ prefix
NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}}  # a function declared without parameters


@dataclass(slots=True)
class ToolPlan:
    """How one chat request uses its tools."""

    call_format: CallFormat | None  # how calls appear in the output; None: the reply is plain text
    grammar: StructuredOutputParams | None  # replaces response_format's ("required", a named function)
    template_tools: list[dict[str, Any]] | None  # the tools given to the chat template (OpenAI's JSON)
    max_calls: int | None  # parallel_tool_calls false: 1; otherwise None (any number)


def parameters_of(tool: ChatTool) -> dict[str, Any]:
    """A tool's arguments schema (an empty object's when it declares none)."""
    return tool.function.parameters if tool.function.parameters is not None else NO_ARGUMENTS


def plan_tools(request: ChatCompletionRequest, parser: ToolParser | None) -> ToolPlan:
    """Check tools and tool_choice and say how the request uses them.

    Args:
        request: the validated chat request.
        parser: the server's --tool-call-parser (None when it has none).

    Returns:
        The ToolPlan. Raises InvalidRequestError naming the parameter: tool_choice without tools, an unknown
        function, "auto" without a parser, a forced call with response_format, stop strings or beam search,
        a parameters schema the grammar compiler cannot use, two tools of one name.
    """
    tools = request.tools or []
    choice = request.tool_choice if request.tool_choice is not None else ("auto" if tools else "none")
    if choice != "none" and not tools:
        raise InvalidRequestError("'tool_choice' needs 'tools': give the functions the model may call", "tool_choice")
    names = [tool.function.name for tool in tools]
    for position, name in enumerate(names):
        if name in names[:position]:
            param = f"tools[{position}].function.name"
            raise InvalidRequestError(f"'{param}': two tools are called {name!r}; give each function its own name",
                                      param)
    max_calls = None if request.parallel_tool_calls else 1
    if choice == "none":
        return ToolPlan(None, None, None, None)
    template_tools = [tool.model_dump(exclude_none=True) for tool in tools]
    if choice == "auto":
        if parser is None:
            raise InvalidRequestError(
                "'tool_choice' \"auto\" (the default when 'tools' are given) needs the server started with "
                f"--tool-call-parser ({' or '.join(sorted(TOOL_PARSERS))}, the format the model writes calls in); "
                "or send tool_choice \"required\", a named function, or \"none\"", "tool_choice")
        return ToolPlan(parser, None, template_tools, max_calls)
    check_forced(request)
    if choice == "required":
        for position, tool in enumerate(tools):
            check_schema(parameters_of(tool), f"tools[{position}].function.parameters")
        return ToolPlan(CallArray(), StructuredOutputParams(kind="json_schema", json_schema=calls_schema(
            tools, max_calls)), template_tools, max_calls)
    assert not isinstance(choice, str), choice
    name = choice.function.name
    if name not in names:
        raise InvalidRequestError(f"'tool_choice' names the function {name!r}, which is not in 'tools' "
                                  f"({', '.join(map(repr, names))})", "tool_choice")
    position = names.index(name)
    schema = parameters_of(tools[position])
    check_schema(schema, f"tools[{position}].function.parameters")
    return ToolPlan(NamedCall(name), StructuredOutputParams(kind="json_schema", json_schema=schema),
                    template_tools, 1)


def calls_schema(tools: list[ChatTool], max_calls: int | None) -> dict[str, Any]:
    """The JSON schema of tool_choice "required": an array of at least one call of any of `tools`."""
    calls = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [tool.function.name]},
                             "parameters": parameters_of(tool)},
              "required": ["name", "parameters"], "additionalProperties": False}
             for tool in tools]
    schema: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
                              "minItems": 1}
    if max_calls is not None:
        schema["maxItems"] = max_calls
    return schema


def check_forced(request: ChatCompletionRequest) -> None:
    """Refuse what cannot go with a grammar-forced call ("required" or a named function), naming it."""
    if request.response_format is not None and request.response_format.type != "text":
        raise InvalidRequestError("'response_format' cannot be combined with tool_choice \"required\" or a named "
                                  "function: the tools' schemas decide the output", "response_format")
    for name in ("stop", "stop_token_ids", "min_tokens"):
        if getattr(request, name):
            raise InvalidRequestError(f"'{name}' cannot be combined with tool_choice \"required\" or a named function: "
                                      "the grammar decides where the calls end", name)
    if request.use_beam_search:
        raise InvalidRequestError("beam search cannot force tool calls; remove 'use_beam_search' or send "
                                  "tool_choice \"auto\" or \"none\"", "use_beam_search")


def check_schema(schema: dict[str, Any], param: str) -> None:
    """Raise a 400 naming `param` when xgrammar cannot build a grammar from the JSON schema."""
    import xgrammar

    try:
        xgrammar.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
    except Exception as error:  # xgrammar raises RuntimeError (C++ checks) and its own error types
        lines = str(error).strip().splitlines()
        message = _LOCATION.sub("", lines[0]) if lines else repr(error)
        raise InvalidRequestError(f"'{param}': the JSON schema cannot be used: {message}", param) from None
