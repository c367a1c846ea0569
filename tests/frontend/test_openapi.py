"""/openapi.json tells the truth: schemathesis fuzzes the real frontend process (over the session's tritonserver)
from its own schema and checks that every answer's status, content type and body are the documented ones and that
none is a server error. The admin routes that change what the session serves are checked with hand-written cases."""

from __future__ import annotations

import json
import re
import shutil
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from backends.settings import adapters_dir
from openai_frontend.app import create_app
from openai_frontend.config import FrontendConfig
from tools.session import ADMIN_KEY, API_KEY

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
# Routes that load/unload models or adapters for the whole session: hand-written cases below, never fuzzed.
MUTATING = r"^/v1/(models/\{name\}/(load|unload)|(load|unload)_lora_adapter)$"
_SIZE = re.compile(r"^\d{1,5}x\d{1,5}$")
# Served names the fuzzer cannot guess, drawn next to its own (which exercise the 404s).
SERVED = {"/v1/chat/completions": ["llm", "uppercase"], "/v1/completions": ["llm", "uppercase"],
          "/v1/images/generations": ["diffusion"], "/tokenize": ["llm"], "/detokenize": ["llm"],
          "/tokenizer_info": ["llm", "diffusion"], "/v1/models/{model_id}": ["llm", "uppercase", "diffusion"]}
# The real model runs on 2 CPU cores: generated requests may ask for at most this much work. Absent (or null)
# limits mean the server's defaults (256 tokens, the pipeline's steps), so they are set too.
CAPS = {"/v1/chat/completions": {"max_tokens": 2, "max_completion_tokens": 2, "n": 2},
        "/v1/completions": {"max_tokens": 2, "n": 2},
        "/v1/images/generations": {"num_inference_steps": 2, "n": 2}}
_INT = TypeAdapter(int)
DEFAULTS = {"/v1/chat/completions": "max_tokens", "/v1/completions": "max_tokens",
            "/v1/images/generations": "num_inference_steps"}


def _as_int(value: Any) -> int | None:
    """The int the server reads from a JSON value (pydantic takes "7" and 7.0 for 7), None if it refuses it."""
    try:
        return _INT.validate_json(json.dumps(value))
    except ValueError:  # pydantic's ValidationError included
        return None


def _cheap(path: str, body: Any) -> Any:
    """Caps the work a generated body asks for; values the server refuses anyway (negative, wrong type) stay as
    drawn, so that their 400s are still exercised."""
    if not isinstance(body, dict) or path not in CAPS:
        return body
    if body.get(DEFAULTS[path]) is None:
        body[DEFAULTS[path]] = 2
    for field, cap in CAPS[path].items():
        if field in body and (value := _as_int(body[field])) is not None and value > cap:
            body[field] = cap
    if isinstance(body.get("size"), str) and _SIZE.match(body["size"]):
        body["size"] = "32x32"
    for field in ("prompt", "messages"):
        if isinstance(body.get(field), list):
            body[field] = body[field][:2]
    return body


def _hooked(schema: schemathesis.BaseSchema) -> schemathesis.BaseSchema:
    """The schema with the hooks that steer generation towards served models and cheap requests."""

    @schema.hook("flatmap_body")
    def served_cheap_body(context, body):
        path = context.operation.path
        names = SERVED.get(path)
        if not names or not isinstance(body, dict) or "model" not in body:
            return st.just(_cheap(path, body))
        return st.sampled_from([*names, body["model"]]).map(lambda model: _cheap(path, {**body, "model": model}))

    @schema.hook("flatmap_query")
    def served_query(context, query):
        names = SERVED.get(context.operation.path)
        if not names or not query or "model" not in query:
            return st.just(query)
        return st.sampled_from([*names, query["model"]]).map(lambda model: {**query, "model": model})

    @schema.hook("flatmap_path_parameters")
    def served_path(context, path_parameters):
        names = SERVED.get(context.operation.path)
        if not names or "model_id" not in (path_parameters or {}):
            return st.just(path_parameters)
        return st.sampled_from([*names, path_parameters["model_id"]]).map(lambda model: {"model_id": model})

    return schema


