"""Request bodies (pydantic): OpenAI chat/completions/images, vLLM's LoRA management, vLLM-Omni's `lora` object.

Unknown fields are ignored, as OpenAI-compatible servers do; fields we cannot honour (suffix, n > 1 with stream,
...) are refused by the routes with a clear 400 rather than silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Discriminator, Field, StrictInt, Tag


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class LoRARequest(_Body):
    """vLLM-Omni style per-request adapter; name and path required, aliases accepted."""

    name: str = Field(validation_alias=AliasChoices("name", "lora_name", "adapter"))
    path: str = Field(validation_alias=AliasChoices("path", "local_path", "lora_path"))
    scale: float | None = Field(None, validation_alias=AliasChoices("scale", "lora_scale"))
    int_id: int | None = Field(None, validation_alias=AliasChoices("int_id", "lora_int_id"))


# A sanity bound on a LoRA stack's length, checked before Triton is asked; the real limit is each model's
# `max_loras_per_request` (the backend refuses more with a 400 naming it).
MAX_LORA_STACK = 16

# `lora`: one adapter (an object) or a stack (a list; each adapter's delta is added, `[]` = none). Tagged by the
# JSON type so that a bad entry's error names the form that was sent (`lora.list.1.path`), not both forms.
LoRAField = Annotated[Union[Annotated[LoRARequest, Tag("object")],
                            Annotated[list[LoRARequest], Tag("list"), Field(max_length=MAX_LORA_STACK)]],
                      Discriminator(lambda v: "list" if isinstance(v, list) else "object"),
                      Field(description="One adapter, or a LoRA stack: a list of them whose deltas add up (after "
                                        "the adapter `model` names, if any; `[]` = none). The model's "
                                        "`max_loras_per_request` (default 4) bounds a stack.")]


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False  # vLLM's extra parameter
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    lora: LoRAField | None = None
    lora_scale: float | None = None  # scale for `model` = adapter name (for a base model: lora's default scale)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    # A string, strings, token ids, or lists of token ids: one choice per prompt.
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: score the prompt only
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None


class ImageGenerationRequest(_Body):
    model: str
    prompt: str
    n: int = Field(1, ge=1)
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    seed: int | None = Field(None, ge=0)
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    lora: LoRAField | None = None
    lora_scale: float | None = None


class ImageChatOptions(_Body):
    """vLLM-Omni's image parameters on a chat completion for an image model (top-level keys, the SDK's
    `extra_body`); `seed`, `n`, `lora` and `lora_scale` come from the chat body itself."""

    size: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    num_outputs_per_prompt: int = Field(1, ge=1)  # images in each choice's message


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a prompt or chat messages; `model` defaults to the served LLM."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


class LoadLoRAAdapterRequest(_Body):
    lora_name: str | None = None
    lora_path: str | None = None
    base_model_name: str | None = None
    load_inplace: bool = False
    pinned: bool = False


class UnloadLoRAAdapterRequest(_Body):
    lora_name: str | None = None
    lora_int_id: int | None = None
