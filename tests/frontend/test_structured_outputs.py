"""Structured outputs and tool calls through the real server: one concurrent batch of constrained and free requests
with and without an adapter, the openai SDK's `parse` and tool-call helpers, streamed tool-call deltas, the
Triton `structured_output` input, the offline API, and each bad input."""

from __future__ import annotations

import asyncio
import json
import queue
import re
from time import time_ns

import httpx
import jsonschema
import numpy as np
import openai
import pytest
from pydantic import BaseModel, Field

from backends.llm.chat import apply_chat_template
from backends.settings import adapters_dir
from tools.launchers.frontend import FrontendProcess
from tools.session import API_KEY

DEMO = adapters_dir() / "demo"
CITY = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                         "population": {"type": "integer", "minimum": 0, "maximum": 10**9}},
        "required": ["name", "population"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 12}}, "required": ["zone"],
    "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
def client(frontend):
    return openai.AsyncOpenAI(base_url=f"{frontend.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture
def sync_client(frontend):
    return openai.OpenAI(base_url=f"{frontend.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def _valid_calls(message, tools=(WEATHER, TIME)) -> list[tuple[str, dict]]:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    calls = []
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, schemas[call.function.name])
        calls.append((call.function.name, arguments))
    return calls


def test_one_concurrent_batch_of_constrained_and_free_requests(client):
    """json_schema with the adapter, regex without it, free text with the adapter, tool_choice required: every
    constrained output validates, 20 of 20 across seeds, at temperature 0 and 1; the free request's text equals the
    same request alone."""
    free = dict(model="uppercase", messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=12, temperature=0)

    async def run():
        alone = (await client.chat.completions.create(**free)).choices[0].message.content
        jobs = []
        for temperature in (0.0, 1.0):
            common = dict(n=10, seed=11, temperature=temperature, max_tokens=160)
            jobs += [
                client.chat.completions.create(model="uppercase", messages=[{"role": "user", "content": "A city."}],
                                               response_format={"type": "json_schema", "json_schema": {
                                                   "name": "city", "schema": CITY, "strict": True}}, **common),
                client.chat.completions.create(model="llm", messages=[{"role": "user", "content": "A phone number"}],
                                               extra_body={"structured_outputs": {"regex": r"\d{3}-\d{4}"}},
                                               **common),
                client.chat.completions.create(model="llm", messages=ASK, tools=[WEATHER, TIME],
                                               tool_choice="required", parallel_tool_calls=False, **common),
            ]
        results = await asyncio.gather(client.chat.completions.create(**free), *jobs)
        return alone, results

    alone, (together, *answers) = asyncio.run(run())
    assert together.choices[0].message.content == alone
    checked = 0
    for i in range(0, len(answers), 3):
        city, phone, tool = answers[i:i + 3]
        for choice in city.choices:
            jsonschema.validate(json.loads(choice.message.content), CITY)
            assert choice.finish_reason == "stop"
        for choice in phone.choices:
            assert re.fullmatch(r"\d{3}-\d{4}", choice.message.content)
        for choice in tool.choices:
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            assert _valid_calls(choice.message)
        checked += len(city.choices) + len(phone.choices) + len(tool.choices)
    assert checked == 60  # 20 per constrained request kind, 10 at each temperature


def test_sdk_parse_with_a_pydantic_model(sync_client):
    class City(BaseModel):
        name: str = Field(max_length=20)
        population: int = Field(ge=0, le=10**9)

    done = sync_client.chat.completions.parse(model="uppercase", messages=[{"role": "user", "content": "A city."}],
                                              response_format=City, max_tokens=160, temperature=0)
    parsed = done.choices[0].message.parsed
    assert isinstance(parsed, City) and parsed.name
    json_object = sync_client.chat.completions.create(model="llm", messages=[{"role": "user", "content": "JSON!"}],
                                                      response_format={"type": "json_object"}, max_tokens=64,
                                                      temperature=0)
    if json_object.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(json_object.choices[0].message.content), dict)


def test_named_function_call_and_its_stream_reassemble(sync_client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    whole = sync_client.chat.completions.create(model="llm", messages=ASK, tools=[WEATHER, TIME], tool_choice=named,
                                                max_tokens=48, temperature=0)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    ((name, arguments),) = _valid_calls(choice.message)
    assert name == "get_weather"
    chunks = list(sync_client.chat.completions.create(model="llm", messages=ASK, tools=[WEATHER, TIME],
                                                      tool_choice=named, max_tokens=48, temperature=0, stream=True))
    deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0].id and deltas[0].function.name == "get_weather" and deltas[0].type == "function"
    assert all(d.index == 0 and d.id is None for d in deltas[1:])
    assert json.loads("".join(d.function.arguments for d in deltas)) == arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The call and its result in the history are accepted (the template renders what it can of them).
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [choice.message.tool_calls[0].model_dump()]},
               {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id, "content": "18 C, sunny"}]
    follow = sync_client.chat.completions.create(model="llm", messages=history, max_tokens=8, temperature=0)
    assert follow.choices[0].message.content


