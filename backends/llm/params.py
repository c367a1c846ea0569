"""Generation request and sampling parameters: parsed, defaulted and validated before anything is queued."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from backends.errors import InvalidArgument
from backends.lora.manager.request import LoRASelection
from backends.structured import Constraint

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20  # OpenAI's limit for top logprobs per position
MAX_STOP_CHARS = 256  # per stop string
# Temperatures below this are greedy (vLLM's _SAMPLING_EPS): dividing logits by 1e-40 overflows to inf and NaN.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 (or below GREEDY_TEMPERATURE) -> greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 -> disabled
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; N: each generated token's logprob and the top N (0..20)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (OpenAI `echo` + `logprobs`)
    ignore_eos: bool = False  # vLLM's: EOS is generated like any token; only max_tokens or a stop string ends it

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


@dataclass
class GenerationRequest:
    request_id: str
    prompt: str
    params: SamplingParams
    stream: bool = False
    prompt_token_ids: list[int] = field(default_factory=list)
    lora: tuple[LoRASelection, ...] = ()  # () = base model; several = a LoRA stack (the sum of their deltas)
    constraint: Constraint | None = None  # structured output: the engine compiles it before queueing the request
    grammar: object | None = None  # its compiled grammar (xgrammar), set by the engine


def build_sampling_params(
    *,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop: list[str] | None,
    default_max_tokens: int,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    ignore_eos: bool | None = None,
) -> SamplingParams:
    """Validate client values (None = not given) and fill defaults; raises InvalidArgument naming the field."""
    for name, value in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
        if value is not None and not 0 <= value <= MAX_LOGPROBS:
            raise InvalidArgument(f"{name} must be between 0 and {MAX_LOGPROBS}, got {value}")
    if max_tokens is None:
        max_tokens = default_max_tokens
    if max_tokens < 0 or (max_tokens == 0 and prompt_logprobs is None):
        raise InvalidArgument(f"max_tokens must be at least 1 (0 only to score the prompt with prompt_logprobs), "
                              f"got {max_tokens}")

    if temperature is None:
        temperature = 1.0
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgument(f"temperature must be a finite number >= 0, got {temperature}")

    if top_p is None:
        top_p = 1.0
    if not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
        raise InvalidArgument(f"top_p must be in (0, 1], got {top_p}")

    if top_k is None:
        top_k = 0
    if top_k < 0:
        raise InvalidArgument(f"top_k must be >= 0 (0 disables it), got {top_k}")

    if seed is not None and not 0 <= seed < 2**63:
        raise InvalidArgument(f"seed must be in [0, 2^63), got {seed}")

    stops = tuple(stop or ())
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stops)}")
    if any(s == "" for s in stops):
        raise InvalidArgument("stop strings must not be empty")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        longest = max(len(s) for s in stops)
        raise InvalidArgument(f"stop strings may have at most {MAX_STOP_CHARS} characters each, got {longest}")

    return SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stops,
        logprobs=logprobs, prompt_logprobs=prompt_logprobs, ignore_eos=bool(ignore_eos),
    )


def check_context_length(num_prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    """vLLM's rule and wording: prompt + completion must fit the context window."""
    if num_prompt_tokens + max_tokens > max_model_len:
        raise InvalidArgument(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the messages, {max_tokens} in the "
            f"completion). Please reduce the length of the messages or completion."
        )
