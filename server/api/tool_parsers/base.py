"""What a tool-call format is: a parse of the model's text so far into content and calls.

Every format (the `--tool-call-parser` ones for tool_choice "auto", and the grammar-forced ones of "required"
and a named function) answers one question for the text generated so far: what is content, and which calls have
begun. Streaming and the non-streamed reply both use that one answer (tool_calls.py), so the streamed deltas add up
to the non-streamed message by construction:

    "Let me look.\\n<tool_call>\\n{"name": "f", "arguments": {"x": 1"
     └─ content ──┘              └ call 0: name "f", arguments '{"x": 1' so far

parse(text, final=False) holds back what may still become markup ("<tool_ca" at the end); parse(text,
final=True) decides everything. A call's name is None until its string is complete; its arguments text only
grows from one parse to the next (it is the model's own JSON text, never re-serialized).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from server.api.tool_parsers.json_scan import ObjectScan

ARGUMENT_KEYS = ("arguments", "parameters")  # Hermes/Qwen write "arguments", Llama 3.x "parameters"


@dataclass(slots=True)
class ParsedCall:
    """One tool call as far as the text goes."""

    name: str | None  # None until the name's string is complete
    arguments: str = ""  # the arguments object's JSON text so far: a prefix of its final text


@dataclass(slots=True)
class ParsedOutput:
    """The text so far, split into content and tool calls."""

    content: str = ""  # the text outside tool-call markup (without what may still begin markup, unless final)
    calls: list[ParsedCall] = field(default_factory=list)


class CallFormat(ABC):
    """How tool calls appear in the generated text."""

    @abstractmethod
    def parse(self, text: str, final: bool) -> ParsedOutput:
        """Split the generated text into content and calls.

        Args:
            text: everything generated so far.
            final: the generation has ended; nothing is held back.

        Returns:
            The ParsedOutput. Parsing a longer text never shortens the content or a call's arguments.
        """


class ToolParser(CallFormat):
    """A format a model writes its calls in by itself (tool_choice "auto"), chosen with --tool-call-parser."""

    name: ClassVar[str]  # the --tool-call-parser value, as vLLM names it

    @abstractmethod
    def instructions(self, tools: list[dict[str, Any]]) -> str:
        """A system prompt describing `tools` and this format, for chat templates that do not render tools.

        Args:
            tools: the request's tools, as OpenAI's JSON ({"type": "function", "function": {...}}).
        """

    @abstractmethod
    def render_calls(self, calls: list[tuple[str, dict[str, Any]]]) -> str:
        """(name, arguments) calls of an earlier assistant turn as the model writes them, for chat templates that do
        not render tool_calls."""


def call_of(text: str, scan: ObjectScan) -> ParsedCall:
    """The call an object of {"name": ..., "arguments" | "parameters": {...}} holds so far.

    Args:
        text: the text the object was scanned in.
        scan: the object's scan.

    Returns:
        The ParsedCall: name None while (or when) the object has no complete string "name"; arguments "{}" for a
        finished object without them.
    """
    name = scan.complete_value(text, "name")
    key = next((key for key in ARGUMENT_KEYS if key in scan.members), None)
    if key is None:
        arguments = "{}" if scan.end is not None else ""
    else:
        arguments = scan.value(text, key) or ""
    return ParsedCall(name=name if isinstance(name, str) else None, arguments=arguments)


def held_marker_length(text: str, marker: str) -> int:
    """How many characters at the end of `text` could begin `marker` (0 if none): those are held back."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0


def tools_json(tools: list[dict[str, Any]]) -> list[str]:
    """Each tool's function as one line of JSON, as tool-use chat templates list them."""
    return [json.dumps(tool.get("function", tool), ensure_ascii=False) for tool in tools]