def _reassembled(chunks) -> list[tuple[str, dict]]:
    calls: dict[int, list] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(delta.index, [None, ""])
            if delta.id:
                assert call[0] is None and delta.type == "function"  # announced once
                call[0] = delta.function.name
            call[1] += delta.function.arguments or ""
    return [(name, json.loads(arguments)) for name, arguments in calls.values()]


@pytest.mark.parametrize("parallel", [False, True])
def test_required_tool_calls_stream_in_fragments_and_reassemble(sync_client, parallel):
    body = dict(model="llm", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=96,
                temperature=0, parallel_tool_calls=parallel)
    whole = sync_client.chat.completions.create(**body)
    calls = _valid_calls(whole.choices[0].message)
    if not parallel:
        assert len(calls) == 1  # parallel_tool_calls false: one call
    chunks = list(sync_client.chat.completions.create(**body, stream=True))
    fragments = sum(len(c.choices[0].delta.tool_calls or []) for c in chunks if c.choices)
    assert fragments > len(calls) + 1  # streamed in pieces, not whole
    assert _reassembled(chunks) == calls
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_required_calls_stream_the_same_whatever_the_chunking():
    from openai_frontend.engine.structured import RequiredCallsStream

    text = ('[{"name": "get_weather", "parameters": {"city": "Pa\\"ris}", "unit": {"a": 1}}}, '
            '{"name":"get_time","parameters":{"zone":"UTC"}}]')  # xgrammar's separators, and compact
    for step in (1, 2, 5, len(text)):
        stream, calls = RequiredCallsStream(), {}
        for i in range(0, len(text), step):
            for delta in stream.feed(text[i:i + step]):
                call = calls.setdefault(delta["index"], [None, ""])
                call[0] = delta["function"].get("name", call[0])
                call[1] += delta["function"]["arguments"]
        assert [(n, json.loads(a)) for n, a in calls.values()] == [
            ("get_weather", {"city": 'Pa"ris}', "unit": {"a": 1}}), ("get_time", {"zone": "UTC"})], step


def test_completions_take_the_constraint_too(sync_client):
    done = sync_client.completions.create(model="uppercase", prompt="The answer is", max_tokens=8, temperature=1,
                                          seed=3, n=4, extra_body={"guided_choice": ["yes", "no", "maybe"]})
    assert {c.text for c in done.choices} <= {"yes", "no", "maybe"}
    cut = sync_client.completions.create(model="llm", prompt="A city:", max_tokens=3, temperature=0, extra_body={
        "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": CITY}}})
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].text.startswith("{")


def test_triton_structured_output_input(grpc_client):
    import tritonclient.grpc as grpcclient

    def tensor(name, value, dtype, triton):
        t = grpcclient.InferInput(name, [1], triton)
        t.set_data_from_numpy(np.array([value], dtype=dtype))
        return t

    responses: queue.Queue = queue.Queue()
    grpc_client.start_stream(callback=lambda result, error: responses.put((result, error)))
    grpc_client.async_stream_infer("llm", [
        tensor("text_input", apply_chat_template("Give me a code.").encode(), np.object_, "BYTES"),
        tensor("max_tokens", 16, np.int32, "INT32"), tensor("temperature", 0.0, np.float32, "FP32"),
        tensor("structured_output", json.dumps({"regex": "[A-Z]{2}[0-9]{3}"}).encode(), np.object_, "BYTES"),
    ])
    result, error = responses.get(timeout=120)
    assert error is None, error
    assert re.fullmatch(r"[A-Z]{2}[0-9]{3}", result.as_numpy("text_output")[0].decode())
    assert result.as_numpy("finish_reason")[0].decode() == "stop"
    grpc_client.async_stream_infer("llm", [
        tensor("text_input", b"x", np.object_, "BYTES"),
        tensor("structured_output", json.dumps({"choice": []}).encode(), np.object_, "BYTES")])
    _, error = responses.get(timeout=120)
    assert error is not None and "structured_output.choice must be a non-empty list" in error.message()


@pytest.fixture(scope="module")
def roomy_frontend(triton_server, tmp_path_factory):
    """A frontend with the default 1 MiB body limit: a 1 MB schema reaches the schema check."""
    proc = FrontendProcess(triton_server.grpc_url, None, tmp_path_factory.mktemp("roomy") / "frontend.log",
                           "--no-supervise").start()
    yield proc
    proc.stop()


