"""Reading JSON that may still be growing: where a value ends, or that it has not ended yet.

A streamed tool call arrives a few characters at a time; these functions tell, for the text so far, which
members of a call's object are complete, so that a call's name is sent once known and its arguments as they grow:

    {"name": "get_weather", "arguments": {"city": "Par        <- text so far
             └─ complete ──┘             └ start, end None: every character from start on is arguments text
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

WHITESPACE = " \t\n\r"
_LITERAL_CHARS = frozenset("-+.0123456789eEtruefalsn")  # numbers, true, false, null
_CLOSING = {"}": "{", "]": "["}


class NotJson(ValueError):
    """The text cannot be the beginning of the JSON value expected there."""


@dataclass(slots=True)
class ObjectScan:
    """An object's members as far as the text goes."""

    members: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # key -> (value start, end or None)
    end: int | None = None  # index after the closing brace; None: the object goes on past the text

    def value(self, text: str, key: str) -> str | None:
        """The JSON text of a member's value so far (the rest of `text` while it is unfinished), or None."""
        if key not in self.members:
            return None
        start, end = self.members[key]
        return text[start:] if end is None else text[start:end]

    def complete_value(self, text: str, key: str) -> object | None:
        """A member's value decoded, once it is complete (None before, or when it is not valid JSON)."""
        if key not in self.members or self.members[key][1] is None:
            return None
        try:
            return json.loads(self.value(text, key) or "")
        except ValueError:
            return None


def skip_whitespace(text: str, position: int) -> int:
    """The first index at or after `position` that is not JSON whitespace (len(text) if none)."""
    while position < len(text) and text[position] in WHITESPACE:
        position += 1
    return position


def scan_string(text: str, position: int) -> int | None:
    """The index after the string starting at `position` (a '"'), or None when the text ends inside it."""
    index = position + 1
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
        elif char == '"':
            return index + 1
        else:
            index += 1
    return None


def scan_value(text: str, position: int) -> int | None:
    """The index after the JSON value starting at `position`, or None when the text ends before the value does.

    Raises NotJson when the text there cannot begin a JSON value (brackets are matched, strings skipped;
    the inside of a value is not checked further).
    """
    if position >= len(text):
        return None
    char = text[position]
    if char == '"':
        return scan_string(text, position)
    if char in "{[":
        stack = [char]
        index = position + 1
        while index < len(text):
            char = text[index]
            if char == '"':
                end = scan_string(text, index)
                if end is None:
                    return None
                index = end
                continue
            if char in "{[":
                stack.append(char)
            elif char in _CLOSING:
                if stack.pop() != _CLOSING[char]:
                    raise NotJson(f"{char!r} at {index} closes nothing that is open")
                if not stack:
                    return index + 1
            index += 1
        return None
    if char in _LITERAL_CHARS:
        index = position
        while index < len(text) and text[index] in _LITERAL_CHARS:
            index += 1
        return None if index == len(text) else index  # a number at the end of the text may go on
    raise NotJson(f"{char!r} at {position} cannot begin a JSON value")


def scan_object(text: str, position: int) -> ObjectScan:
    """The members of the object starting at `position` (a '{'), as far as the text goes.

    Returns:
        An ObjectScan; its `end` is None while the object is unfinished. Raises NotJson when the text is not
        the beginning of an object.
    """
    scan = ObjectScan()
    index = skip_whitespace(text, position + 1)
    while index < len(text):
        if text[index] == "}":
            scan.end = index + 1
            return scan
        if text[index] != '"':
            raise NotJson(f"{text[index]!r} at {index} where a key was expected")
        key_end = scan_string(text, index)
        if key_end is None:
            return scan
        key = json.loads(text[index:key_end])
        index = skip_whitespace(text, key_end)
        if index >= len(text):
            return scan
        if text[index] != ":":
            raise NotJson(f"{text[index]!r} at {index} where ':' was expected")
        index = skip_whitespace(text, index + 1)
        if index >= len(text):
            scan.members[key] = (index, None)
            return scan
        end = scan_value(text, index)
        scan.members[key] = (index, end)
        if end is None:
            return scan
        index = skip_whitespace(text, end)
        if index < len(text) and text[index] == ",":
            index = skip_whitespace(text, index + 1)
        elif index < len(text) and text[index] != "}":
            raise NotJson(f"{text[index]!r} at {index} where ',' or '}}' was expected")
    return scan
