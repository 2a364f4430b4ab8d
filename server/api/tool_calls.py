"""One choice's generated text as an assistant message with tool_calls: streamed as deltas, or whole.

Both ways read the text through the request's CallFormat (tool_parsers/base.py). A stream sends what each
parse adds to the one before, as OpenAI sends calls:

    {"tool_calls": [{"index": 0, "id": "call_...", "type": "function", "function": {"name": "f", "arguments": ""}}]}
    {"tool_calls": [{"index": 0, "function": {"arguments": "{\\"city\\": "}}]}   ... argument fragments
    {"tool_calls": [{"index": 1, "id": "call_...", ...}]}                         the next call

and the non-streamed message is the final parse, so the deltas add up to it. Content keeps its trailing whitespace
back until more text follows (a call may come next); once the reply has calls, that whitespace is dropped.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from server.api.protocol import (
    ChatCompletionMessage,
    ChatFinishReason,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
from server.api.tool_parsers import CallFormat, ParsedOutput


def new_call_id() -> str:
    """A tool call id, as OpenAI makes them ("call_" and 24 hex digits)."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class _SentCall:
    id: str
    num_arguments: int = 0  # characters of the arguments sent so far


@dataclass(slots=True)
class ToolCallReader:
    """Reads one choice's text into content and tool calls."""

    call_format: CallFormat
    max_calls: int | None = None  # parallel_tool_calls false: calls after the first are dropped
    text: str = ""  # everything generated so far
    sent_content: str = ""
    sent_calls: list[_SentCall] = field(default_factory=list)

    def parse(self, final: bool) -> tuple[str, ParsedOutput]:
        """The content to show and the calls (those with a name, at most max_calls) of the text so far."""
        parsed = self.call_format.parse(self.text, final)
        parsed.calls = [call for call in parsed.calls if call.name is not None][:self.max_calls]
        content = parsed.content if final and not parsed.calls else parsed.content.rstrip()
        return content, parsed

    def feed(self, new_text: str, final: bool) -> DeltaMessage | None:
        """What `new_text` adds to the streamed message.

        Args:
            new_text: the choice's next text.
            final: the choice has finished.

        Returns:
            A DeltaMessage with content and/or tool_calls deltas, or None when it adds nothing yet.
        """
        self.text += new_text
        content, parsed = self.parse(final)
        new_content = content[len(self.sent_content):] if content.startswith(self.sent_content) else ""
        self.sent_content += new_content
        deltas = []
        for index, call in enumerate(parsed.calls):
            assert call.name is not None
            if index == len(self.sent_calls):
                self.sent_calls.append(_SentCall(new_call_id()))
                deltas.append(DeltaToolCall(index=index, id=self.sent_calls[index].id, type="function",
                                            function=DeltaFunctionCall(name=call.name, arguments="")))
            sent = self.sent_calls[index]
            if len(call.arguments) > sent.num_arguments:
                deltas.append(DeltaToolCall(index=index, function=DeltaFunctionCall(
                    arguments=call.arguments[sent.num_arguments:])))
                sent.num_arguments = len(call.arguments)
        if not new_content and not deltas:
            return None
        return DeltaMessage(content=new_content or None, tool_calls=deltas or None)

    @property
    def has_calls(self) -> bool:
        """True once a call has been streamed."""
        return bool(self.sent_calls)

    def message(self, text: str) -> ChatCompletionMessage:
        """The non-streamed message of a finished choice's whole text."""
        self.text = text
        content, parsed = self.parse(final=True)
        calls = [ToolCall(id=new_call_id(), function=FunctionCall(name=call.name, arguments=call.arguments))
                 for call in parsed.calls if call.name is not None]
        return ChatCompletionMessage(content=content or (None if calls else ""), tool_calls=calls or None)


def finish_reason_with_calls(reason: ChatFinishReason | None, has_calls: bool) -> ChatFinishReason | None:
    """ "tool_calls" for a reply with calls that ended by itself; the engine's reason otherwise (a "length" reply's
    calls may be cut short)."""
    return "tool_calls" if has_calls and reason == "stop" else reason
