"""A request's output constraint (structured outputs): what it is and whether it is acceptable, checked without
compiling it. Pure Python (no torch, no xgrammar) so that the frontend refuses a bad constraint with the field's name
before a request reaches Triton; backends/llm/grammar.py compiles the accepted ones.

The `structured_output` form (Triton input, offline API): a JSON object with exactly one of `json` (a JSON schema),
`json_object` (true: any JSON object), `regex`, `choice` (a list of strings) or `grammar` (xgrammar's EBNF).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from backends.errors import InvalidArgument

KINDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_CONSTRAINT_CHARS = 65536  # a schema, regex or grammar; a bigger one is refused before anything compiles it
MAX_CHOICES = 1024
# JSON Schema keywords xgrammar 0.2.9 accepts but does not enforce (checked: it admits values that violate them):
# refused, so that no output claims to match a schema it was not held to.
UNENFORCED = ("not", "if", "then", "else", "uniqueItems", "contains", "minContains", "maxContains",
              "dependentRequired")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_ONE = ("items", "additionalProperties", "unevaluatedProperties", "unevaluatedItems", "propertyNames",
               "additionalItems")
_SCHEMA_LISTS = ("prefixItems", "allOf", "anyOf", "oneOf")


@dataclass(frozen=True)
class Constraint:
    kind: str  # one of KINDS
    value: str  # canonical text: the schema as sorted-key JSON, the regex, the EBNF, or the choices as a JSON list

    def to_json(self) -> str:
        """The `structured_output` form of this constraint."""
        payload: Any = True if self.kind == "json_object" else (
            json.loads(self.value) if self.kind in ("json", "choice") else self.value)
        return json.dumps({self.kind: payload})


_LOOKAROUND = re.compile(r"\(\?<?[=!]")
_LENGTHS = ("minLength", "maxLength")
_METADATA = {"title", "description", "$comment", "examples", "default", "$id", "$schema", "$anchor", "deprecated",
             "readOnly", "writeOnly"}


def _unenforced(schema: Any, path: str) -> str | None:
    """The path (and, after a space, why) of the first part of a schema xgrammar would not enforce, or None. Checked
    against xgrammar 0.2.9: each of these compiles and then admits values that break the schema."""
    if not isinstance(schema, dict):
        return None
    for key in UNENFORCED:
        if key in schema:
            return f"{path}/{key}"
    for key in ("pattern",):
        if isinstance(schema.get(key), str) and _LOOKAROUND.search(schema[key]):
            return f"{path}/{key} lookaround in a pattern"
        if key in schema and any(k in schema for k in _LENGTHS):
            return f"{path}/{key} a pattern together with minLength/maxLength"
    if isinstance(schema.get("patternProperties"), dict):
        for name in schema["patternProperties"]:
            if _LOOKAROUND.search(name):
                return f"{path}/patternProperties lookaround in a pattern"
    for key in ("enum", "const"):
        if key in schema and set(schema) - _METADATA - {key, "type"}:
            return f"{path}/{key} {key} together with other constraints"
    if "allOf" in schema:
        parts = schema["allOf"]
        if not isinstance(parts, list) or len(parts) > 1 or set(schema) - _METADATA - {"allOf", "$defs",
                                                                                      "definitions"}:
            return f"{path}/allOf allOf with more than one part or beside other keywords"
    for key in _SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                if found := _unenforced(sub, f"{path}/{key}/{name}"):
                    return found
    for key in _SCHEMA_ONE:
        if found := _unenforced(schema.get(key), f"{path}/{key}"):
            return found
    for key in _SCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            for i, sub in enumerate(schema[key]):
                if found := _unenforced(sub, f"{path}/{key}/{i}"):
                    return found
    return None


def check_schema(schema: Any, field: str = "json") -> str:
    """A JSON schema as canonical text; InvalidArgument (naming `field`) when it is not a valid JSON Schema, uses a
    keyword that would not be enforced, or is too big."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    if not isinstance(schema, dict):
        raise InvalidArgument(f"{field} must be a JSON Schema object, got {type(schema).__name__}")
    try:
        text = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    except RecursionError:
        raise InvalidArgument(f"{field} is nested too deeply") from None
    if len(text) > MAX_CONSTRAINT_CHARS:
        raise InvalidArgument(f"{field} has {len(text)} characters, at most {MAX_CONSTRAINT_CHARS} are accepted")
    try:
        Draft202012Validator.check_schema(schema)
        found = _unenforced(schema, "#")
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise InvalidArgument(f"{field} is not a valid JSON Schema: {exc.message}"
                              + (f" (at {where})" if where else "")) from None
    except RecursionError:
        raise InvalidArgument(f"{field} is nested too deeply") from None
    if found:
        where, _, why = found.partition(" ")
        keyword = where.rsplit("/", 1)[1]
        what = why or f"the JSON Schema keyword '{keyword}'"
        raise InvalidArgument(f"{field} uses {what} (at {where}), which structured outputs do not enforce; "
                              f"remove it")
    return text


def _text(value: Any, field: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{field} must be a non-empty string ({what})")
    if len(value) > MAX_CONSTRAINT_CHARS:
        raise InvalidArgument(f"{field} has {len(value)} characters, at most {MAX_CONSTRAINT_CHARS} are accepted")
    return value


def make_constraint(kind: str, value: Any, field: str | None = None) -> Constraint:
    """One constraint checked; `field` names it in errors (the client's name for it, e.g. response_format.json_schema
    .schema); InvalidArgument on a bad one."""
    field = field or kind
    if kind == "json":
        return Constraint("json", check_schema(value, field))
    if kind == "json_object":
        if value is not True and value != {}:
            raise InvalidArgument(f"{field} must be true")
        return Constraint("json_object", "")
    if kind == "regex":
        text = _text(value, field, "a regular expression")
        try:
            re.compile(text)
        except re.error as exc:
            raise InvalidArgument(f"{field} is not a valid regular expression: {exc}") from None
        return Constraint("regex", text)
    if kind == "choice":
        if not isinstance(value, list) or not value:
            raise InvalidArgument(f"{field} must be a non-empty list of strings")
        if len(value) > MAX_CHOICES or not all(isinstance(c, str) and c for c in value):
            raise InvalidArgument(f"{field} must hold 1 to {MAX_CHOICES} non-empty strings")
        text = json.dumps(value)
        if len(text) > MAX_CONSTRAINT_CHARS:
            raise InvalidArgument(f"{field} has {len(text)} characters, at most {MAX_CONSTRAINT_CHARS} are accepted")
        return Constraint("choice", text)
    if kind == "grammar":
        return Constraint("grammar", _text(value, field, "an EBNF grammar"))
    raise InvalidArgument(f"unknown constraint '{kind}': use one of {', '.join(KINDS)}")


def parse_constraint(text: str | None, field: str = "structured_output") -> Constraint | None:
    """The `structured_output` form (a JSON object with one key); None for none."""
    if text is None or not text.strip():
        return None
    if len(text) > 4 * MAX_CONSTRAINT_CHARS:  # refused before parsing, whatever it holds
        raise InvalidArgument(f"{field} has {len(text)} characters, at most {MAX_CONSTRAINT_CHARS} are accepted")
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{field} must be a JSON object: {exc}") from None
    except RecursionError:
        raise InvalidArgument(f"{field} is nested too deeply") from None
    if not isinstance(spec, dict) or len(spec) != 1:
        raise InvalidArgument(f"{field} must be a JSON object with exactly one of {', '.join(KINDS)}")
    ((kind, value),) = spec.items()
    return make_constraint(kind, value, f"{field}.{kind}")
