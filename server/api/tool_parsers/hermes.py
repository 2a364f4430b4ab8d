"""Hermes / Qwen2.5 tool calls: JSON objects inside <tool_call></tool_call> tags, after optional text.

    I'll check both cities.
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Rome"}}
    </tool_call>

Text outside the tags is content. A tag whose body is not a {"name": ..., "arguments": ...} object stays content,
markup and all; a missing closing tag at the end of the output is forgiven.
"""

from __future__ import annotations

import json
from typing import Any

from server.api.tool_parsers.base import ParsedOutput, ToolParser, call_of, held_marker_length, tools_json
from server.api.tool_parsers.json_scan import NotJson, scan_object, skip_whitespace

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        """See CallFormat.parse."""
        output = ParsedOutput()
        position = 0
        while True:
            start = text.find(START, position)
            if start < 0:
                tail = text[position:]
                output.content += tail if final else tail[:len(tail) - held_marker_length(tail, START)]
                return output
            output.content += text[position:start]
            body = skip_whitespace(text, start + len(START))
            if body >= len(text):  # nothing after the tag yet
                if final:
                    output.content += text[start:]
                return output
            try:
                scan = scan_object(text, body) if text[body] == "{" else None
            except NotJson:
                scan = None
            if scan is None:  # not a call: the tag is text
                output.content += START
                position = start + len(START)
                continue
            call = call_of(text, scan)
            if scan.end is None:  # the call goes on past the text
                if call.name is not None or not final:
                    output.calls.append(call)
                else:
                    output.content += text[start:]
                return output
            if call.name is None:  # a finished object that names no function: text
                output.content += text[start:scan.end]
                position = scan.end
                continue
            output.calls.append(call)
            after = skip_whitespace(text, scan.end)
            if text.startswith(END, after):
                position = after + len(END)
            elif not final and END.startswith(text[after:]):  # the closing tag may be arriving
                return output
            else:
                position = scan.end

    def instructions(self, tools: list[dict[str, Any]]) -> str:
        """See ToolParser.instructions (the wording of Qwen2.5's tool-use template)."""
        listing = "\n".join(tools_json(tools))
        return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n"
                f"<tools>\n{listing}\n</tools>\n\n"
                "For each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n"
                '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')

    def render_calls(self, calls: list[tuple[str, dict[str, Any]]]) -> str:
        """See ToolParser.render_calls."""
        return "\n".join(f"{START}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{END}"
                         for name, arguments in calls)
