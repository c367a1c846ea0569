"""Offline inference: the serving engines in-process, without tritonserver (vLLM's `LLM` / vLLM-Omni's offline
examples). Same engines, caches, LoRA ops and validation as the Triton models, so the same answers."""

from backends.offline.common import LoRA
from backends.offline.image import ImageGenerator
from backends.offline.text import TextGenerator, TextOutput

__all__ = ["ImageGenerator", "LoRA", "TextGenerator", "TextOutput"]
