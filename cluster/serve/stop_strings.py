"""Stop strings over streamed text: text is released only once it cannot be the start of a stop string."""

from __future__ import annotations

from typing import Sequence


class StopStringMatcher:
    def __init__(self, stop_strings: Sequence[str]):
        self._stop_strings = tuple(s for s in stop_strings if s)
        self._held = ""  # a tail that may still grow into a stop string
        self.matched: str | None = None  # the stop string found; nothing is released after it

    def push(self, text: str) -> str:
        """The part of `held + text` that is safe to show; after a match, the text before it."""
        if self.matched is not None:
            return ""
        if not self._stop_strings:
            return text
        text = self._held + text
        first = min(((text.find(s), s) for s in self._stop_strings if s in text), default=None)
        if first is not None:
            position, self.matched = first
            self._held = ""
            return text[:position]
        num_held = self._longest_partial_match(text)
        self._held = text[len(text) - num_held:] if num_held else ""
        return text[: len(text) - num_held]

    def flush(self) -> str:
        """The held tail, once the stream has ended without completing a stop string."""
        held, self._held = self._held, ""
        return "" if self.matched is not None else held

    def _longest_partial_match(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stop_strings:
            for length in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:length]):
                    best = length
                    break
        return best
