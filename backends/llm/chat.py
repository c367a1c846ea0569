"""Chat prompts: the base model's own chat template, as the frontend and tests build `text_input`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence


@lru_cache(maxsize=4)
def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def apply_chat_template(
    messages: Sequence[dict[str, str]] | str,
    model_path: str | Path | None = None,
    tokenizer=None,
    add_generation_prompt: bool = True,
    tools: Sequence[dict] | None = None,
) -> str:
    """Render `messages` (or one user message given as a string) with the model's chat template to prompt text;
    `tools` (OpenAI's tool list) go to templates that render tools."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if tokenizer is None:
        if model_path is None:
            from backends.settings import default_llm_model_path

            model_path = default_llm_model_path()
        tokenizer = load_tokenizer(str(model_path))
    if not tokenizer.chat_template:
        raise ValueError(f"tokenizer of {model_path or tokenizer.name_or_path} has no chat template")
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **({"tools": list(tools)} if tools else {}))


def renders_tools(tokenizer) -> bool:
    """Whether the chat template renders a `tools` list (then the model has a tool-call format of its own)."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default") or ""
    return "tools" in (template or "")
