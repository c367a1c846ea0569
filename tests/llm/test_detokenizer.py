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


def _first_stop(text: str, stops: list[str]) -> tuple[int, int] | None:
    """Reference: the earliest end of any stop string, and the longest stop ending there."""
    for end in range(1, len(text) + 1):
        ending = [len(s) for s in stops if text[:end].endswith(s)]
        if ending:
            return end, max(ending)
    return None


def test_stop_matcher_agrees_with_a_naive_search_fed_in_pieces():
    import random

    from backends.llm.detokenizer import StopMatcher

    rng = random.Random(0)
    for _ in range(400):
        text = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 40)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        matcher, fed, found = StopMatcher(tuple(stops)), 0, None
        while fed < len(text) and found is None:
            piece = text[fed: fed + rng.randint(1, 4)]
            fed += len(piece)
            end = matcher.feed(piece)
            if end is not None:
                found = (end, matcher.last_length)
        assert found == _first_stop(text, stops), (text, stops)
        if found is None:  # the held-back tail is the longest proper stop prefix ending the text
            assert matcher.partial == max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])),
                                          default=0)


def test_generation_ending_inside_a_character_flushes_it_as_decode_does(tokenizer):
    """A length limit can cut a multi-byte character: the final text keeps it (U+FFFD), as decode of every output
    id gives it, instead of dropping the tail."""
    ids = tokenizer("ok 😀", add_special_tokens=False).input_ids
    cut = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add_token(t).delta for t in ids[:cut]]
    assert "\ufffd" not in "".join(deltas)
    deltas.append(detok.flush())
    assert "".join(deltas) == tokenizer.decode(ids[:cut])


def test_a_stop_string_inside_the_flushed_tail_still_cuts():
    """A byte-level token holding '.' and the first bytes of a character stays held back (it decodes with a
    trailing U+FFFD); when generation ends there, the stop string '.' inside it must still cut the text."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    vocab[".âĢ"] = len(vocab)  # '.' + 0xE2 0x80: the start of a 3-byte character
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)
    detok = IncrementalDetokenizer(tokenizer, (".",))
    assert detok.add_token(vocab["a"]).delta == "a"
    step = detok.add_token(vocab[".âĢ"])
    assert step.delta == "" and not step.stopped
    assert detok.flush() == "" and detok.text == "a"
