"""Incremental detokenisation with stop strings, for streaming text out token by token.

Decoding the whole sequence at every step costs O(n^2); like vLLM we decode only a short window behind the newest
token and emit the text that window adds. Text is held back while it ends in an incomplete UTF-8 character or
could still be the start of a stop string, so a client never receives text that a stop string later removes.
"""

from __future__ import annotations

from dataclasses import dataclass

# Tokens decoded before the newest one so merges and leading spaces come out right.
_WINDOW = 5


@dataclass
class DetokenizerStep:
    delta: str  # new text safe to send now
    stopped: bool  # a stop string matched; the text before it has all been sent


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._tok = tokenizer
        self._stop = stop
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""  # all text decoded so far (before stop-string truncation)
        self._sent = 0  # characters of self.text already handed out

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def add_token(self, token_id: int) -> DetokenizerStep:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text) :]
            self._prefix_offset = max(self._read_offset, len(self._ids) - _WINDOW)
            self._read_offset = len(self._ids)
        return self._emit()

    def flush(self) -> str:
        """At the end of generation: everything not yet sent (held-back partial stop matches included)."""
        delta = self.text[self._sent :]
        self._sent = len(self.text)
        return delta

    def _emit(self) -> DetokenizerStep:
        if self._stop:
            # Search only where a new match can start: just before the unsent text.
            start = max(0, self._sent - max(len(s) for s in self._stop) + 1)
            hits = [i for i in (self.text.find(s, start) for s in self._stop) if i != -1]
            if hits:
                cut = min(hits)
                delta = self.text[self._sent : cut]
                self.text = self.text[:cut]
                self._sent = cut
                return DetokenizerStep(delta, stopped=True)
        safe_end = len(self.text) - self._partial_stop_suffix()
        delta = self.text[self._sent : safe_end] if safe_end > self._sent else ""
        self._sent = max(self._sent, safe_end)
        return DetokenizerStep(delta, stopped=False)

    def _partial_stop_suffix(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest
