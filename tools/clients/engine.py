"""In-process engine helpers shared by the engine tests: an output sink that records, and request building."""

from __future__ import annotations

import threading

from backends.llm.engine import GenerationChunk, LLMEngine
from backends.llm.params import GenerationRequest, SamplingParams


class Collect:
    """An OutputSink that records what the engine sends."""

    def __init__(self) -> None:
        self.chunks: list[GenerationChunk] = []
        self.error: Exception | None = None
        self.finished = threading.Event()
        self.first = threading.Event()
        self.cancelled = False
        self.after_final = 0

    def send(self, chunk: GenerationChunk, final: bool) -> None:
        if self.finished.is_set():
            self.after_final += 1
        self.chunks.append(chunk)
        self.first.set()
        if final:
            self.finished.set()

    def fail(self, error: Exception) -> None:
        if self.finished.is_set():
            self.after_final += 1
        self.error = error
        self.finished.set()

    def is_cancelled(self) -> bool:
        return self.cancelled

    def wait(self, timeout: float = 60) -> "Collect":
        assert self.finished.wait(timeout), "no final response"
        return self


def request_for(engine: LLMEngine, text: str, max_tokens: int = 4, stream: bool = False, lora=(),
                **sampling) -> GenerationRequest:
    params = SamplingParams(max_tokens=max_tokens, **{"temperature": 0.0, **sampling})
    return engine.prepare(GenerationRequest("t", text, params, stream=stream, lora=lora))
