"""The formats of tool_choice "required" and a named function: the grammar makes the whole output the calls.

    "required":  [{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": ...}]   (a JSON array)
    named "f":   {"city": "Paris"}                                                          (f's arguments)

There is never content. The grammars themselves are built in server/api/tool_choice.py.
"""

from __future__ import annotations

from server.api.tool_parsers.base import CallFormat, ParsedCall, ParsedOutput, call_of
from server.api.tool_parsers.json_scan import NotJson, scan_object, skip_whitespace


class CallArray(CallFormat):
    """tool_choice "required": a JSON array of {"name", "parameters"} objects."""

    def parse(self, text: str, final: bool) -> ParsedOutput:
        """See CallFormat.parse."""
        output = ParsedOutput()
        position = skip_whitespace(text, 0)
        if position >= len(text) or text[position] != "[":
            return output
        position = skip_whitespace(text, position + 1)
        while position < len(text) and text[position] == "{":
            try:
                scan = scan_object(text, position)
            except NotJson:
                return output
            output.calls.append(call_of(text, scan))
            if scan.end is None:
                return output
            position = skip_whitespace(text, scan.end)
            if position < len(text) and text[position] == ",":
                position = skip_whitespace(text, position + 1)
        return output


class NamedCall(CallFormat):
    """A named function: the output is that function's arguments object."""

    def __init__(self, name: str) -> None:
        self.name = name

    def parse(self, text: str, final: bool) -> ParsedOutput:
        """See CallFormat.parse."""
        return ParsedOutput(calls=[ParsedCall(name=self.name, arguments=text.lstrip())])
