"""Typed reads of a model's config.pbtxt `parameters` (all strings in Triton): empty means the default, a bad
value fails the model load with a message naming the parameter. Every model parameter is read through these.
Torch- and Triton-free: the frontend reads the same parameters from a model's config."""

from __future__ import annotations

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _raw(params: dict[str, str], key: str) -> str:
    return (params.get(key) or "").strip()


def _typed(params: dict[str, str], key: str, default, convert, what: str):
    raw = _raw(params, key)
    if not raw:
        return default
    try:
        return convert(raw)
    except ValueError:
        raise ValueError(f"model parameter '{key}' must be {what}, got {raw!r}") from None


def model_parameters(model_config: dict) -> dict[str, str]:
    """config.pbtxt `parameters { key: ... value { string_value: ... } }` (Triton's JSON form) as a plain dict."""
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


def param_str(params: dict[str, str], key: str, default: str | None) -> str | None:
    """The value, stripped; `default` when empty or absent."""
    return _raw(params, key) or default


def param_choice(params: dict[str, str], key: str, default: str, choices) -> str:
    value = param_str(params, key, default)
    if value not in choices:
        raise ValueError(f"model parameter '{key}' must be one of {sorted(choices)}, got {value!r}")
    return value


def param_int(params: dict[str, str], key: str, default: int | None) -> int | None:
    return _typed(params, key, default, int, "an integer")


def param_float(params: dict[str, str], key: str, default: float | None) -> float | None:
    return _typed(params, key, default, float, "a number")


def param_bool(params: dict[str, str], key: str, default: bool) -> bool:
    raw = _raw(params, key).lower()
    if not raw:
        return default
    if raw not in _TRUE | _FALSE:
        raise ValueError(f"model parameter '{key}' must be true or false, got {raw!r}")
    return raw in _TRUE
