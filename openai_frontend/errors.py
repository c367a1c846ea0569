"""Every error leaves the frontend in OpenAI's shape `{"error": {"message", "type", "param", "code"}}` with the
right HTTP status; a 500 never carries a traceback (it is logged instead)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from backends.errors import BackendError, InvalidArgument, NotFound, Unavailable

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error", 499: "cancelled",
          500: "internal_server_error", 501: "not_implemented_error", 503: "service_unavailable",
          504: "timeout_error"}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.code = code
        self.type = type_ or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code if self.code is not None else self.status}}


def status_of(exc: BackendError) -> int:
    """The HTTP status of a backend error raised in the frontend's own process (registry, downloads)."""
    for kind, status in ((NotFound, 404), (InvalidArgument, 400), (Unavailable, 503)):
        if isinstance(exc, kind):
            return status
    return 500


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | int | None  # a machine-readable code where there is one, else the HTTP status


class ErrorResponse(BaseModel):
    """What every error answer carries (the OpenAI SDK parses this shape)."""

    error: ErrorBody


# When each documented error status happens; routes name theirs with error_responses().
_WHEN = {400: "Invalid request, including a body that fails validation (never 422)",
         401: "Missing or wrong API key (admin key on the load/unload routes)",
         403: "Model load/unload is disabled: the frontend runs without an admin key",
         404: "Unknown model or adapter (or runtime LoRA updating is off)",
         413: "Request body over --max-body-bytes",
         500: "Internal error (logged by the frontend, no details in the answer)",
         503: "Triton or the model is unavailable or restarting; retry after Retry-After seconds"}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` entries documenting these statuses with the OpenAI error body."""
    return {status: {"model": ErrorResponse, "description": _WHEN[status]} for status in statuses}


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param)


def model_not_found(name: str) -> OpenAIError:
    return OpenAIError(404, f"The model '{name}' does not exist.", "model", "model_not_found")


def error_response(exc: OpenAIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else exc.headers
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def install_openapi(app: FastAPI) -> None:
    """The schema without FastAPI's automatic 422s (our handler answers validation errors with 400 in OpenAI's
    shape, which every route documents instead), and with errors as JSON also on routes whose success is text
    (FastAPI files every response model under the route's own media type)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
                    for status, response in operation["responses"].items():
                        if int(status) >= 400 and "content" in response:
                            response["content"] = {"application/json": next(iter(response["content"].values()))}
            for name in ("HTTPValidationError", "ValidationError"):
                schema["components"]["schemas"].pop(name, None)
        return app.openapi_schema

    app.openapi = openapi


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(_request: Request, exc: OpenAIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header", "cookie"):  # only the source: a field may be
            loc = loc[1:]                                                     # named "path" (lora.path)
        message = first.get("msg", "invalid request")
        if loc:
            message = f"{'.'.join(loc)}: {message}"
        # A body-level check (field_policy) names its field in the error's context, its message names it already.
        param = ".".join(loc) or (first.get("ctx") or {}).get("param")
        return error_response(bad_request(message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = "Not found: no such route"
        if exc.status_code == 413:
            message = (f"request body exceeds the limit of {_request.app.state.config.max_body_bytes} bytes "
                       f"(--max-body-bytes)")
        return error_response(OpenAIError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(OpenAIError(500, "Internal server error; see the frontend log"))
