"""Constrained decoding in the engine (xgrammar): constrained and free rows in one step, a grammar that ends the
sequence, the max_tokens cut-off, a constraint that does not compile, and compiling off the engine thread."""

from __future__ import annotations

import json
import re
import threading
import time

import jsonschema
import pytest

from backends.errors import InvalidArgument
from backends.llm.chat import apply_chat_template
from backends.llm.engine import LLMEngine
from backends.llm.runner import ModelRunner, RunnerSettings
from backends.llm.scheduler import SchedulerLimits
from backends.settings import default_llm_model_path
from backends.structured import make_constraint, parse_constraint
from tools.clients.engine import Collect, request_for

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def _chat(question: str) -> str:
    return apply_chat_template([{"role": "user", "content": question}])


@pytest.fixture(scope="module")
def engine():
    runner = ModelRunner(default_llm_model_path(), lora=None,
                         settings=RunnerSettings(dtype="float32", max_model_len=512, max_num_seqs=8))
    engine = LLMEngine(lambda _engine: (runner, None), limits=SchedulerLimits(max_num_seqs=8))
    yield engine
    engine.shutdown()


def _submit(engine, text: str, constraint=None, **kwargs) -> Collect:
    request = request_for(engine, text, **{"max_tokens": 48, **kwargs})
    request.constraint = constraint
    sink = Collect()
    engine.submit(request, sink)
    return sink


def _text(sink: Collect) -> str:
    assert sink.wait(120).error is None, sink.error
    return "".join(c.text for c in sink.chunks)


def test_constrained_and_free_rows_in_one_step(engine):
    """JSON-schema, regex, choice and free rows run together; each constrained output matches its constraint and
    the free row's tokens are those it gets alone."""
    free_prompt = _chat("What is the capital of France?")
    alone = _text(_submit(engine, free_prompt, max_tokens=16))
    for temperature in (0.0, 1.0):
        sinks = {
            "json": _submit(engine, _chat("Describe a person as JSON."), make_constraint("json", PERSON),
                            temperature=temperature, seed=1, max_tokens=64),
            "regex": _submit(engine, _chat("Give me a phone number."), make_constraint("regex", r"\d{3}-\d{4}"),
                             temperature=temperature, seed=2),
            "choice": _submit(engine, _chat("Is the sky blue?"), make_constraint("choice", ["yes", "no"]),
                              temperature=temperature, seed=3),
            "free": _submit(engine, free_prompt, max_tokens=16),
        }
        texts = {name: _text(sink) for name, sink in sinks.items()}
        jsonschema.validate(json.loads(texts["json"]), PERSON)
        assert re.fullmatch(r"\d{3}-\d{4}", texts["regex"]), texts["regex"]
        assert texts["choice"] in ("yes", "no")
        assert texts["free"] == alone  # the free row is untouched by its constrained batch mates
        for name in ("json", "regex", "choice"):
            assert sinks[name].chunks[-1].finish_reason == "stop", name


def test_twenty_seeds_all_validate(engine):
    sinks = [_submit(engine, _chat("A person, as JSON."), make_constraint("json", PERSON), temperature=1.0,
                     seed=seed, max_tokens=64) for seed in range(20)]
    for sink in sinks:
        jsonschema.validate(json.loads(_text(sink)), PERSON)


def test_max_tokens_cuts_a_constrained_output_with_length(engine):
    sink = _submit(engine, _chat("A person, as JSON."), make_constraint("json", PERSON), max_tokens=3)
    text = _text(sink)
    assert sink.chunks[-1].finish_reason == "length" and sink.chunks[-1].num_output_tokens == 3
    assert text.startswith("{") and not text.endswith("}")


def test_a_constraint_that_does_not_compile_fails_its_request_alone(engine):
    other = _submit(engine, _chat("Count to five."), max_tokens=12)
    bad = _submit(engine, _chat("x"), parse_constraint(json.dumps({"grammar": "root ::= undefined_rule"})))
    assert bad.wait(60).error is not None and isinstance(bad.error, InvalidArgument)
    assert 'Rule "undefined_rule" is not defined' in str(bad.error)
    assert _text(other)


def test_compiling_happens_off_the_engine_thread(engine):
    """A running stream keeps getting tokens while a constraint compiles (a slow compile, forced here)."""
    real = engine.grammars._compile
    started, release = threading.Event(), threading.Event()

    def slow(constraint):
        started.set()
        release.wait(30)
        return real(constraint)

    engine.grammars._compile = slow
    try:
        stream = _submit(engine, _chat("Tell me a long story about a dragon."), max_tokens=200, stream=True,
                         ignore_eos=True)
        assert stream.first.wait(60)
        waiting = _submit(engine, _chat("x"), make_constraint("regex", r"[a-z]{5}"))
        assert started.wait(30)
        before = len(stream.chunks)
        time.sleep(1.0)
        assert len(stream.chunks) > before + 2, "decoding stalled while a constraint compiled"
        release.set()
        assert re.fullmatch(r"[a-z]{5}", _text(waiting))
    finally:
        release.set()
        engine.grammars._compile = real
    _text(stream)


BAD = {
    "invalid schema": ({"json": {"type": "nope"}}, "is not a valid JSON Schema"),
    "unenforced keyword": ({"json": {"type": "array", "uniqueItems": True}}, "'uniqueItems' (at #/uniqueItems)"),
    "regex that does not compile": ({"regex": "(unclosed"}, "is not a valid regular expression"),
    "empty choice": ({"choice": []}, "must be a non-empty list"),
    "two constraints": ({"regex": "a", "choice": ["a"]}, "exactly one of"),
    "huge schema": ({"json": {"type": "object", "description": "x" * 70000}}, "at most 65536 are accepted"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_constraints_are_refused_before_compiling(case):
    spec, message = BAD[case]
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        parse_constraint(json.dumps(spec))
