"""Stop-string matching cost per generated token on the engine thread: our linear-time `StopMatcher` (KMP) vs the
search it replaced (`str.find` over the unsent tail plus a scan for the longest partial match, quadratic in the
stop string's length). Every request's stop strings are matched on the one engine thread, so this cost is paid by
everybody in the batch.

    .venv/bin/python -m benchmarks.stop_strings
"""

from __future__ import annotations

import time

from backends.llm.detokenizer import StopMatcher

TEXT = "The quick brown fox jumps over the lazy dog. " * 80
PIECES = [TEXT[i:i + 4] for i in range(0, len(TEXT), 4)]  # ~4 characters per token
CASES = {
    "4 typical stops (3-7 chars)": ("\n\nUser:", "</s>", "###", "STOP"),
    "16 stops of 16 chars": tuple(f"stop-string-{i:04d}" for i in range(16)),
    "1 stop of 256 chars (our limit)": ("x" * 256,),
    "1 stop of 8,000 chars (refused now)": ("x" * 8000,),
}


def ours(stops: tuple[str, ...]) -> float:
    matcher = StopMatcher(stops)
    started = time.perf_counter()
    for piece in PIECES:
        matcher.feed(piece)
    return (time.perf_counter() - started) / len(PIECES)


def previous(stops: tuple[str, ...]) -> float:
    text, sent = "", 0
    started = time.perf_counter()
    for piece in PIECES:
        text += piece
        start = max(0, sent - max(len(s) for s in stops) + 1)
        [text.find(s, start) for s in stops]
        longest = 0
        for s in stops:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        sent = len(text) - longest
    return (time.perf_counter() - started) / len(PIECES)


def main() -> None:
    print(f"{'stop strings':<38}{'previous us/token':>19}{'ours us/token':>15}{'ratio':>8}")
    for name, stops in CASES.items():
        old, new = min(previous(stops) for _ in range(3)), min(ours(stops) for _ in range(3))
        print(f"{name:<38}{old * 1e6:>19.1f}{new * 1e6:>15.1f}{old / new:>7.1f}x")


if __name__ == "__main__":
    main()