# The schema is the app's own, built here at collection (schemathesis' fixture-loaded schemas do not work with
# pytest 9); test_the_served_schema_is_the_fuzzed_one proves the frontend process serves exactly this one.
OPENAPI = create_app(FrontendConfig()).openapi()
api_schema = _hooked(schemathesis.openapi.from_dict(OPENAPI, config=schemathesis.Config.from_dict(
    {"headers": AUTH, "request-timeout": 60})))


def test_the_served_schema_is_the_fuzzed_one(frontend):
    assert httpx.get(f"{frontend.url}/openapi.json", timeout=30).json() == OPENAPI


@api_schema.exclude(path_regex=MUTATING).parametrize()
@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_every_answer_is_documented(case, frontend):
    case.call_and_validate(base_url=frontend.url, checks=CHECKS)


def _validate(frontend, path: str, method: str, status: int, **case) -> None:
    response = api_schema[path][method].Case(**case).call_and_validate(base_url=frontend.url, checks=CHECKS)
    assert response.status_code == status, response.text


def test_auth_and_body_limit_answers_are_documented(frontend):
    _validate(frontend, "/v1/models", "GET", 401, headers={"Authorization": "Bearer wrong"})
    _validate(frontend, "/metrics", "GET", 401)  # no key: a JSON error from a text route
    _validate(frontend, "/v1/completions", "POST", 413,
              body={"model": "llm", "prompt": "x" * 70_000, "max_tokens": 1})


def test_streamed_answers_are_documented(frontend):
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                       ("/v1/completions", {"prompt": "Hi"})):
        _validate(frontend, path, "POST", 200, headers=AUTH,
                  body={"model": "llm", "max_tokens": 2, "stream": True, **body})


def test_a_nul_byte_in_an_adapter_path_is_the_requests_fault(frontend):
    """Found by the fuzzer: a path with a NUL byte was a 500 (os.path refuses it with ValueError)."""
    lora = {"name": "x", "path": "adapters/\x00"}
    _validate(frontend, "/v1/images/generations", "POST", 400, headers=AUTH,
              body={"model": "diffusion", "prompt": "a cat", "lora": lora})
    _validate(frontend, "/v1/load_lora_adapter", "POST", 400, headers=ADMIN,
              body={"lora_name": "x", "lora_path": lora["path"]})


def test_adapter_load_and_unload_answers_are_documented(frontend, lora_root):
    load, unload = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
    path = lora_root / "openapi_upper"
    shutil.copytree(adapters_dir() / "demo" / "uppercase", path)
    _validate(frontend, load, "POST", 401, headers=AUTH, body={"lora_name": "openapi-upper", "lora_path": str(path)})
    _validate(frontend, load, "POST", 400, headers=ADMIN, body={"lora_name": "openapi-upper"})
    _validate(frontend, load, "POST", 400, headers=ADMIN, body={"lora_name": "openapi-upper", "lora_path": "/etc"})
    _validate(frontend, load, "POST", 404, headers=ADMIN,
              body={"lora_name": "openapi-upper", "lora_path": str(lora_root / "nowhere")})
    _validate(frontend, load, "POST", 200, headers=ADMIN, body={"lora_name": "openapi-upper", "lora_path": str(path)})
    _validate(frontend, unload, "POST", 200, headers=ADMIN, body={"lora_name": "openapi-upper"})
    _validate(frontend, unload, "POST", 404, headers=ADMIN, body={"lora_name": "openapi-upper"})
    _validate(frontend, unload, "POST", 400, headers=ADMIN, body={})


def test_model_load_and_unload_answers_are_documented(frontend, triton_server, tmp_path):
    for action in ("load", "unload"):
        route = f"/v1/models/{{name}}/{action}"
        _validate(frontend, route, "POST", 401, headers=AUTH, path_parameters={"name": "llm"})
        _validate(frontend, route, "POST", 404, headers=ADMIN, path_parameters={"name": "no-such-model"})
    # Without an admin key model control is off (403): an in-process app, refused before it reaches Triton.
    app = create_app(FrontendConfig(triton_grpc_url=triton_server.grpc_url, triton_metrics_url=None,
                                    api_key=API_KEY, registry_file=tmp_path / "registry.json", supervise=False))
    local = schemathesis.openapi.from_asgi("/openapi.json", app)
    for action in ("load", "unload"):
        case = local[f"/v1/models/{{name}}/{action}"]["POST"].Case(headers=AUTH, path_parameters={"name": "llm"})
        assert case.call_and_validate(checks=CHECKS).status_code == 403
