"""Which OpenAI and vLLM request fields each route does not honour. Such a field is refused with a 400 naming it
unless it holds a value that changes nothing (`frequency_penalty: 0`, `tools: []`), so that no request "works" with
a result it did not ask for; fields outside both APIs are ignored, as OpenAI-compatible servers do. The README's
field lists are made from these tables (`python -m openai_frontend.field_lists`; a test keeps them equal).

Also here: vLLM-Omni's literal `extra_body` object (its clients send `{"messages": ..., "extra_body": {...}}`),
merged into the body before anything is read from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic_core import PydanticCustomError


@dataclass(frozen=True)
class Refused:
    reason: str
    neutral: tuple = ()  # values accepted because they change nothing (null always is)


_SAMPLING = "this sampling option is not implemented"
_STRUCTURED = ("use response_format, structured_outputs or tools (the deprecated functions API and structural tags "
               "are not implemented)")
_TOKENS = "token-level output options beyond logprobs are not implemented"
_TEMPLATE = "the chat template is the base model's own, applied with a generation prompt"
_ENGINE = "this engine option is not implemented"
_OPENAI = "this OpenAI feature is not available on this server"
_VIDEO = "this server generates images, not videos"


def _table(*groups: tuple[str, dict[str, tuple]]) -> dict[str, Refused]:
    return {name: Refused(reason, neutral) for reason, fields in groups for name, neutral in fields.items()}


_STRUCTURED_FIELDS = {"guided_whitespace_pattern": (), "structural_tag": ()}
_SAMPLING_FIELDS = {"frequency_penalty": (0,), "presence_penalty": (0,), "repetition_penalty": (1,),
                    "length_penalty": (1,), "logit_bias": ({},), "min_p": (0,), "min_tokens": (0,),
                    "use_beam_search": (False,), "best_of": (1,), "stop_token_ids": ([],), "bad_words": ([],),
                    "allowed_token_ids": (), "logits_processors": (), "watermarking": (),
                    "repetition_detection": (), "thinking_token_budget": ()}
_TOKEN_FIELDS = {"prompt_logprobs": (), "logprob_token_ids": (), "include_stop_str_in_output": (False,),
                 "skip_special_tokens": (True,), "spaces_between_special_tokens": (True,),
                 "return_tokens_as_token_ids": (False,), "return_token_ids": (False,),
                 "return_token_offsets": (False,), "return_prompt_text": (False,), "truncate_prompt_tokens": (),
                 "truncation_side": (), "stream_interval": (1,)}
_ENGINE_FIELDS = {"priority": (0,), "request_id": (), "session_id": (), "cache_salt": (), "kv_transfer_params": (),
                  "ec_transfer_params": (), "vllm_xargs": ({},), "mm_payload": ("tensors",),
                  "return_mm_kwargs": (False,), "routed_experts_prompt_start": (0,), "mm_processor_kwargs": ({},),
                  "media_io_kwargs": ({},)}

CHAT = _table(
    (_STRUCTURED, {**_STRUCTURED_FIELDS, "functions": ([],), "function_call": ("none", "auto")}),
    (_SAMPLING, _SAMPLING_FIELDS),
    (_TOKENS, _TOKEN_FIELDS),
    (_TEMPLATE, {"chat_template": (), "chat_template_kwargs": ({},), "documents": (), "echo": (False,),
                 "add_generation_prompt": (True,), "continue_final_message": (False,),
                 "add_special_tokens": (False,)}),
    (_ENGINE, _ENGINE_FIELDS),
    (_OPENAI, {"audio": (), "modalities": (["text"],), "prediction": (), "reasoning_effort": (), "verbosity": (),
               "web_search_options": (), "moderation": (), "store": (False,), "service_tier": ("auto", "default")}),
    (_VIDEO, {"num_frames": (), "guidance_scale_2": (), "fps": ()}),
)

COMPLETIONS = _table(
    (_STRUCTURED, _STRUCTURED_FIELDS),
    (_SAMPLING, _SAMPLING_FIELDS),
    (_TOKENS, _TOKEN_FIELDS),
    ("text prompts are tokenized as they are, without added special tokens", {"add_special_tokens": (False,)}),
    ("fill-in-the-middle is not implemented", {"suffix": ("",)}),
    ("prompts are text or token ids", {"prompt_embeds": ()}),
    (_ENGINE, _ENGINE_FIELDS),
    (_OPENAI, {"store": (False,), "service_tier": ("auto", "default")}),
)

IMAGES = _table(
    ("images are opaque PNGs", {"background": ("auto", "opaque"), "output_format": ("png",),
                                "output_compression": ()}),
    ("images are returned whole", {"stream": (False,), "partial_images": (0,)}),
    (_OPENAI, {"quality": ("auto", "standard"), "style": (), "moderation": ("low",), "complexity": (), "svg": ()}),
    ("the pipeline's memory options are set at load", {"vae_use_slicing": (False,), "vae_use_tiling": (False,)}),
    ("this pipeline option is not implemented", {"generator_device": ("cpu",), "flow_shift": (), "extra_params": ({},),
                                                 "layers": (), "bot_task": (), "system_prompt": (),
                                                 "use_system_prompt": (False,), "infer_align_image_size": (False,)}),
    (_VIDEO, {"num_frames": (), "guidance_scale_2": (), "fps": (), "frame_count": (), "frame_duration_ms": ()}),
)

# OpenAI/vLLM fields accepted with no effect on the result, named so that the README and the tests account for
# every field of both APIs: end-user ids, and cache hints (the prefix cache works without them).
NO_EFFECT = {
    "chat": ("user", "metadata", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
             "prompt_cache_options", "include_reasoning"),
    "completions": ("user",),
    "images": ("user", "safety_identifier"),
}


def _error(param: str, message: str) -> PydanticCustomError:
    # `param` travels in the error's context: the validation handler names it in OpenAI's error shape.
    return PydanticCustomError("unsupported_field", message, {"param": param})


def without_nulls(data: dict) -> dict:
    """null is "not given" for every field (vLLM types its fields optional; a client may send `stream: null`)."""
    return {k: v for k, v in data.items() if v is not None}


def merge_extra_body(data: dict) -> dict:
    """vLLM-Omni's clients send their options as a literal `extra_body` object in the JSON body (the openai SDK's
    `extra_body=` merges them at the top level instead): its keys join the body; a key sent both ways with different
    values is refused rather than one silently winning."""
    if "extra_body" not in data:
        return data
    extra = data["extra_body"]
    merged = {k: v for k, v in data.items() if k != "extra_body"}
    if not isinstance(extra, dict):
        raise _error("extra_body", f"extra_body must be a JSON object of request fields, got {type(extra).__name__}")
    for key, value in without_nulls(extra).items():
        if key in merged and merged[key] != value:
            raise _error(f"extra_body.{key}", f"extra_body.{key} ({json.dumps(value)}) disagrees with {key} "
                                              f"({json.dumps(merged[key])}); send it once")
        merged[key] = value
    return merged


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):  # True == 1 in Python, not in JSON
        return a is b
    return a == b


def _neutral(value, refused: Refused) -> bool:
    return value is None or any(_same(value, v) for v in refused.neutral)


def check_honoured(data: dict, table: dict[str, Refused]) -> None:
    """Refuse the first field of `table` that is set to anything that would change the result."""
    for name, value in data.items():
        refused = table.get(name)
        if refused is not None and not _neutral(value, refused):
            accepted = " or ".join(json.dumps(v) for v in refused.neutral)
            raise _error(name, f"{name} is not supported: {refused.reason}; leave it out"
                               + (f" or send {accepted}" if accepted else ""))
