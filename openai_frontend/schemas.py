"""Request bodies (pydantic): OpenAI chat/completions/images, vLLM's LoRA management, vLLM-Omni's `lora` object
and image options.

Fields outside OpenAI's and vLLM's APIs are ignored, as OpenAI-compatible servers do; theirs that we do not honour
are refused with a 400 naming them (field_policy.py; combinations such as n > 1 with stream by the routes).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Discriminator, Field, StrictInt, Tag, model_validator

from openai_frontend import field_policy


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


class _Route(_Body):
    """A route's body: vLLM-Omni's literal `extra_body` object merged in, then the OpenAI/vLLM fields the route does
    not honour refused (both before the fields are read)."""

    refused: ClassVar[dict[str, field_policy.Refused]] = {}

    @model_validator(mode="before")
    @classmethod
    def _policy(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = field_policy.merge_extra_body(field_policy.without_nulls(data))
            field_policy.check_honoured(data, cls.refused)
        return data


class StreamOptions(_Body):
    include_usage: bool = False


# Optional (vLLM's rule): without it, the one served base model of the kind the request implies.
ModelField = Field(None, description="A base model or adapter name; optional when one model of the kind the request "
                                     "implies is served (images or image options: an image model; else a text model)")


class _Sampling(_Route):
    model: str | None = ModelField
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


class FunctionCall(_Body):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Body):
    """An assistant message's tool call in the history."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class JSONSchemaFormat(_Body):
    name: str = "response"
    description: str | None = None
    schema_: dict | None = Field(None, validation_alias=AliasChoices("schema", "schema_"))
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs`: exactly one of these."""

    json_: dict | str | None = Field(None, validation_alias=AliasChoices("json", "json_"))
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class FunctionDefinition(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: Any = None  # a JSON Schema object (checked by the route: the error names the tool)
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class _Constrained(_Body):
    """Structured outputs on the text routes: OpenAI's `response_format`, vLLM's `structured_outputs` and its
    older `guided_*` fields (one of them per request)."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: Literal["xgrammar", "auto"] | None = None


class _ImageOptions(BaseModel):
    """vLLM-Omni's image options (images route; chat completions on an image model)."""

    size: str | None = None
    height: int | None = Field(None, gt=0)
    width: int | None = Field(None, gt=0)
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = Field(None, ge=0)
    negative_prompt: str | None = None
    num_outputs_per_prompt: int | None = Field(None, ge=1)  # chat: images in each choice; images: the same as n


IMAGE_OPTIONS = tuple(_ImageOptions.model_fields)


class ChatCompletionRequest(_Sampling, _Constrained, _ImageOptions):
    refused = field_policy.CHAT
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def image_options(self) -> dict[str, Any]:
        """The image options that were sent: they make a request without `model` mean the image model."""
        return {name: getattr(self, name) for name in IMAGE_OPTIONS if getattr(self, name) is not None}


class CompletionRequest(_Sampling, _Constrained):
    refused = field_policy.COMPLETIONS
    # A string, strings, token ids, or lists of token ids: one choice per prompt.
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: score the prompt only
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ImageGenerationRequest(_Route, _ImageOptions):
    refused = field_policy.IMAGES
    model: str | None = ModelField
    prompt: str
    n: int = Field(1, ge=1)
    response_format: Literal["b64_json", "url"] = "b64_json"
    seed: int | None = Field(None, ge=0)
    lora: LoRAField | None = None
    lora_scale: float | None = None


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
