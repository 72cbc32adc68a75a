"""Stop strings are defined on text: cut the answer at the first one, and hold back a tail that might be the
start of one, so a stream never shows part of a stop string."""

from __future__ import annotations


class StopStrings:
    """Cuts the text at the first stop string; holds back a tail that might be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        keep = self._partial_tail()
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out, False

    def flush(self, text: str = "") -> str:
        """The rest of the text at the end of generation (a held-back tail was not a stop string after all)."""
        out, hit = self.feed(text)
        if hit:
            return out
        rest, self.pending = self.pending, ""
        return out + rest

    def _partial_tail(self) -> int:
        # Longest suffix of the pending text that is a proper prefix of some stop string.
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:n]):
                    best = n
                    break
        return best
