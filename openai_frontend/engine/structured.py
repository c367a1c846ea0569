"""Structured outputs and tool calls on the text routes: a request's one output constraint (OpenAI's
`response_format`, vLLM's `structured_outputs` / `guided_*`, or the tool call `tools` + `tool_choice` force), checked
here so that a bad one is a 400 naming its field before Triton sees it; and the answers' tool calls (a forced call's
arguments, or the Hermes-style `<tool_call>` blocks of a template with its own tool format).

tool_choice: `none` = free text, tools not shown to the model; `auto` (the default with tools) = the template renders
the tools and the model may call them in its own format (refused for templates that render no tools, as vLLM
refuses auto tool choice without a parser); `required` = at least one call, its arguments held to the tool's schema;
a named function = exactly that call.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from backends.errors import InvalidArgument
from backends.structured import Constraint, check_schema, make_constraint
from openai_frontend.errors import bad_request
from openai_frontend.schemas import ChatCompletionRequest, CompletionRequest, Tool

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


@dataclass
class Plan:
    """What a text request asks for beyond free text."""

    constraint: Constraint | None = None
    param: str | None = None  # the field the constraint came from (named in compile errors)
    tools: list[dict] = field(default_factory=list)  # for the chat template (auto)
    forced: str | None = None  # "named": the output is one call's arguments; "required": a JSON list of calls
    function: str | None = None  # the named function
    parse_calls: bool = False  # auto: parse the template's tool-call blocks from the text

    @property
    def tool_calls(self) -> bool:
        return self.forced is not None or self.parse_calls


def _checked(kind: str, value, param: str) -> Constraint:
    if kind == "json" and isinstance(value, str):  # vLLM takes a schema as JSON text too
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise bad_request(f"{param} is not valid JSON: {exc}", param) from None
    try:
        return make_constraint(kind, value, param)
    except InvalidArgument as exc:
        raise bad_request(str(exc), param) from None


def _sources(body: ChatCompletionRequest | CompletionRequest) -> list[tuple[str, Constraint]]:
    found = []
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", _checked("json_object", True, "response_format")))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise bad_request("response_format json_schema needs json_schema.schema", "response_format.json_schema")
        found.append(("response_format", _checked("json", rf.json_schema.schema_,
                                                  "response_format.json_schema.schema")))
    so = body.structured_outputs
    if so is not None:
        given = {k: v for k, v in (("json", so.json_), ("json_object", so.json_object), ("regex", so.regex),
                                   ("choice", so.choice), ("grammar", so.grammar)) if v is not None}
        if len(given) != 1:
            raise bad_request("structured_outputs must hold exactly one of json, json_object, regex, choice, "
                              "grammar", "structured_outputs")
        ((kind, value),) = given.items()
        found.append(("structured_outputs", _checked(kind, value, f"structured_outputs.{kind}")))
    for kind in ("json", "regex", "choice", "grammar"):
        value = getattr(body, f"guided_{kind}")
        if value is not None:
            found.append((f"guided_{kind}", _checked(kind, value, f"guided_{kind}")))
    return found


def _parameters(tool: Tool, i: int) -> dict:
    params = tool.function.parameters
    where = f"tools.{i}.function.parameters"
    if params is None:
        return {"type": "object", "properties": {}}
    if not isinstance(params, dict) or params.get("type", "object") != "object":
        raise bad_request(f"{where} of tool '{tool.function.name}' must be a JSON Schema of type object", where)
    params = {"type": "object", **params}  # without a type, {} would admit any JSON value as the arguments
    try:
        check_schema(params, where)
    except InvalidArgument as exc:
        raise bad_request(str(exc), where) from None
    return params


def _hoisted(params: dict, prefix: str, defs: dict) -> dict:
    """A tool's parameters schema to nest inside the `required` calls schema: its `$defs` move to the root (into
    `defs`, renamed with `prefix`) and its `$ref`s follow them, so that `#/$defs/...` still resolves."""
    def rewrite(node):
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key == "$ref" and isinstance(value, str):
                    for root in ("#/$defs/", "#/definitions/"):
                        if value.startswith(root):
                            value = f"#/$defs/{prefix}{value[len(root):]}"
                            break
                    else:
                        if value.startswith("#"):
                            raise bad_request(f"tool parameters with the $ref '{value}' cannot be combined by "
                                              f"tool_choice 'required'; use $defs or a named function",
                                              "tool_choice")
                    out[key] = value
                else:
                    out[key] = rewrite(value)
            return out
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    params = rewrite(params)
    for key in ("$defs", "definitions"):
        for name, sub in (params.pop(key, None) or {}).items():
            defs[f"{prefix}{name}"] = sub
    return params


def plan_completion(body: CompletionRequest) -> Plan:
    found = _sources(body)
    _one(found)
    return _plan(found)


def _plan(found: list[tuple[str, Constraint]]) -> Plan:
    return Plan(found[0][1], found[0][0]) if found else Plan()


def _one(found: list[tuple[str, Constraint]]) -> None:
    if len(found) > 1:
        raise bad_request(f"send one output constraint: {' and '.join(f for f, _ in found)} were both given",
                          found[1][0])


def plan_chat(body: ChatCompletionRequest, template_renders_tools: bool) -> Plan:
    found = _sources(body)
    tools = body.tools or []
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise bad_request("tools must have distinct function names", "tools")
    params = {t.function.name: _parameters(t, i) for i, t in enumerate(tools)}
    if not isinstance(choice, str):  # a named function
        name = choice.function.name
        if name not in params:
            raise bad_request(f"tool_choice names function '{name}', which is not in tools "
                              f"({', '.join(names) or 'none given'})", "tool_choice")
        found.append(("tool_choice", Constraint("json", check_schema(params[name], "tool_choice"))))
        _one(found)
        plan = Plan(found[0][1], "tool_choice", forced="named", function=name)
    elif choice == "required":
        if not tools:
            raise bad_request("tool_choice 'required' needs tools", "tool_choice")
        defs: dict = {}
        calls = {"type": "array", "minItems": 1, "items": {"anyOf": [
            {"type": "object", "properties": {"name": {"enum": [name]},
                                              "parameters": _hoisted(schema, f"t{i}_", defs)},
             "required": ["name", "parameters"], "additionalProperties": False}
            for i, (name, schema) in enumerate(params.items())]}}
        if defs:
            calls["$defs"] = defs
        if not body.parallel_tool_calls:
            calls["maxItems"] = 1
        found.append(("tool_choice", Constraint("json", check_schema(calls, "tools"))))
        _one(found)
        plan = Plan(found[0][1], "tool_choice", forced="required")
    else:
        _one(found)
        plan = _plan(found)
        if choice == "auto" and tools:
            if not template_renders_tools:
                raise bad_request("tool_choice 'auto' needs a chat template with its own tool-call format, and "
                                  "this model's renders no tools; use tool_choice 'required' or a named function",
                                  "tool_choice")
            plan.parse_calls = plan.constraint is None
    if choice != "none" and template_renders_tools:  # the model sees the tools it may (or must) call
        plan.tools = [{"type": "function", "function": {**t.function.model_dump(exclude_none=True),
                                                         "parameters": params[t.function.name]}} for t in tools]
    return plan


def _call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def whole_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def tool_calls(plan: Plan, text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a finished answer; a `required` answer that is not whole JSON (cut by max_tokens or
    a stop string) stays content, as vLLM leaves it; a named call keeps its (then partial) arguments."""
    if plan.forced == "named":
        return None, [_call(plan.function, text)]
    if plan.forced == "required":
        try:
            calls = json.loads(text)
        except json.JSONDecodeError:
            return text, []
        return None, [_call(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in calls]
    if plan.parse_calls:
        calls = []
        for block in _HERMES.findall(text):
            try:
                call = json.loads(block)
                calls.append(_call(call["name"], json.dumps(call.get("arguments", {}), ensure_ascii=False)))
            except (json.JSONDecodeError, KeyError, TypeError):
                return text, []  # not a well-formed call: the text as the model wrote it
        if calls:
            content = text[:text.find("<tool_call>")].strip()
            return content or None, calls
    return text, []


class RequiredCallsStream:
    """A `required` answer (xgrammar writes it in the schema's key order: `[{"name": "f", "parameters": {...}}, ...]`)
    turned into streamed `delta.tool_calls` as it grows: a call's id, type
    and name once its arguments begin, then its arguments in fragments, as vLLM streams them. Text of another shape
    (none is expected) streams nothing; the caller then sends the calls whole at the end."""

    _HEAD = re.compile(r'\{\s*"name"\s*:\s*"([^"\\]+)"\s*,\s*"parameters"\s*:\s*')

    def __init__(self) -> None:
        self.text = ""
        self.pos = 0  # scanned up to here
        self.index = -1  # the call whose arguments are streaming (or done)
        self.depth = 0  # brace depth inside the current arguments (0: between calls)
        self.in_string = self.escaped = False
        self.streamed = False  # at least one call was announced

    def feed(self, piece: str) -> list[dict]:
        self.text += piece
        out: list[dict] = []
        while self.pos < len(self.text):
            if self.depth == 0:  # between calls: a whole head is needed
                match = self._HEAD.search(self.text, self.pos)
                if match is None or self.text[self.pos:match.start()].strip("[,}] ") != "":
                    break
                self.index += 1
                self.streamed = True
                self.pos = match.end()
                out.append({"index": self.index, **_call(match[1], "")})
                self.depth = -1  # the arguments' first brace is next
                continue
            start = self.pos
            while self.pos < len(self.text):
                ch = self.text[self.pos]
                self.pos += 1
                if self.in_string:
                    self.escaped, self.in_string = (False, True) if self.escaped else (ch == "\\", ch != '"')
                    continue
                if ch == '"':
                    self.in_string = True
                elif ch == "{":
                    self.depth = 1 if self.depth == -1 else self.depth + 1
                elif ch == "}":
                    self.depth -= 1
                    if self.depth == 0:
                        break
            fragment = self.text[start:self.pos]
            if fragment:
                out.append({"index": self.index, "function": {"arguments": fragment}})
        return out
