"""Token log-probabilities in OpenAI's two shapes, and the text and bytes shown for each token.

A token need not be valid UTF-8 on its own (byte-level BPE splits characters), so each token is shown
by its raw bytes: as text when they decode, else as OpenAI does, "bytes:\\xe2\\x80"; chat also lists the
bytes themselves so that clients can join tokens back into characters.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from server.api.protocol import (
    ChatCompletionLogProbs,
    ChatCompletionTokenLogprob,
    ChatCompletionTopLogprob,
    CompletionLogProbs,
)
from server.engine.outputs import TokenLogprob

BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece's byte tokens


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet reversed: the printable character standing for each byte -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    characters, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            characters[chr(byte)] = byte
        else:
            characters[chr(256 + extra)] = byte
            extra += 1
    return characters


def is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.decoder).__name__ == "ByteLevel"


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The raw bytes one token stands for.

    Args:
        tokenizer: a transformers tokenizer.
        token_id: the token.

    Returns:
        Its bytes: exact for byte-level BPE and sentencepiece byte tokens, else its decoded text in UTF-8.
    """
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if piece is None:
        return b""
    if token_id in tokenizer.all_special_ids:
        return piece.encode()
    alphabet = byte_level_alphabet()
    if is_byte_level(tokenizer) and all(character in alphabet for character in piece):
        return bytes(alphabet[character] for character in piece)
    fallback = BYTE_FALLBACK.fullmatch(piece)
    if fallback:
        return bytes([int(fallback.group(1), 16)])
    return tokenizer.decode([token_id]).encode()


def token_text(raw: bytes) -> str:
    """A token's text: its bytes decoded, or "bytes:\\xNN..." when they are not valid UTF-8 alone."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw)


def top_alternatives(entry: TokenLogprob, num_top: int) -> list[tuple[int, float]]:
    """The `num_top` most likely (token id, logprob), most likely first."""
    return sorted(entry.top.items(), key=lambda item: -item[1])[:num_top]


def completion_logprobs(logprobs: list[TokenLogprob], tokenizer: Any, num_top: int,
                        start_offset: int) -> CompletionLogProbs:
    """OpenAI's completions logprobs object for generated tokens.

    Args:
        logprobs: one TokenLogprob per generated token.
        tokenizer: turns token ids into the strings shown.
        num_top: alternatives asked for (the `logprobs` parameter); the sampled token is always listed too.
        start_offset: character offset of the first token in the choice's text (echoed prompt length,
            plus text already streamed).

    Returns:
        tokens, token_logprobs, top_logprobs and text_offset, one entry per token.
    """
    result = CompletionLogProbs()
    offset = start_offset
    for entry in logprobs:
        token = token_text(token_bytes(tokenizer, entry.token_id))
        top: dict[str, float] = {}
        for token_id, logprob in top_alternatives(entry, num_top):
            top.setdefault(token_text(token_bytes(tokenizer, token_id)), logprob)
        top.setdefault(token, entry.logprob)
        result.tokens.append(token)
        result.token_logprobs.append(entry.logprob)
        result.top_logprobs.append(top)
        result.text_offset.append(offset)
        offset += len(token)
    return result


def chat_logprobs(logprobs: list[TokenLogprob], tokenizer: Any, num_top: int) -> ChatCompletionLogProbs:
    """OpenAI's chat logprobs object: per token its text, logprob, bytes and `num_top` alternatives."""
    content = []
    for entry in logprobs:
        raw = token_bytes(tokenizer, entry.token_id)
        top = []
        for token_id, logprob in top_alternatives(entry, num_top):
            alternative = token_bytes(tokenizer, token_id)
            top.append(
                ChatCompletionTopLogprob(token=token_text(alternative), logprob=logprob, bytes=list(alternative))
            )
        content.append(ChatCompletionTokenLogprob(token=token_text(raw), logprob=entry.logprob, bytes=list(raw),
                                                  top_logprobs=top))
    return ChatCompletionLogProbs(content=content)
