"""Streaming text assembly with the real SmolLM2 tokenizer (no server needed)."""

from __future__ import annotations

import pytest

from backends.llm.chat import load_tokenizer
from backends.llm.detokenizer import IncrementalDetokenizer
from backends.settings import default_llm_model_path


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(default_llm_model_path()))


def _stream(tokenizer, text: str, stop=()):
    detok = IncrementalDetokenizer(tokenizer, tuple(stop))
    deltas, stopped = [], False
    for token in tokenizer(text, add_special_tokens=False).input_ids:
        step = detok.add_token(token)
        deltas.append(step.delta)
        if step.stopped:
            stopped = True
            break
    if not stopped:
        deltas.append(detok.flush())
    return deltas, stopped


@pytest.mark.parametrize("text", ["The capital of France is Paris.", "Ünïcödé ✓ 😀 日本語 text\n  with spaces"])
def test_deltas_join_to_the_full_text(tokenizer, text):
    deltas, _ = _stream(tokenizer, text)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas), "half a UTF-8 character was streamed"


def test_stop_string_across_tokens_is_cut_and_never_streamed(tokenizer):
    deltas, stopped = _stream(tokenizer, "The capital of France is Paris.", stop=["France is", "zzz"])
    assert stopped
    assert "".join(deltas) == "The capital of "
    assert all("Fr" not in d for d in deltas)


def test_partial_stop_match_is_released_at_the_end(tokenizer):
    deltas, stopped = _stream(tokenizer, "Paris is nice. The end", stop=["The end is near"])
    assert not stopped
    assert "".join(deltas) == "Paris is nice. The end"
