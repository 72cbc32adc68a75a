"""What generation hands back to callers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .text.parsers import ToolCall


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass
class RequestOutput:
    """A finished answer. For chat, `text` is the answer without reasoning and without parsed tool calls."""

    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    raw_text: str = ""  # everything the model produced, before reasoning and tool calls were split out
    # The vision prompt the answer came from (vision.prompt.Prompt): its images' original and resized sizes
    # are what grounding coordinates are mapped with. None for text prompts.
    prompt: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "reasoning": self.reasoning,
            "tool_calls": [call.to_openai() for call in self.tool_calls],
            "finish_reason": self.finish_reason,
            "usage": self.usage.to_dict(),
            "token_ids": self.token_ids,
        }


@dataclass
class StreamDelta:
    """A piece of a streamed answer: raw model text (reasoning tags included); the last carries finish_reason."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None
