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


class StopMatcher:
    """Finds stop strings in text fed piece by piece, in time linear in the text (Knuth-Morris-Pratt per stop
    string): each new character costs O(1) amortised per stop string, whatever the stop strings' lengths, so a
    long stop string cannot slow the engine thread down for everyone."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self._fail = [self._failure(s) for s in stops]
        self._state = [0] * len(stops)  # per stop string: length of its longest prefix ending the text
        self._fed = 0  # characters consumed
        self.last_length = 0  # length of the stop string that matched last

    @staticmethod
    def _failure(s: str) -> list[int]:
        fail = [0] * len(s)
        k = 0
        for i in range(1, len(s)):
            while k and s[i] != s[k]:
                k = fail[k - 1]
            if s[i] == s[k]:
                k += 1
            fail[i] = k
        return fail

    def feed(self, text: str) -> int | None:
        """Consume `text`; the end offset (in everything fed) of the first stop-string match, else None. When
        several stop strings end at that character, `last_length` is the longest (the earliest start)."""
        for ch in text:
            self._fed += 1
            done = 0
            for i, stop in enumerate(self.stops):
                k, fail = self._state[i], self._fail[i]
                while k and stop[k] != ch:
                    k = fail[k - 1]
                if stop[k] == ch:
                    k += 1
                if k == len(stop):
                    done = max(done, k)
                    k = fail[k - 1]
                self._state[i] = k
            if done:
                self.last_length = done
                return self._fed
        return None

    @property
    def partial(self) -> int:
        """Length of the longest tail of the text fed so far that is a proper prefix of a stop string."""
        return max(self._state, default=0)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._tok = tokenizer
        self._stop = StopMatcher(stop) if stop else None
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
        added = ""
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            added = new_text[len(prefix_text) :]
            self.text += added
            self._prefix_offset = max(self._read_offset, len(self._ids) - _WINDOW)
            self._read_offset = len(self._ids)
        return self._emit(added)

    def flush(self) -> str:
        """At the end of generation: everything not yet sent (held-back partial stop matches included), and the
        bytes of a character the last tokens left incomplete, as U+FFFD: the text then equals `decode` of every
        output id, as transformers gives it, instead of silently losing the tail."""
        delta = ""
        if self._read_offset < len(self._ids):
            prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
            tail = self._decode(self._ids[self._prefix_offset :])[len(prefix_text) :]
            self._read_offset = len(self._ids)
            self.text += tail
            step = self._emit(tail)  # the tail may complete a stop string too
            if step.stopped:
                return step.delta
            delta = step.delta
        delta += self.text[self._sent :]
        self._sent = len(self.text)
        return delta

    def _emit(self, added: str) -> DetokenizerStep:
        held = 0
        if self._stop is not None:
            end = self._stop.feed(added)
            if end is not None:
                cut = end - self._stop.last_length
                delta = self.text[self._sent : cut]
                self.text = self.text[:cut]
                self._sent = cut
                return DetokenizerStep(delta, stopped=True)
            held = self._stop.partial
        safe_end = len(self.text) - held
        delta = self.text[self._sent : safe_end] if safe_end > self._sent else ""
        self._sent = max(self._sent, safe_end)
        return DetokenizerStep(delta, stopped=False)
