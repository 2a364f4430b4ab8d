"""Llama 3.1 / 3.2 / 3.3 JSON tool calls: {"name": ..., "parameters": {...}} objects, several joined by ";".

    {"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_weather", "parameters": {"city": "Rome"}}

The calls may follow text (then they begin a line) and may be preceded by <|python_tag|>. An object at a line's
start is a call when its first key is "name" (or "type", as Llama 3.2 sometimes writes {"type": "function", ...});
other JSON is content. "arguments" is accepted for "parameters".
"""

from __future__ import annotations

import json
import re
from typing import Any

from server.api.tool_parsers.base import ParsedOutput, ToolParser, call_of, held_marker_length, tools_json
from server.api.tool_parsers.json_scan import NotJson, scan_object, skip_whitespace

PYTHON_TAG = "<|python_tag|>"
CALL_KEYS = ("name", "type")  # the first key of an object that is a call
_CANDIDATE = re.compile(r"^[ \t]*\{|" + re.escape(PYTHON_TAG), re.MULTILINE)  # where calls may begin


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        """See CallFormat.parse."""
        output = ParsedOutput()
        position = 0
        while True:
            match = _CANDIDATE.search(text, position)
            if match is None:
                tail = text[position:]
                output.content += tail if final else tail[:len(tail) - held_marker_length(tail, PYTHON_TAG)]
                return output
            start = match.end() if match.group() == PYTHON_TAG else match.end() - 1
            output.content += text[position:match.start()] + match.group()[:-1] * (match.group() != PYTHON_TAG)
            position = self._calls(text, skip_whitespace(text, start), final, output)
            if position is None:
                return output

    def _calls(self, text: str, start: int, final: bool, output: ParsedOutput) -> int | None:
        """Parse the calls (joined by ";") beginning at `start` into `output`.

        Returns:
            Where the content goes on, or None when the text so far is used up (or held back).
        """
        while True:
            if start >= len(text):  # <|python_tag|> and nothing yet
                return None
            if text[start] != "{":  # <|python_tag|> before something else (code for a built-in tool): content
                return start
            try:
                scan = scan_object(text, start)
            except NotJson:
                output.content += "{"
                return start + 1
            first_key = next(iter(scan.members), None)
            if first_key is None and scan.end is None:  # undecided: held back until the first key is known
                if final:
                    output.content += text[start:]
                return None
            call = call_of(text, scan)
            if first_key not in CALL_KEYS or (call.name is None and (scan.end is not None or final)):
                output.content += text[start:scan.end]  # JSON, but not a call (to the end of the text if unfinished)
                return scan.end
            output.calls.append(call)
            if scan.end is None:
                return None
            after = skip_whitespace(text, scan.end)
            if after >= len(text) or text[after] != ";":
                return scan.end
            start = skip_whitespace(text, after + 1)
            if start >= len(text):
                return start if final else None  # the next call may be arriving

    def instructions(self, tools: list[dict[str, Any]]) -> str:
        """See ToolParser.instructions (the wording of Llama 3.1's JSON tool-calling prompt)."""
        listing = "\n\n".join(tools_json(tools))
        return ("Given the following functions, please respond with a JSON for a function call with its proper "
                "arguments that best answers the given prompt.\n\n"
                'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
                "value}. Do not use variables.\n\n" + listing)

    def render_calls(self, calls: list[tuple[str, dict[str, Any]]]) -> str:
        """See ToolParser.render_calls."""
        return "; ".join(json.dumps({"name": name, "parameters": arguments}, ensure_ascii=False)
                         for name, arguments in calls)
