"""When a sequence stops, and its text: stop tokens, length limits, stop strings, incremental detokenization.

Text is decoded byte-wise through an incremental UTF-8 decoder, so a character split over two tokens appears
once both have arrived. Stop strings are searched only where the new text can complete one; a match is cut
from the text (the tokens stay). While streaming, a tail of the text that could still grow into a stop string
is held back.
"""

from __future__ import annotations

import codecs

from gptoss_serve.cluster.engine.sequence import FinishReason, Sequence


def check_token_stop(seq: Sequence, max_model_len: int) -> tuple[FinishReason, int | None] | None:
    """After a token was appended: (reason, stop token id or None) if the sequence ends here."""
    params, token_id = seq.params, seq.token_ids[-1]
    if token_id in params.all_stop_token_ids and seq.num_output_tokens > params.min_tokens:
        return FinishReason.STOP, token_id
    if length_stop(seq, max_model_len):
        return FinishReason.LENGTH, None
    return None


def length_stop(seq: Sequence, max_model_len: int) -> bool:
    """Whether the sequence has reached max_tokens or the context length (whatever its last token is)."""
    params = seq.params
    return (params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens) or \
        seq.num_tokens >= max_model_len


class TextState:
    """The decoded text of one sequence's output, cut at the first stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), include_stop_str_in_output: bool = False,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = stop
        self.max_stop_len = max((len(s) for s in stop), default=0)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def append(self, token_id: int) -> str | None:
        """Adds one token's text; returns the stop string it completed, if any (the text is then cut)."""
        if self.tokenizer is None or (self.skip_special_tokens and self.tokenizer.is_special(token_id)):
            return None
        old_len = len(self.text)
        self.text += self._decoder.decode(self.tokenizer.token_bytes(token_id))
        return self._find_stop(old_len) if self.stop else None

    def flush(self) -> None:
        """At the end: bytes of an unfinished character become U+FFFD (unless a stop string already cut)."""
        self.text += self._decoder.decode(b"", final=True)

    def _find_stop(self, old_len: int) -> str | None:
        search_from = max(0, old_len - self.max_stop_len + 1)
        best: tuple[int, str] | None = None
        for stop in self.stop:
            at = self.text.find(stop, search_from)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return None
        at, stop = best
        self.text = self.text[:at + len(stop)] if self.include_stop_str_in_output else self.text[:at]
        return stop

    def stable_len(self, finished: bool) -> int:
        """How much of the text can be sent now: all of it once finished; otherwise not a tail that is the start
        of a stop string."""
        if finished or not self.stop:
            return len(self.text)
        for tail in range(min(len(self.text), self.max_stop_len - 1), 0, -1):
            suffix = self.text[-tail:]
            if any(stop.startswith(suffix) for stop in self.stop):
                return len(self.text) - tail
        return len(self.text)
