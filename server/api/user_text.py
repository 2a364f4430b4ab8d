r"""The text users send: checked to be encodable, and tokenized with special-token text kept as plain text.

Two rules for every string of a request:

- It must be valid Unicode text: a lone surrogate (JSON `"\ud800"`) cannot be encoded as UTF-8, so the
  tokenizer (and the JSON of any error echoing it) would fail on it. It is a 400 naming the parameter.
- Unless the operator passed --special-tokens-in-input, the text of a special token in it ("<|eos|>") is
  tokenized as plain text, not as the control token, so that a user cannot end their turn and write a
  system turn. The chat template's own markup stays special. A chat prompt is rendered with a marker in
  place of each user string that holds special-token text, and cut at the special tokens of the markup only:

      rendered with markers:  <|bos|><|user|>\n@@inflight-<nonce>-0@@<|eos|>\n<|assistant|>\n
      cut:                    <|bos|> <|user|> [\n + the user's text] <|eos|> [\n] <|assistant|> [\n]
      tokenized:              each special token as itself; each [run] with split_special_tokens=True

  A prompt whose user strings hold no special-token text is tokenized in one piece, as before: runs give the
  same tokens for a byte-level BPE, but a sentencepiece tokenizer would start each run with a word boundary.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from pydantic import BaseModel

from server.api.errors import InvalidRequestError

LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # a surrogate str can only hold unpaired: JSON pairs decode to one char
Render = Callable[[list[dict[str, Any]]], str]  # messages -> the chat template's text


def check_encodable(request: BaseModel) -> None:
    """Raise a 400 naming the first string of `request` (at any depth) that holds a lone surrogate.

    Args:
        request: a validated request model.
    """
    for param, text in strings_of(request, ""):
        if not text.isascii() and (match := LONE_SURROGATE.search(text)) is not None:
            raise InvalidRequestError(
                f"'{param}' holds a lone surrogate (U+{ord(match.group()):04X} at character {match.start()}), which is "
                "not valid Unicode text; send text that encodes as UTF-8 (a surrogate pair in JSON is fine)", param)


def strings_of(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """(param, string) for every string in `value`, dict keys included; params as in the error JSON."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, BaseModel):
        for name, field in type(value).model_fields.items():
            yield from strings_of(getattr(value, name), _join(path, field.alias or name))
        for name, extra in (value.model_extra or {}).items():
            yield from strings_of(extra, _join(path, name))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            if not isinstance(item, int | float):  # token ids: nothing to check, and prompts hold many
                yield from strings_of(item, f"{path}[{index}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from strings_of(key, path)
            yield from strings_of(item, _join(path, str(key)))


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


class PromptEncoder:
    """Tokenizes prompts from user text; special-token text in it stays plain unless `special_tokens_in_input`."""

    def __init__(self, tokenizer: Any, special_tokens_in_input: bool) -> None:
        """
        Args:
            tokenizer: the served model's transformers tokenizer.
            special_tokens_in_input: the operator's --special-tokens-in-input: tokenize user text as it is,
                special-token text becoming control tokens (the behaviour before the default changed).
        """
        self.tokenizer = tokenizer
        self.special_tokens_in_input = special_tokens_in_input
        special = set(tokenizer.all_special_tokens)
        special.update(token.content for token in tokenizer.added_tokens_decoder.values() if token.special)
        texts = sorted((text for text in special if text), key=len, reverse=True)
        self.special_text = re.compile("|".join(map(re.escape, texts))) if texts else None

    def has_special_text(self, text: str) -> bool:
        """True if `text` holds the text of one of the tokenizer's special tokens."""
        return self.special_text is not None and self.special_text.search(text) is not None

    def encode_prompt(self, text: str) -> list[int]:
        """A completions prompt given as text, with the tokenizer's BOS (if it adds one)."""
        if self.special_tokens_in_input:
            return self.tokenizer.encode(text)
        return self.tokenizer.encode(text, split_special_tokens=True)

    def encode_chat(self, messages: list[dict[str, Any]], render: Render) -> tuple[str, list[int]]:
        """Render `messages` through the chat template and tokenize it; user strings with special text stay plain.

        Args:
            messages: the messages as the template takes them (template_messages).
            render: messages -> the template's text; raises InvalidRequestError when the template refuses them.

        Returns:
            (the rendered text, its token ids). Raises InvalidRequestError naming the message string when the
            template transforms it beyond trimming, so that its place in the text cannot be found.
        """
        text = render(messages)
        if self.special_tokens_in_input or not any(
                self.has_special_text(string) for _, string in _user_strings(messages)):
            return text, self.tokenizer.encode(text, add_special_tokens=False)
        return text, self.encode_in_segments(messages, render, text, self.has_special_text)

    def encode_in_segments(self, messages: list[dict[str, Any]], render: Render, text: str,
                           is_plain: Callable[[str], bool]) -> list[int]:
        """Tokenize `text` (the rendering of `messages`) with the message strings picked by `is_plain` as plain text.

        Each picked string is replaced by a marker (its leading and trailing whitespace left outside, so that a
        template's `trim` gives the same text), the messages are rendered again, and the rendering is cut at the
        markers into markup and plain pieces. The special tokens of the markup are the only cuts of the text: the
        runs between them (markup text and plain text together) are tokenized with special tokens split, as
        the tokenizer itself tokenizes the text between special tokens.
        """
        nonce = uuid.uuid4().hex
        plain: list[tuple[str, str]] = []  # (param, the string without its outer whitespace), by marker number

        def mark(param: str, string: str) -> str:
            core = string.strip()
            if not core or not is_plain(string):
                return string
            plain.append((param, core))
            start = len(string) - len(string.lstrip())
            return f"{string[:start]}@@inflight-{nonce}-{len(plain) - 1}@@{string[start + len(core):]}"

        parts = re.split(f"@@inflight-{nonce}-(\\d+)@@", render(_map_user_strings(messages, mark)))
        pieces = [part if position % 2 == 0 else plain[int(part)][1] for position, part in enumerate(parts)]
        if "".join(pieces) != text:
            param = plain[0][0] if plain else "messages"
            raise InvalidRequestError(
                f"'{param}' holds the text of a special token, and the chat template changes the message text in a "
                "way that leaves no safe place to keep it as plain text; remove the special-token text", param)
        token_ids: list[int] = []
        run = ""  # text since the last special token of the markup
        for position, piece in enumerate(pieces):
            if position % 2 == 1 or self.special_text is None:
                run += piece
                continue
            cursor = 0
            for match in self.special_text.finditer(piece):
                token_ids += self._encode_plain(run + piece[cursor:match.start()])
                token_ids += self.tokenizer.encode(match.group(), add_special_tokens=False)
                run, cursor = "", match.end()
            run += piece[cursor:]
        return token_ids + self._encode_plain(run)

    def _encode_plain(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True) if text else []


def _user_strings(messages: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
    """(param, string) for every string the user gave in the messages (the role is not one)."""
    for position, message in enumerate(messages):
        for key, value in message.items():
            if key != "role":
                yield from strings_of(value, f"messages[{position}].{key}")


def _map_user_strings(messages: list[dict[str, Any]], change: Callable[[str, str], str]) -> list[dict[str, Any]]:
    """Copies of the messages with every user string s (not the role, not dict keys) replaced by change(param, s)."""

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, str):
            return change(path, value)
        if isinstance(value, list):
            return [walk(item, f"{path}[{index}]") for index, item in enumerate(value)]
        if isinstance(value, dict):
            return {key: walk(item, f"{path}.{key}") for key, item in value.items()}
        return value

    return [{key: value if key == "role" else walk(value, f"messages[{position}].{key}")
             for key, value in message.items()} for position, message in enumerate(messages)]
