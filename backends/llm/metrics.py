"""Engine counters published through the Python backend's custom metrics API (Triton's metrics port)."""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from backends.llm.kv_cache import PagedKVCache
from backends.lora.manager.cache import LoRACache
from backends.lora.manager.metrics import TritonLoRAMetrics
from backends.lora.manager.request import AdapterRef
from backends.lora.manager.selector import AdapterSelector

_FINISHED = "multilora_llm_requests_finished_total"
# attribute, series name, kind, help. The KV cache's shape is fixed at load; a gateway reads it as vLLM's
# cache_config_info.
_SERIES = (
    ("_prompt_tokens", "multilora_llm_prompt_tokens_total", "counter", "Prompt tokens processed"),
    ("_generation_tokens", "multilora_llm_generation_tokens_total", "counter", "Tokens generated"),
    ("_waiting", "multilora_llm_num_requests_waiting", "gauge", "Requests queued, not started"),
    ("_running", "multilora_llm_num_requests_running", "gauge", "Requests being generated"),
    ("_kv_usage", "multilora_llm_kv_cache_usage_ratio", "gauge", "KV-cache blocks held by running sequences over "
     "the blocks allocated at load (1 = full: new requests wait; cached unreferenced blocks count as free)"),
    ("_kv_blocks", "multilora_llm_kv_cache_blocks", "gauge", "KV-cache blocks allocated at load"),
    ("_kv_block_size", "multilora_llm_kv_cache_block_size", "gauge", "Tokens per KV-cache block"),
    ("_prefix_caching", "multilora_llm_prefix_caching_enabled", "gauge", "1 when the prefix cache is on"),
    ("_prefix_queries", "multilora_llm_prefix_cache_queries_total", "counter",
     "Prompt tokens looked up in the prefix cache"),
    ("_prefix_hits", "multilora_llm_prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache "
     "(computed with the same tokens before them and the same adapter content and scales)"),
    ("_preemptions", "multilora_llm_num_preemptions_total", "counter", "Running sequences preempted because the KV "
     "cache was full (recomputed when readmitted)"),
    ("_grammar_compiles", "multilora_llm_grammar_compiles_total", "counter",
     "Structured-output constraints compiled (cache misses)"),
    ("_grammar_seconds", "multilora_llm_grammar_compile_seconds_total", "counter",
     "Seconds spent compiling structured-output constraints (on the compile thread, not the engine's)"),
    ("_grammar_hits", "multilora_llm_grammar_cache_hits_total", "counter",
     "Structured-output constraints found compiled in the cache"),
)


class TritonEngineMetrics:
    """Implements `EngineObserver`; names follow Prometheus conventions, labelled by Triton model name."""

    def __init__(self, model_name: str):
        self._labels = {"model": model_name}
        # Triton invalidates a Metric once its MetricFamily is garbage-collected: keep the families, here only.
        self._families: dict[str, object] = {}
        self._family(_FINISHED, "Finished generation requests by finish reason (stop, length, abort)",
                     pb_utils.MetricFamily.COUNTER)
        self._finished: dict[str, object] = {}
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        for attr, name, kind, description in _SERIES:
            setattr(self, attr, self._metric(name, description, counter if kind == "counter" else gauge))
        self._lora = TritonLoRAMetrics(model_name)

    def _family(self, name: str, description: str, kind):
        family = self._families[name] = pb_utils.MetricFamily(name=name, description=description, kind=kind)
        return family

    def close(self) -> None:
        """Delete this model's series (see `TritonLoRAMetrics.close`); from `finalize`, the engine stopped."""
        self._lora.close()
        self._families.clear()

    def _metric(self, name: str, description: str, kind):
        return self._family(name, description, kind).Metric(labels=self._labels)

    def on_finished(self, finish_reason: str, num_input_tokens: int, num_output_tokens: int) -> None:
        metric = self._finished.get(finish_reason)
        if metric is None:
            metric = self._families[_FINISHED].Metric(labels={**self._labels, "finish_reason": finish_reason})
            self._finished[finish_reason] = metric
        metric.increment(1)
        self._prompt_tokens.increment(num_input_tokens)

    def on_tokens(self, count: int) -> None:
        self._generation_tokens.increment(count)

    def on_queue(self, waiting: int, running: int, kv_usage: float) -> None:
        self._waiting.set(waiting)
        self._running.set(running)
        self._kv_usage.set(kv_usage)

    def on_prefix_cache(self, queried_tokens: int, hit_tokens: int) -> None:
        self._prefix_queries.increment(queried_tokens)
        if hit_tokens:
            self._prefix_hits.increment(hit_tokens)

    def on_preemption(self) -> None:
        self._preemptions.increment(1)

    def on_grammar(self, seconds: float | None) -> None:
        if seconds is None:
            self._grammar_hits.increment(1)
        else:
            self._grammar_compiles.increment(1)
            self._grammar_seconds.increment(seconds)

    def on_lora(self, cache: LoRACache, running: list[AdapterRef], waiting: list[AdapterRef], slot_wait: float,
                rotations: int) -> None:
        self._lora.report(cache, running, waiting)
        self._lora.report_admission(slot_wait, rotations)

    def on_started(self, kv: PagedKVCache, selector: AdapterSelector | None) -> None:
        """What a router reads before any traffic: the KV cache's shape and the static (pinned) adapters."""
        self._kv_blocks.set(kv.num_blocks)
        self._kv_block_size.set(kv.block_size)
        self._prefix_caching.set(1 if kv.pool.prefix_caching else 0)
        if selector is not None:
            self._lora.start(selector.registry.static, selector.cache)

    def note_adapters(self, refs: list[AdapterRef]) -> None:
        self._lora.note(refs)
