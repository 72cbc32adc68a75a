"""Splitting a Qwen answer into reasoning (`<think>` blocks), content and tool calls.

Qwen3 thinks inside `<think>...</think>` before answering; thinking templates open that block in the prompt
itself, so the generated text may start inside it. Tool calls come as `<tool_call>` blocks holding either
Hermes-style JSON (Qwen2.5, Qwen3) or the XML form of newer templates (Qwen3-Coder, Qwen3.5):

    <tool_call>                              <tool_call>
    {"name": "f", "arguments": {"x": 1}}     <function=f>
    </tool_call>                             <parameter=x>
                                             1
                                             </parameter>
                                             </function>
                                             </tool_call>

Small models such as Qwen2.5-Coder-0.5B often leave the tags out and answer with the bare JSON object, alone
or in a ```json block. So an answer with no tagged call that is nothing but such objects, each naming one of
the tools the request offered and giving its arguments, counts as those calls too (`tool_names`).

Parsing never raises: anything that does not parse cleanly stays in the content, verbatim.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
ASSISTANT_TURN = "<|im_start|>assistant"

_FUNCTION_OPEN = re.compile(r"<function=([^>\n]+)>")
_PARAMETER_OPEN = re.compile(r"<parameter=([^>\n]+)>")
_PARAMETER_CLOSE = "</parameter>"
_FUNCTION_CLOSE = "</function>"
_WHITESPACE = re.compile(r"\s*")
_ID_ALPHABET = string.ascii_letters + string.digits
_JSON = json.JSONDecoder()
# Untagged calls often come in a Markdown code block: ```json, a newline, the objects, ```.
_FENCE = "```"
_FENCE_OPEN = re.compile(r"```(?:json)?[ \t]*\n", re.IGNORECASE)
_OPEN_FENCE = re.compile(r"`{1,2}|```(?:j|js|jso|json)?[ \t]*", re.IGNORECASE)  # cut before its newline


# ---------------------------------------------------------------------------------------------- reasoning


def prompt_opens_thinking(prompt_text: str) -> bool:
    """True when the rendered prompt ends inside an open `<think>` block, so generation starts in reasoning.

    Only the tail after the last `<|im_start|>assistant` counts (earlier turns may hold closed think
    blocks): `...assistant\\n<think>\\n` is open; `...assistant\\n<think>\\n\\n</think>\\n\\n` (thinking
    switched off) and a tail without `<think>` are not.
    """
    start = prompt_text.rfind(ASSISTANT_TURN)
    tail = prompt_text[start + len(ASSISTANT_TURN) :] if start >= 0 else prompt_text
    opened = tail.rfind(THINK_OPEN)
    return opened >= 0 and tail.find(THINK_CLOSE, opened) < 0


def split_reasoning(text: str, starts_in_think: bool = False) -> tuple[str | None, str]:
    """Return (reasoning, answer), both stripped when there is a think block.

    The block is there when the text (after leading whitespace) starts with `<think>`, or when
    `starts_in_think` says the prompt opened it. Reasoning runs up to the first `</think>`; when that never
    comes (generation was cut off) all of the text is reasoning and the answer is "". Without a think block
    the result is (None, text) with text untouched. An empty think block gives reasoning "".
    """
    stripped = text.lstrip()
    if stripped.startswith(THINK_OPEN):
        body = stripped[len(THINK_OPEN) :]
    elif starts_in_think:
        body = text
    else:
        return None, text
    end = body.find(THINK_CLOSE)
    if end < 0:
        return body.strip(), ""
    return body[:end].strip(), body[end + len(THINK_CLOSE) :].strip()


# ---------------------------------------------------------------------------------------------- tool calls


def new_tool_call_id() -> str:
    """A fresh OpenAI-style call id: "call_" and 24 random letters and digits."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]

    @classmethod
    def create(cls, name: str, arguments: dict[str, Any]) -> ToolCall:
        """A call with a newly generated id."""
        return cls(new_tool_call_id(), name, arguments)

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)

    def to_openai(self) -> dict[str, Any]:
        """The entry of an OpenAI chat completion's `tool_calls` (arguments as a JSON string)."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments_json},
        }


def _skip_whitespace(text: str, pos: int) -> int:
    return _WHITESPACE.match(text, pos).end()


def _call_from_json(obj: Any) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    # Some fine-tunes say "parameters"; a call without arguments is a call with none.
    arguments = obj["arguments"] if "arguments" in obj else obj.get("parameters")
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError):
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall.create(name.strip(), arguments)


def _reject_constant(name: str) -> Any:
    # json.loads would turn a parameter value "NaN" or "Infinity" into a float; keep such text a string.
    raise ValueError(name)


def _parameter_value(raw: str) -> Any:
    # The template writes "<parameter=x>\nVALUE\n</parameter>": exactly one newline on each side is framing.
    if raw.startswith("\n"):
        raw = raw[1:]
    if raw.endswith("\n"):
        raw = raw[:-1]
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return raw


def _parse_json_body(text: str, pos: int) -> tuple[ToolCall, int] | None:
    try:
        obj, end = _JSON.raw_decode(text, pos)
    except (ValueError, RecursionError):
        return None
    call = _call_from_json(obj)
    return None if call is None else (call, end)


def _parse_xml_body(text: str, pos: int) -> tuple[ToolCall, int] | None:
    match = _FUNCTION_OPEN.match(text, pos)
    if match is None or not match.group(1).strip():
        return None
    name = match.group(1).strip()
    arguments: dict[str, Any] = {}
    pos = match.end()
    while True:
        pos = _skip_whitespace(text, pos)
        if text.startswith(_FUNCTION_CLOSE, pos):
            return ToolCall.create(name, arguments), pos + len(_FUNCTION_CLOSE)
        param = _PARAMETER_OPEN.match(text, pos)
        if param is None:
            return None
        # A value is raw text up to its closing tag, whatever it contains (code, JSON, tags).
        end = text.find(_PARAMETER_CLOSE, param.end())
        if end < 0:
            return None
        arguments[param.group(1).strip()] = _parameter_value(text[param.end() : end])
        pos = end + len(_PARAMETER_CLOSE)


def _parse_block(text: str, body_start: int) -> tuple[ToolCall, int] | None:
    """The call in the block whose body starts at `body_start` and the position after its `</tool_call>`."""
    pos = _skip_whitespace(text, body_start)
    if text.startswith("{", pos):
        parsed = _parse_json_body(text, pos)
    elif text.startswith("<function=", pos):
        parsed = _parse_xml_body(text, pos)
    else:
        return None
    if parsed is None:
        return None
    call, pos = parsed
    pos = _skip_whitespace(text, pos)
    if not text.startswith(TOOL_CALL_CLOSE, pos):
        return None
    return call, pos + len(TOOL_CALL_CLOSE)


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """Return (content, calls): the `<tool_call>` blocks that parse, in order, and the text around them,
    stripped. A block with bad JSON, no name, or no closing tag stays in the content verbatim."""
    pieces: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    while (start := text.find(TOOL_CALL_OPEN, pos)) >= 0:
        body_start = start + len(TOOL_CALL_OPEN)
        parsed = _parse_block(text, body_start)
        if parsed is not None:
            call, end = parsed
            pieces.append(text[pos:start])
            calls.append(call)
            pos = end
            continue
        # Not a call: keep the block as text. It ends at its closing tag, or where the next block opens
        # when it was never closed, so a broken call does not swallow the good ones after it.
        close = text.find(TOOL_CALL_CLOSE, body_start)
        reopen = text.find(TOOL_CALL_OPEN, body_start)
        if reopen >= 0 and (close < 0 or reopen < close):
            end = reopen
        elif close >= 0:
            end = close + len(TOOL_CALL_CLOSE)
        else:
            break
        pieces.append(text[pos:end])
        pos = end
    pieces.append(text[pos:])
    return "".join(pieces).strip(), calls


_CALL_KEYS = ("name", "arguments", "parameters")
_FIRST_KEY = re.compile(r'\{\s*"((?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*)"')


def _bare_call(obj: Any, tool_names: Collection[str]) -> ToolCall | None:
    # Stricter than inside tags: the object must name an offered tool and say "arguments" (or
    # "parameters"), so that an answer which merely is JSON is not taken for a call.
    if not isinstance(obj, dict) or not ("arguments" in obj or "parameters" in obj):
        return None
    if not set(obj) <= set(_CALL_KEYS):
        return None
    call = _call_from_json(obj)
    return call if call is not None and call.name in tool_names else None


def parse_bare_tool_calls(text: str, tool_names: Collection[str]) -> list[ToolCall] | None:
    """The calls when `text` is nothing but untagged JSON call objects naming tools from `tool_names`
    (whitespace between them, the whole maybe in one ```json fence); None when it is anything else."""
    pos = _skip_whitespace(text, 0)
    fence = _FENCE_OPEN.match(text, pos)
    if fence is not None:
        pos = fence.end()
    calls: list[ToolCall] = []
    while (pos := _skip_whitespace(text, pos)) < len(text) and text[pos] == "{":
        try:
            obj, pos = _JSON.raw_decode(text, pos)
        except (ValueError, RecursionError):
            return None
        call = _bare_call(obj, tool_names)
        if call is None:
            return None
        calls.append(call)
    if fence is not None:
        if not text.startswith(_FENCE, pos):
            return None
        pos = _skip_whitespace(text, pos + len(_FENCE))
    return calls if calls and pos == len(text) else None


# ------------------------------------------------------------------------------------ one block at a time
# For streaming (stream_parser.py): a block arrives piece by piece, and the parser must know when it is a
# call, and when it can never become one, without waiting for the end of the answer.

_JSON_LITERALS = ("true", "false", "null", "NaN", "Infinity", "-Infinity")
# A JSON string cut off by the end of the text: valid characters and escapes so far, maybe a started escape.
_OPEN_STRING = re.compile(
    r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*(?:\\(?:u[0-9a-fA-F]{0,4})?)?'
)
# The decoder reports a cut-off \uXXXX escape (and the one of a surrogate pair after it) at its "u".
_OPEN_ESCAPE = re.compile(r"u[0-9a-fA-F]{0,4}(?:\\(?:u[0-9a-fA-F]{0,4})?)?")
_OPEN_NUMBER = re.compile(r"\.|[eE][+-]?")  # what follows the digits of "1." or "1e+" before more digits
_OPEN_FUNCTION = re.compile(r"<function=[^>\n]*")
_OPEN_PARAMETER = re.compile(r"<parameter=[^>\n]*")
_PARAMETER_TAG = "<parameter="
_FUNCTION_TAG = "<function="


def parse_tool_call_block(text: str) -> tuple[ToolCall, int] | None:
    """The call in the block `text` starts with (`<tool_call>...`) and the position after its
    `</tool_call>`, or None when that block does not parse. What follows the block does not matter."""
    if not text.startswith(TOOL_CALL_OPEN):
        return None
    return _parse_block(text, len(TOOL_CALL_OPEN))


def tool_call_block_may_complete(text: str) -> bool:
    """Whether some continuation of `text`, the start of a block (`<tool_call>...`), parses as a call.

    False means the block is broken whatever comes next, so parse_tool_calls will leave it in the content.
    True is also the answer when unsure (a nesting too deep to judge): it only delays the block's text,
    whereas a wrong False would turn a real call into content.
    """
    if not text.startswith(TOOL_CALL_OPEN):
        return TOOL_CALL_OPEN.startswith(text)
    pos = _skip_whitespace(text, len(TOOL_CALL_OPEN))
    if pos == len(text):
        return True
    if text[pos] == "{":
        return _json_may_complete(text, pos)
    if text.startswith(_FUNCTION_TAG, pos):
        return _xml_may_complete(text, pos)
    return _FUNCTION_TAG.startswith(text[pos:])


def bare_tool_calls_may_complete(text: str, tool_names: Collection[str]) -> bool:
    """Whether some continuation of `text` is nothing but bare calls (see parse_bare_tool_calls)."""
    pos = _skip_whitespace(text, 0)
    fence = _FENCE_OPEN.match(text, pos)
    if fence is None and text.startswith("`", pos):
        return _OPEN_FENCE.fullmatch(text, pos) is not None
    if fence is not None:
        pos = fence.end()
    seen = False
    while (pos := _skip_whitespace(text, pos)) < len(text) and text[pos] == "{":
        try:
            obj, pos = _JSON.raw_decode(text, pos)
        except RecursionError:
            return True
        except ValueError as error:
            key = _FIRST_KEY.match(text, pos)  # an object that opens with another key is no call: say so now
            if key is not None and json.loads(f'"{key.group(1)}"') not in _CALL_KEYS:
                return False
            return _json_cut_short(text, getattr(error, "pos", None), getattr(error, "msg", ""))
        if _bare_call(obj, tool_names) is None:
            return False
        seen = True
    rest = text[pos:]
    if not rest:
        return True
    if fence is None or not seen:
        return False
    return _FENCE.startswith(rest) or (rest.startswith(_FENCE) and not rest[len(_FENCE) :].strip())


def _closing_may_follow(text: str, pos: int) -> bool:
    # After the call's body only whitespace and `</tool_call>` may come; the text may stop anywhere in them.
    rest = text[_skip_whitespace(text, pos) :]
    return rest.startswith(TOOL_CALL_CLOSE) or TOOL_CALL_CLOSE.startswith(rest)


def _json_may_complete(text: str, pos: int) -> bool:
    try:
        obj, end = _JSON.raw_decode(text, pos)
    except RecursionError:
        return True  # too deep to judge from a prefix; the end of the stream settles it
    except ValueError as error:
        return _json_cut_short(text, getattr(error, "pos", None), getattr(error, "msg", ""))
    return _call_from_json(obj) is not None and _closing_may_follow(text, end)


def _json_cut_short(text: str, pos: int | None, message: str = "") -> bool:
    """Whether a JSON decoding error at `pos` comes only from the text ending too early.

    On a prefix of valid JSON the decoder stops at the end of the text, or earlier at the start of the token
    the end cut: an unterminated string (at its quote), a \\u escape, a literal ("tr", "-Inf") or a
    number's fraction or exponent ("1." / "1e+"). Any other error is in the text itself.
    """
    if pos is None or pos >= len(text):
        return True
    if message.startswith("Unterminated string"):
        return True  # the decoder checked the string's characters and escapes up to the end already
    rest = text[pos:]
    if rest[0] == '"':
        return _OPEN_STRING.fullmatch(rest) is not None  # in case the decoder words it differently
    if text[pos - 1] == "\\" and _OPEN_ESCAPE.fullmatch(rest):
        return True
    if text[pos - 1] in "0123456789" and _OPEN_NUMBER.fullmatch(rest):
        return True
    return any(literal.startswith(rest) for literal in _JSON_LITERALS)


def _xml_may_complete(text: str, pos: int) -> bool:
    # Walks the same steps as _parse_xml_body; a step the text stops in is one that may still complete.
    match = _FUNCTION_OPEN.match(text, pos)
    if match is None:
        return _OPEN_FUNCTION.fullmatch(text, pos) is not None
    if not match.group(1).strip():
        return False
    pos = match.end()
    while True:
        pos = _skip_whitespace(text, pos)
        if text.startswith(_FUNCTION_CLOSE, pos):
            return _closing_may_follow(text, pos + len(_FUNCTION_CLOSE))
        param = _PARAMETER_OPEN.match(text, pos)
        if param is None:
            rest = text[pos:]
            return (
                _FUNCTION_CLOSE.startswith(rest)
                or _PARAMETER_TAG.startswith(rest)
                or _OPEN_PARAMETER.fullmatch(rest) is not None
            )
        end = text.find(_PARAMETER_CLOSE, param.end())
        if end < 0:
            return True
        pos = end + len(_PARAMETER_CLOSE)


# ---------------------------------------------------------------------------------------------- together


@dataclass
class ParsedAnswer:
    reasoning: str | None  # None when the answer had no think block
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)


def parse_answer(
    text: str, starts_in_think: bool = False, tool_names: Collection[str] = ()
) -> ParsedAnswer:
    """Split a whole generated answer: reasoning first, then tool calls out of what follows it. With the
    names of the offered tools, an answer that is only untagged call objects is taken as those calls."""
    reasoning, answer = split_reasoning(text, starts_in_think)
    content, calls = parse_tool_calls(answer)
    if not calls and tool_names:
        bare = parse_bare_tool_calls(content, tool_names)
        if bare is not None:
            content, calls = "", bare
    return ParsedAnswer(reasoning, content, calls)
