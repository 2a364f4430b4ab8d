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
    PromptLogprob,
    PromptLogprobs,
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
        offset = _add_completion_token(result, entry.token_id, entry, tokenizer, num_top, offset)
    return result


def echoed_prompt_logprobs(token_ids: list[int], logprobs: list[TokenLogprob | None], tokenizer: Any,
                           num_top: int, text: str) -> CompletionLogProbs:
    """OpenAI's completions logprobs of an echoed prompt: its first token (nothing predicts it) has null
    token_logprobs and top_logprobs, as OpenAI's legacy completions did.

    Args:
        token_ids: the prompt's tokens.
        logprobs: one per prompt token from the engine (None for the first).
        tokenizer: turns token ids into the strings shown.
        num_top: alternatives asked for (the `logprobs` parameter).
        text: the echoed text; a special token it does not show (a BOS the tokenizer added) takes no characters.

    Returns:
        tokens, token_logprobs, top_logprobs and text_offset (from 0), one entry per prompt token.
    """
    result = CompletionLogProbs()
    offset = 0
    special = set(tokenizer.all_special_ids)
    for token_id, entry in zip(token_ids, logprobs):
        after = _add_completion_token(result, token_id, entry, tokenizer, num_top, offset)
        if token_id not in special or text.startswith(result.tokens[-1], offset):
            offset = after
    return result


def joined(first: CompletionLogProbs, second: CompletionLogProbs) -> CompletionLogProbs:
    """Two runs of completions logprobs one after the other (an echoed prompt, then the generated tokens)."""
    return CompletionLogProbs(tokens=first.tokens + second.tokens,
                              token_logprobs=first.token_logprobs + second.token_logprobs,
                              top_logprobs=first.top_logprobs + second.top_logprobs,
                              text_offset=first.text_offset + second.text_offset)


def _add_completion_token(result: CompletionLogProbs, token_id: int, entry: TokenLogprob | None, tokenizer: Any,
                          num_top: int, offset: int) -> int:
    """Append one token to `result`; returns the text offset after it."""
    token = token_text(token_bytes(tokenizer, token_id))
    result.tokens.append(token)
    result.text_offset.append(offset)
    if entry is None:
        result.token_logprobs.append(None)
        result.top_logprobs.append(None)
    else:
        top: dict[str, float] = {}
        for alternative, logprob in top_alternatives(entry, num_top):
            top.setdefault(token_text(token_bytes(tokenizer, alternative)), logprob)
        top.setdefault(token, entry.logprob)
        result.token_logprobs.append(entry.logprob)
        result.top_logprobs.append(top)
    return offset + len(token)


def vllm_prompt_logprobs(logprobs: list[TokenLogprob | None], tokenizer: Any, num_top: int) -> PromptLogprobs:
    """vLLM's `prompt_logprobs`: per prompt token (None for the first) its own entry and the top `num_top`
    alternatives, keyed by token id, each with its logprob, rank and decoded text.

    Args:
        logprobs: one per prompt token from the engine (None for the first).
        tokenizer: turns token ids into the strings shown.
        num_top: the request's prompt_logprobs.

    Returns:
        One dict (or None) per prompt token.
    """
    result: PromptLogprobs = []
    for entry in logprobs:
        if entry is None:
            result.append(None)
            continue
        position = {str(entry.token_id): PromptLogprob(  # the prompt's own token first, as vLLM lists it
            logprob=entry.logprob, rank=entry.rank, decoded_token=token_text(token_bytes(tokenizer, entry.token_id)))}
        for rank, (token_id, logprob) in enumerate(top_alternatives(entry, num_top), start=1):
            position.setdefault(str(token_id), PromptLogprob(
                logprob=logprob, rank=rank, decoded_token=token_text(token_bytes(tokenizer, token_id))))
        result.append(position)
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
