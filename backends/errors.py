"""Typed request errors raised by backend code; triton_io maps them onto pb_utils.TritonError codes."""

from __future__ import annotations



class BackendError(Exception):
    """Base class: the message is shown to the client as is, so it must say what was wrong and with what."""


class InvalidArgument(BackendError):
    """The request is malformed or out of range (Triton INVALID_ARG, HTTP 400)."""


class NotFound(BackendError):
    """A named thing (adapter, model file) does not exist (Triton NOT_FOUND, HTTP 404)."""


class Unavailable(BackendError):
    """The model cannot take the request now, e.g. it is shutting down (Triton UNAVAILABLE, HTTP 503)."""


class InternalError(BackendError):
    """Our fault, not the request's (Triton INTERNAL, HTTP 500); the message still names what failed."""


def same_kind(exc: BackendError, message: str) -> BackendError:
    """An error of the same kind (so the same status) as `exc`, with another message."""
    for kind in (InvalidArgument, NotFound, Unavailable, InternalError):
        if isinstance(exc, kind):
            return kind(message)
    return BackendError(message)
