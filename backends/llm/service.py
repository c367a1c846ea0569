"""An LLM engine with its LoRA stack, built from the `llm` model's parameters (config.pbtxt names, string values):
the Triton model and the offline `TextGenerator` build it the same way, so they give the same answers."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from backends.llm.engine import EngineObserver, LLMEngine
from backends.llm.runner import ModelRunner, RunnerSettings
from backends.llm.scheduler import SchedulerLimits
from backends.lora.manager.config import LoRAServingConfig
from backends.lora.manager.selector import AdapterSelector
from backends.model_params import param_int, param_str
from backends.settings import default_llm_model_path

log = logging.getLogger(__name__)


@dataclass
class LLMService:
    model_path: Path
    engine: LLMEngine = field(init=False)
    selector: AdapterSelector | None = None  # None: LoRA disabled (max_loras 0)


def start_llm(params: dict[str, str], device: str = "cpu", observer: EngineObserver | None = None,
              on_dead: Callable[[BaseException], None] | None = None) -> LLMService:
    """Load the model on the engine's thread and return once it serves (load errors are raised here)."""
    service = LLMService(Path(param_str(params, "model_path", None) or default_llm_model_path()).expanduser())
    lora = LoRAServingConfig.from_parameters(params)
    settings = RunnerSettings.from_parameters(params)

    def setup(engine: LLMEngine):  # on the engine thread, which does all torch work
        runner = ModelRunner(service.model_path, device=device, lora=lora if lora.enabled else None,
                             settings=settings)
        if not lora.enabled:
            return runner, None
        service.selector = AdapterSelector.build(runner.lora, lora, prefetch=True)
        return runner, service.selector.cache

    defaults = SchedulerLimits()
    service.engine = LLMEngine(
        setup,
        default_max_tokens=param_int(params, "default_max_tokens", 256),
        observer=observer,
        limits=SchedulerLimits(
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=param_int(params, "max_num_batched_tokens", defaults.max_num_batched_tokens),
        ),
        on_dead=on_dead,
    )
    return service
