"""One tokenizer per served model folder, loaded on first use and kept: chat templates, /tokenize, logprob tokens.

The frontend's request handlers run on the event loop thread, so a fast tokenizer is never shared between threads
here (which can fail with "Already borrowed")."""

from __future__ import annotations

from functools import lru_cache

from backends.llm.chat import load_tokenizer


@lru_cache(maxsize=16)
def cached_tokenizer(model_path: str):
    return load_tokenizer(model_path)
