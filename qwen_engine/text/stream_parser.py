"""Incremental parsing of a streamed Qwen answer into reasoning, content and tool-call deltas.

An OpenAI-compatible server streams a chat answer as `reasoning_content`, `content` and `tool_calls`
deltas while the model is still generating. `StreamParser` takes the raw text deltas of the model, cut
anywhere (even inside a tag), and gives back those deltas. Whatever the cuts, what it emits adds up to what
the non-streaming `parse_answer` (parsers.py) gives for the whole text:

- the concatenated reasoning equals `parse_answer(text).reasoning or ""` (None, "no think block", and "",
  "an empty one", both stream as nothing; `has_think_block` tells them apart at the end);
- the concatenated content equals `parse_answer(text).content`;
- the tool calls equal `parse_answer(text).tool_calls` (names and arguments; ids are fresh), each sent as
  one `ToolCallDelta` whose `arguments` is the whole `arguments_json`.

Why text is held back:

- A tag may be cut across deltas (`</thi` + `nk>`). The end of the text that could still be the start of
  the tag the parser is watching for (`<think>` at the very start, `</think>` in reasoning, `<tool_call>`
  in the answer) waits for the next delta; everything before it goes out at once. So at most the length
  of a tag minus one character waits, and only when the text ends in something like `<`, `</th`, `<tool`.
- Reasoning and content are stripped like the non-streaming parser strips them: leading whitespace is
  dropped, and trailing whitespace waits until something other than whitespace follows (it may be the
  last of the text, or come just before `</think>` or a tool call).
- A `<tool_call>` block waits whole until it parses (then it is a call) or can no longer parse whatever
  follows (then its text is content, as parse_tool_calls leaves it). Sending a call's name or arguments
  earlier could announce a call that then turns out malformed and must be content after all, and Hermes
  arguments are re-serialised (json.dumps), so the raw text is not what the client must receive anyway.

- With `tool_names`, an answer that opens with `{` or a code fence waits whole while it may still be nothing but untagged
  call objects (parse_answer's bare calls): until it can no longer be, or to the end of the stream. An
  object is judged once it closes.

Parsing never raises; `finish()` flushes what was held back (a tag prefix, trailing whitespace is dropped,
an unclosed block becomes content).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from .parsers import (
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ToolCall,
    bare_tool_calls_may_complete,
    parse_bare_tool_calls,
    parse_tool_call_block,
    parse_tool_calls,
    tool_call_block_may_complete,
)

__all__ = ["ParserDelta", "StreamParser", "ToolCallDelta"]


@dataclass
class ToolCallDelta:
    index: int  # position of the call in the answer (0, 1, ...)
    id: str | None = None  # sent once, with the first delta of that call
    name: str | None = None  # sent once, complete
    # A piece of the arguments JSON; the pieces of one index add up to ToolCall.arguments_json.
    arguments: str = ""


@dataclass
class ParserDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.reasoning or self.content or self.tool_calls)


class _PassThrough:
    """Passes text on untouched: an answer without a think block and without tool parsing is the raw text,
    streamed or not (split_reasoning leaves it as it is)."""

    def push(self, text: str) -> str:
        return text


class _Stripper:
    """Passes text on as if the whole of it were strip()ped: drops leading whitespace, and holds trailing
    whitespace until more text shows it was not trailing. What is still held at the end is dropped."""

    def __init__(self) -> None:
        self._started = False
        self._held = ""

    def push(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        text = self._held + text
        out = text.rstrip()
        self._held = text[len(out) :]
        return out


def _partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag` (0 when none)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


# Where the parser is in the answer.
_START = "start"  # not yet known whether the text opens with <think>
_THINK = "think"  # inside the think block: text is reasoning
_ANSWER = "answer"  # after it (or without one): text is content and tool calls


class StreamParser:
    """Stateful parser of one streamed answer: call `feed` with each raw text delta, then `finish` once.

    `starts_in_think`: the prompt ended inside an open `<think>` (see prompt_opens_thinking).
    `parse_reasoning=False`: no think block is looked for; all text is answer (starts_in_think is ignored).
    `parse_tools=False`: no tool calls are looked for; the answer is all content (stripped after a think block,
    untouched without one, as split_reasoning gives it).
    `tool_names`: the offered tools, for untagged calls (see parse_answer).
    """

    def __init__(
        self,
        starts_in_think: bool = False,
        parse_reasoning: bool = True,
        parse_tools: bool = True,
        tool_names: Collection[str] = (),
    ):
        self._starts_in_think = starts_in_think
        self._parse_tools = parse_tools
        self._tool_names = tool_names if parse_tools else ()
        self._answer_opened = False  # some of the answer other than whitespace has been parsed
        self._mode = _START if parse_reasoning else _ANSWER
        self._held = ""  # raw text not yet decided on: the start, a partial tag, or an open <tool_call> block
        self._in_block = False  # `_held` is a <tool_call> block that may still become a call
        self._has_think_block = False
        self._finished = False
        self._reasoning = _Stripper()
        self._content = _Stripper()
        self._calls: list[ToolCall] = []

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The complete calls parsed so far, with the ids their deltas carried."""
        return list(self._calls)

    @property
    def has_think_block(self) -> bool:
        """Whether the answer has a think block (so far): parse_answer's reasoning is a str, not None.
        Final once finish() was called."""
        return self._has_think_block

    def feed(self, text: str, last: bool = False) -> ParserDelta:
        """Parse the next raw text delta of the model; `last`: it ends the stream (finish() is included).
        After the end, further text is ignored."""
        delta = ParserDelta()
        if text and not self._finished:
            self._route(str(text), delta, final=False)
        if last:
            rest = self.finish()
            delta.reasoning += rest.reasoning
            delta.content += rest.content
            delta.tool_calls += rest.tool_calls
        return delta

    def finish(self) -> ParserDelta:
        """End of the stream: send what was held back, as the non-streaming parser would place it."""
        delta = ParserDelta()
        if not self._finished:
            self._finished = True
            self._route("", delta, final=True)
        return delta

    # ------------------------------------------------------------------------------------------ internals

    def _route(self, text: str, delta: ParserDelta, final: bool) -> None:
        if self._mode == _START:
            self._start(text, delta, final)
        elif self._mode == _THINK:
            self._think(text, delta, final)
        else:
            self._answer(text, delta, final)

    def _start(self, text: str, delta: ParserDelta, final: bool) -> None:
        # split_reasoning looks for <think> after leading whitespace; until that is decided, hold the text.
        text = self._held + text
        head = text.lstrip()
        if head.startswith(THINK_OPEN):
            self._held = ""
            self._mode = _THINK
            self._has_think_block = True
            self._think(head[len(THINK_OPEN) :], delta, final)
            return
        if not final and THINK_OPEN.startswith(head):
            self._held = text
            return
        self._held = ""
        if self._starts_in_think:
            self._mode = _THINK
            self._has_think_block = True
            self._think(text, delta, final)
        else:
            self._mode = _ANSWER
            if not self._parse_tools:
                self._content = _PassThrough()
            self._answer(text, delta, final)

    def _think(self, text: str, delta: ParserDelta, final: bool) -> None:
        text = self._held + text
        end = text.find(THINK_CLOSE)
        if end >= 0:
            # Reasoning trailing whitespace still held by the stripper is dropped: </think> ended it.
            delta.reasoning += self._reasoning.push(text[:end])
            self._held = ""
            self._mode = _ANSWER
            self._answer(text[end + len(THINK_CLOSE) :], delta, final)
            return
        keep = 0 if final else _partial_tag_length(text, THINK_CLOSE)
        self._held = text[len(text) - keep :]
        delta.reasoning += self._reasoning.push(text[: len(text) - keep])

    def _answer(self, text: str, delta: ParserDelta, final: bool) -> None:
        if not self._parse_tools:
            delta.content += self._content.push(text)
            return
        text = self._held + text
        self._held = ""
        if self._tool_names and not self._answer_opened:
            if self._held_as_bare_calls(text, delta, final):
                return
            self._answer_opened = bool(text.strip())
        while True:
            if self._in_block:
                # A call needs its closing tag: until one came, only ask whether the block can still parse.
                parsed = parse_tool_call_block(text) if TOOL_CALL_CLOSE in text else None
                if parsed is not None:
                    call, end = parsed
                    self._emit_call(call, delta)
                    text = text[end:]
                    self._in_block = False
                    continue
                if not final and tool_call_block_may_complete(text):
                    self._held = text
                    return
                # Never a call. parse_tool_calls keeps such a block as text up to its </tool_call> or the
                # next <tool_call>, and no <tool_call> can start before either, so carrying on scanning
                # just after this opening tag finds the same next block.
                self._in_block = False
                delta.content += self._content.push(TOOL_CALL_OPEN)
                text = text[len(TOOL_CALL_OPEN) :]
                continue
            start = text.find(TOOL_CALL_OPEN)
            if start >= 0:
                delta.content += self._content.push(text[:start])
                text = text[start:]
                self._in_block = True
                continue
            keep = 0 if final else _partial_tag_length(text, TOOL_CALL_OPEN)
            self._held = text[len(text) - keep :]
            delta.content += self._content.push(text[: len(text) - keep])
            return

    def _held_as_bare_calls(self, text: str, delta: ParserDelta, final: bool) -> bool:
        """Handle `text`, the whole answer so far, if it is (or may still become) only bare calls."""
        head = text.lstrip()
        if not final and not head:
            self._held = text
            return True
        if not head.startswith(("{", "`")):
            return False
        if not final:
            if bare_tool_calls_may_complete(text, self._tool_names):
                self._held = text
                return True
            return False
        # The end: decide as parse_answer does, where tagged calls come first.
        content, calls = parse_tool_calls(text)
        bare = None if calls else parse_bare_tool_calls(content, self._tool_names)
        for call in bare or ():
            self._emit_call(call, delta)
        return bare is not None

    def _emit_call(self, call: ToolCall, delta: ParserDelta) -> None:
        delta.tool_calls.append(
            ToolCallDelta(index=len(self._calls), id=call.id, name=call.name, arguments=call.arguments_json)
        )
        self._calls.append(call)
