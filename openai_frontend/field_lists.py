"""The README's lists of request fields per route (honoured, accepted without effect, refused and why), made from
the schemas and field_policy's tables: `python -m openai_frontend.field_lists` prints them; a test keeps the README
equal to it."""

from __future__ import annotations

import json

from openai_frontend import field_policy
from openai_frontend.schemas import IMAGE_OPTIONS, ChatCompletionRequest, CompletionRequest, ImageGenerationRequest


def _routes() -> list[tuple[str, str, type, dict[str, field_policy.Refused]]]:
    return [("/v1/chat/completions", "chat", ChatCompletionRequest, field_policy.CHAT),
            ("/v1/completions", "completions", CompletionRequest, field_policy.COMPLETIONS),
            ("/v1/images/generations", "images", ImageGenerationRequest, field_policy.IMAGES)]


def readme_lines() -> str:
    """The README's field lists: per route what is honoured, accepted without effect, and refused (and why)."""
    out = []
    for path, key, model, table in _routes():
        honoured = [n for n in model.model_fields if key != "chat" or n not in IMAGE_OPTIONS]
        out += [f"`{path}`", f"- honoured: {', '.join(f'`{n}`' for n in honoured)}"]
        if key == "chat":
            out.append(f"- on an image model also: {', '.join(f'`{n}`' for n in IMAGE_OPTIONS)} (refused on a text "
                       f"model; the text-generation fields are refused on an image model)")
        out += [f"- accepted, no effect: {', '.join(f'`{n}`' for n in field_policy.NO_EFFECT[key])}",
                "- refused unless null or the value shown:"]
        reasons: dict[str, list[str]] = {}
        for name, refused in table.items():
            shown = " / ".join(f"`{json.dumps(v)}`" for v in refused.neutral)
            reasons.setdefault(refused.reason, []).append(f"`{name}`" + (f" ({shown})" if shown else ""))
        out += [f"  - {reason}: {', '.join(names)}" for reason, names in reasons.items()]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(readme_lines(), end="")