DEEP: dict = {}
_node = DEEP
for _ in range(400):
    _node["items"] = {}
    _node = _node["items"]
CHAT = {"model": "llm", "messages": ASK, "max_tokens": 4}
BAD = {
    "schema that is not JSON Schema": ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nope"}}}}, "response_format.json_schema.schema",
        "response_format.json_schema.schema is not a valid JSON Schema"),
    "unsupported schema feature": ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "not": {"required": ["a"]}}}}},
        "response_format.json_schema.schema", "the JSON Schema keyword 'not' (at #/not)"),
    "regex that does not compile": ({**CHAT, "structured_outputs": {"regex": "(unclosed"}},
                                    "structured_outputs.regex", "is not a valid regular expression"),
    # xgrammar 0.2.9 raises UnicodeDecodeError on it (its error text cuts the character in two): was a 500
    "grammar with a bare non-ASCII character": ({**CHAT, "structured_outputs": {"grammar": "root ::= é"}},
                                                "structured_outputs", "next to a non-ASCII character"),
    "grammar that does not compile": ({**CHAT, "structured_outputs": {"grammar": "root ::= nothing_here"}},
                                      "structured_outputs", 'Rule "nothing_here" is not defined'),
    "empty choice": ({**CHAT, "guided_choice": []}, "guided_choice", "must be a non-empty list"),
    "tool_choice naming an unknown function": ({**CHAT, "tools": [WEATHER], "tool_choice": {
        "type": "function", "function": {"name": "get_time"}}}, "tool_choice",
        "names function 'get_time', which is not in tools (get_weather)"),
    "tool parameters not an object schema": ({**CHAT, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "string"}}}], "tool_choice": "required"}, "tools.0.function.parameters",
        "must be a JSON Schema of type object"),
    "two constraints": ({**CHAT, "response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
                        "structured_outputs", "send one output constraint: response_format and structured_outputs"),
    "auto tools on a template without tools": ({**CHAT, "tools": [WEATHER]}, "tool_choice",
                                               "renders no tools"),
    "schema nested too deeply": ({**CHAT, "guided_json": DEEP}, "guided_json", "guided_json is nested too deeply"),
    "lookaround in a pattern": ({**CHAT, "guided_json": {"type": "string", "pattern": "^(?!admin)[a-z]+$"}},
                                "guided_json", "lookaround in a pattern"),
    "allOf splitting constraints": ({**CHAT, "guided_json": {"allOf": [{"type": "integer"}, {"minimum": 5}]}},
                                    "guided_json", "allOf with more than one part"),
    "1 MB schema": ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "description": "x" * 1_000_000}}}}, "response_format.json_schema.schema",
        "at most 65536 are accepted"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_constraint_is_a_400_naming_the_field(case, roomy_frontend):
    body, param, message = BAD[case]
    response = httpx.post(f"{roomy_frontend.url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == param, error
    ok = httpx.post(f"{roomy_frontend.url}/v1/chat/completions", json={**CHAT, "guided_regex": "[a-z]{3}"},
                    timeout=120)
    assert ok.status_code == 200 and re.fullmatch("[a-z]{3}", ok.json()["choices"][0]["message"]["content"])


def test_offline_generator_takes_structured_output(tmp_path):
    from backends.offline.text import TextGenerator

    generator = TextGenerator(max_num_seqs=4, max_loras=1, dtype="float32")
    try:
        outs = generator.generate(["A city:", "Yes or no?"], max_tokens=48, temperature=0,
                                  structured_output={"json": CITY}, progress=False)
        for out in outs:
            jsonschema.validate(json.loads(out.text), CITY)
        mixed = generator.generate(["Yes or no?", "A word:"], max_tokens=8, temperature=0, progress=False,
                                   structured_output=[{"choice": ["yes", "no"]}, None])
        assert mixed[0].text in ("yes", "no") and mixed[0].finish_reason == "stop"
    finally:
        generator.close()


def test_hermes_tool_calls_of_a_template_with_tools():
    """`auto` on a template that renders tools: the tools reach the prompt and `<tool_call>` blocks become calls."""
    from transformers import AutoTokenizer

    from backends.llm.chat import renders_tools
    from backends.settings import default_llm_model_path
    from openai_frontend.engine.structured import Plan, tool_calls

    tokenizer = AutoTokenizer.from_pretrained(default_llm_model_path())
    tokenizer.chat_template = (  # a Hermes-style template in miniature, written for this test
        "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "<|im_start|>assistant\n")
    assert renders_tools(tokenizer)
    prompt = apply_chat_template(ASK, tokenizer=tokenizer, tools=[WEATHER, TIME])
    assert prompt.startswith("<tools>get_weather;get_time;</tools>")
    plan = Plan(parse_calls=True)
    content, calls = tool_calls(plan, 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
                                      '{"city": "Paris", "unit": "celsius"}}\n</tool_call>')
    assert content == "Let me check." and calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    assert tool_calls(plan, "No tools needed.") == ("No tools needed.", [])
    broken = "<tool_call>{not json}</tool_call>"
    assert tool_calls(plan, broken) == (broken, [])  # left as the model wrote it


def test_grammar_metrics_count_compiles_and_cache_hits(sync_client, triton_server):
    def counters() -> dict[str, float]:
        text = httpx.get(triton_server.metrics_url, timeout=30).text
        out = {}
        for line in text.splitlines():
            match = re.match(r'(multilora_llm_grammar_\w+)\{model="llm"\} (\S+)', line)
            if match:
                out[match[1]] = float(match[2])
        return out

    regex = f"[a-z]{{{time_ns() % 7 + 2}}}x[0-9]{{2}}"  # a constraint no other test compiled
    before = counters()
    for _ in range(2):
        sync_client.chat.completions.create(model="llm", messages=ASK, max_tokens=8, temperature=0,
                                            extra_body={"guided_regex": regex})
    after = counters()
    assert after["multilora_llm_grammar_compiles_total"] - before.get("multilora_llm_grammar_compiles_total", 0) == 1
    assert after["multilora_llm_grammar_cache_hits_total"] - before.get("multilora_llm_grammar_cache_hits_total",
                                                                         0) == 1
    assert after["multilora_llm_grammar_compile_seconds_total"] > before.get(
        "multilora_llm_grammar_compile_seconds_total", 0)


def test_required_tools_with_defs_and_a_non_ascii_choice(sync_client):
    """pydantic_function_tool's nested models reference `#/$defs/...`: still compiled for tool_choice required;
    a choice outside the BMP (xgrammar reads JSON's surrogate escapes as two characters) is produced."""
    class Address(BaseModel):
        city: str = Field(max_length=16)

    class Ship(BaseModel):
        to: Address
        express: bool

    tool = openai.pydantic_function_tool(Ship)
    assert "$defs" in tool["function"]["parameters"]
    done = sync_client.chat.completions.create(model="llm", messages=ASK, tools=[tool, TIME], tool_choice="required",
                                               parallel_tool_calls=False, max_tokens=96, temperature=0)
    (call,) = done.choices[0].message.tool_calls
    schemas = {"Ship": tool["function"]["parameters"], "get_time": TIME["function"]["parameters"]}
    jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    emoji = sync_client.chat.completions.create(model="llm", messages=ASK, max_tokens=8, temperature=1, seed=2,
                                                extra_body={"guided_choice": ["🌞 sunny", "🌧 rainy"]})
    assert emoji.choices[0].message.content in ("🌞 sunny", "🌧 rainy")


def test_a_named_call_cut_by_a_stop_string_is_not_labelled_tool_calls(sync_client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    cut = sync_client.chat.completions.create(model="llm", messages=ASK, tools=[WEATHER], tool_choice=named,
                                              max_tokens=48, temperature=0, stop=[","])
    choice = cut.choices[0]
    assert choice.finish_reason == "stop" and choice.message.tool_calls[0].function.arguments.startswith("{")


def test_auto_streams_content_until_a_tool_call_tag():
    from openai_frontend.engine.structured import Plan
    from openai_frontend.engine.text import _chat_render

    render = _chat_render(Plan(parse_calls=True))
    pieces = ["Let me ", "check. <to", "ol_call>", '{"name": "get_weather", "arguments": {"city": "Paris"}}',
              "</tool_call>"]
    out = [render(p, None, False) for p in pieces] + [render("", "stop", False)]
    streamed = "".join(c["delta"]["content"] for c in out if c and c["delta"].get("content"))
    assert streamed == "Let me check. "  # the tag's first characters were held back, never streamed
    final = out[-1]
    assert final["finish_reason"] == "tool_calls" and final["delta"]["tool_calls"][0]["function"]["name"] == \
        "get_weather"
    plain = _chat_render(Plan(parse_calls=True))
    chunks = [plain("Just text <b>", None, False), plain(" here.", "stop", False)]
    assert "".join(c["delta"]["content"] for c in chunks if c) == "Just text <b> here."


def test_tool_calls_in_the_history_reach_a_template_without_tools():
    from openai_frontend.engine.tokenizers import chat_messages
    from openai_frontend.schemas import ChatMessage

    history = [ChatMessage(role="assistant", content=None, tool_calls=[{"id": "call_1", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]), ChatMessage(role="tool", content="18 C",
                                                                                  tool_call_id="call_1")]
    inline = chat_messages(history, inline_tool_calls=True)
    assert inline[0]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    native = chat_messages(history)
    assert native[0]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert native[1]["tool_call_id"] == "call_1"
