"""Streaming text out of a token stream without ever emitting half a character.

Byte-level BPE splits a CJK character or an emoji across several tokens, so a token on its own is often not
valid UTF-8. We keep the raw bytes and let an incremental UTF-8 decoder hold back an unfinished character
until the token that completes it arrives.
"""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tokenizer import QwenTokenizer


class IncrementalDetokenizer:
    """Feed token ids one at a time; the concatenation of every `add` plus `flush` equals
    `tokenizer.decode(ids, skip_special_tokens=...)`."""

    def __init__(self, tokenizer: QwenTokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._skip = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        # errors="replace" matches decode(), which replaces invalid bytes by U+FFFD the same way.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.token_ids: list[int] = []

    def add(self, token_id: int) -> str:
        """The text this token completes (possibly "" while a multi-byte character is unfinished)."""
        self.token_ids.append(token_id)
        if token_id in self._skip:
            # decode() drops the token before joining bytes, so a character split around it still joins up.
            return ""
        return self._decoder.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is held back at the end: an unfinished character becomes U+FFFD, as in decode()."""
        return self._decoder.decode(b"", final=True)
