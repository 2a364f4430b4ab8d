"""Tool-call parsers for tool_choice "auto", by their --tool-call-parser name (vLLM's names).

    TOOL_PARSERS["hermes"]       <tool_call>{"name": ..., "arguments": ...}</tool_call>   Hermes, Qwen2.5, Qwen3
    TOOL_PARSERS["llama3_json"]  {"name": ..., "parameters": ...}; {...}                  Llama 3.1, 3.2, 3.3
"""

from __future__ import annotations

from server.api.tool_parsers.base import CallFormat, ParsedCall, ParsedOutput, ToolParser
from server.api.tool_parsers.hermes import HermesToolParser
from server.api.tool_parsers.llama3_json import Llama3JsonToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {parser.name: parser for parser in (HermesToolParser, Llama3JsonToolParser)}

__all__ = ["TOOL_PARSERS", "CallFormat", "ParsedCall", "ParsedOutput", "ToolParser", "tool_parser"]


def tool_parser(name: str | None) -> ToolParser | None:
    """The parser called `name` (None: no parser, tool_choice "auto" is refused).

    Raises:
        ValueError: naming --tool-call-parser and the known parsers when there is none of that name.
    """
    if name is None:
        return None
    if name not in TOOL_PARSERS:
        raise ValueError(f"--tool-call-parser {name!r} is not a tool-call parser; choose one of: "
                         f"{', '.join(sorted(TOOL_PARSERS))}")
    return TOOL_PARSERS[name]()
