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
) -> str:
    """Render `messages` (or one user message given as a string) with the model's chat template to prompt text."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if tokenizer is None:
        if model_path is None:
            from backends.settings import default_llm_model_path

            model_path = default_llm_model_path()
        tokenizer = load_tokenizer(str(model_path))
    if not tokenizer.chat_template:
        raise ValueError(f"tokenizer of {model_path or tokenizer.name_or_path} has no chat template")
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
