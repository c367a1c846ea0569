"""The model side of generation: load the causal LM, size its KV cache, run prefill and decode forwards.

Each sequence owns a slot of the `SlotKVCache`; prefill writes new prompts into their slots, decode appends one
token per slot. Each row carries its own adapters (`RowLoRA`); the rows of a forward become one `LoRABatch` that
the patched model's `LoRAContext` runs (rows without an adapter run the exact base computation). On CUDA the
decode step replays CUDA graphs captured at load per batch-size bucket (`GraphedLoRAForward`); elsewhere, or with
`enforce_eager`, it runs eagerly.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from backends.llm.cuda_graphs import GraphedLoRAForward
from backends.llm.kv_cache import KVShape, MiB, SlotKVCache, decode_mask_into, plan_num_slots, prefill_mask
from backends.lora.adapters.targets import llm_targets, packed_parts, parse_target_modules
from backends.lora.layers.context import LoRAContext
from backends.lora.layers.linear import patch_model
from backends.lora.manager.config import LoRAServingConfig
from backends.lora.ops.batch import LoRABatch, RowLoRA
from backends.model_params import param_bool, param_float, param_int, param_str

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# On CPU, without an explicit budget: at most this, and at most half the memory available at load.
CPU_KV_CACHE_BYTES = 4 << 30
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass(frozen=True)
class RunnerSettings:
    dtype: str = "auto"  # auto = bfloat16 on a GPU that has it (else float16), float32 on CPU
    max_model_len: int | None = None  # None = the model's max_position_embeddings
    max_num_seqs: int = 32  # KV slots wanted; the budget may allow fewer
    kv_cache_memory_bytes: int | None = None  # None: CPU min(4 GiB, half the free RAM); GPU see below
    gpu_memory_utilization: float = 0.9  # share of the GPU this model may fill (weights, KV, graphs)
    enforce_eager: bool = False  # no CUDA graphs
    cuda_graphs: bool | None = None  # None = on CUDA unless enforce_eager; True forces capture (tests)
    max_graph_batch: int = 64  # largest captured decode batch; larger batches run eagerly

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> "RunnerSettings":
        """Model parameters of the same names (empty = default)."""
        d = cls()
        settings = cls(
            dtype=param_str(params, "dtype", d.dtype),
            max_model_len=param_int(params, "max_model_len", d.max_model_len),
            max_num_seqs=param_int(params, "max_num_seqs", d.max_num_seqs),
            kv_cache_memory_bytes=param_int(params, "kv_cache_memory_bytes", d.kv_cache_memory_bytes),
            gpu_memory_utilization=param_float(params, "gpu_memory_utilization", d.gpu_memory_utilization),
            enforce_eager=param_bool(params, "enforce_eager", d.enforce_eager),
            max_graph_batch=param_int(params, "max_graph_batch", d.max_graph_batch),
        )
        if settings.max_num_seqs < 1:
            raise ValueError(f"model parameter 'max_num_seqs' must be >= 1, got {settings.max_num_seqs}")
        if settings.kv_cache_memory_bytes is not None and settings.kv_cache_memory_bytes < 1:
            raise ValueError(f"model parameter 'kv_cache_memory_bytes' must be positive, got "
                             f"{settings.kv_cache_memory_bytes}")
        if not 0 < settings.gpu_memory_utilization <= 1:
            raise ValueError(f"model parameter 'gpu_memory_utilization' must be in (0, 1], got "
                             f"{settings.gpu_memory_utilization}")
        return settings


@dataclass(frozen=True)
class AttentionLayout:
    """The masks a model's attention layers take: layer type -> sliding window (None = full causal).

    Hybrid models (Gemma-2/3, Qwen2/3 with `layer_types`) take a dict of masks keyed by layer type; Mistral and
    Phi-3 apply their `sliding_window` to every layer through one mask. Transformers uses a 4-D mask as given, so
    the window must be in the mask we build, or sliding layers would attend over the whole context."""

    windows: dict[str, int | None]
    per_layer_type: bool

    @classmethod
    def of(cls, config, max_model_len: int, where: str, reads_window: bool = True) -> "AttentionLayout":
        """`reads_window`: the model's code applies `sliding_window` at all. Configs carry the key for models that
        ignore it (a Llama converted from Qwen2: "sliding_window": 4096, "use_sliding_window": false)."""
        types = set(getattr(config, "layer_types", None) or [])
        unsupported = types - {"full_attention", "sliding_attention"}
        if unsupported:
            raise ValueError(f"{where}: attention layer types {sorted(unsupported)} are not supported; only full and "
                             f"sliding-window attention layers are")
        window = getattr(config, "sliding_window", None)
        if not reads_window or getattr(config, "use_sliding_window", True) is False:
            return cls({"full_attention": None}, per_layer_type=False)
        if window is not None and int(window) >= max_model_len:
            window = None  # a window as long as the context is full attention
        if not types:
            return cls({"full_attention": window}, per_layer_type=False)
        return cls({t: window if t == "sliding_attention" else None for t in types}, per_layer_type=True)

    def build(self, make: Callable[[int | None], torch.Tensor]):
        """The model's `attention_mask` argument from `make(window)`; one mask per distinct window."""
        made: dict[int | None, torch.Tensor] = {}
        for w in self.windows.values():
            if w not in made:
                made[w] = make(w)
        masks = {t: made[w] for t, w in self.windows.items()}
        return masks if self.per_layer_type else next(iter(masks.values()))


def cache_kwarg(model) -> str:
    """The forward's KV-cache argument: `cache` in transformers >= 5.2x, `past_key_values` before (the GPU check
    machine's 5.17)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The `dtype` model parameter on this device; a clear ValueError for unknown or unsupported ones."""
    key = (name or "auto").strip().lower()
    key = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(key, key)
    if key == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if key not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    if device.type == "cpu" and key == "float16":
        raise ValueError("dtype float16 is not supported on CPU (slow and inexact there); use float32 or bfloat16")
    if device.type == "cuda" and key == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"dtype bfloat16 is not supported by {torch.cuda.get_device_name(device)}; use float16")
    return DTYPES[key]


class ModelRunner:
    def __init__(self, model_path: str | Path, device: str = "cpu",
                 lora: LoRAServingConfig | None = LoRAServingConfig(), settings: RunnerSettings = RunnerSettings()):
        """`lora`: its slots, rank and target modules patch the model (None: no LoRA)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"no model at {path} (config.json missing); run scripts/setup to convert the default model, "
                f"or point the 'model_path' parameter / MULTILORA_LLM_MODEL_PATH at a Hugging Face model folder"
            )
        started = time.monotonic()
        self.device = torch.device(device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)  # engine thread: detokenising
        # Triton's execute thread encodes prompts while the engine thread decodes: a fast tokenizer shared between
        # threads can fail with "Already borrowed", so each side has its own.
        self._prompt_tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        config = self.model.config.get_text_config(decoder=True)
        self.model_path = path
        model_len = int(getattr(config, "max_position_embeddings", 2048))
        if settings.max_model_len is not None and not 1 <= settings.max_model_len <= model_len:
            raise ValueError(f"max_model_len {settings.max_model_len} must be in 1..{model_len} (the model's "
                             f"max_position_embeddings)")
        self.max_model_len = settings.max_model_len or model_len
        # A modeling module that never builds a sliding-window mask ignores the config's window.
        reads_window = hasattr(sys.modules[type(self.model).__module__], "create_sliding_window_causal_mask")
        self.attention = AttentionLayout.of(config, self.max_model_len, str(path), reads_window)
        self.eos_token_ids = self._eos_ids()
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._cache_kwarg = cache_kwarg(self.model)
        self.lora: LoRAContext | None = None
        if lora is not None:
            self.lora = self._patch(lora)
        loaded = time.monotonic() - started
        self.kv = self._allocate_kv(KVShape.of(config, self.dtype), settings)
        self.graphs: GraphedLoRAForward | None = None
        if settings.cuda_graphs or (settings.cuda_graphs is None and self.device.type == "cuda"
                                    and not settings.enforce_eager):
            self.graphs = self._capture(settings.max_graph_batch)
        log.info(
            "loaded %s on %s (%s) in %.1f s: context %d, KV cache %d slots (%.0f MiB), decode %s, eos %s, LoRA %s",
            path, self.device, str(self.dtype).removeprefix("torch."), loaded, self.max_model_len,
            self.kv.num_slots, self.kv.nbytes / MiB,
            f"CUDA graphs for batches {self.graphs.buckets}" if self.graphs else "eager",
            sorted(self.eos_token_ids), f"{lora.max_loras} slots x rank {lora.max_lora_rank}" if lora else "off",
        )

    def _patch(self, lora: LoRAServingConfig) -> LoRAContext:
        targets = llm_targets(self.model, parse_target_modules(lora.target_modules))
        if not any(targets(n, m) for n, m in self.model.named_modules()):
            linears = [n for n, m in self.model.named_modules() if isinstance(m, torch.nn.Linear)]
            if lora.target_modules is None:  # e.g. GPT-2, whose projections are transformers' Conv1D
                kinds = sorted({type(m).__name__ for m in self.model.modules() if not list(m.children())})
                raise ValueError(f"{self.model_path}: {type(self.model).__name__} has no nn.Linear in its decoder "
                                 f"blocks to put LoRA on (its layers are {', '.join(kinds)})")
            raise ValueError(f"{self.model_path}: lora_target_modules {lora.target_modules!r} match no linear layer of "
                             f"{type(self.model).__name__} (its linears look like {linears[:3]})")
        context = patch_model(self.model, lora.max_loras, lora.max_lora_rank, targets, model_name=str(self.model_path))
        context.packed = packed_parts(self.model, context.layers)
        return context

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return ids

    def _allocate_kv(self, shape: KVShape, settings: RunnerSettings) -> SlotKVCache:
        need = settings.max_num_seqs * self.max_model_len * shape.bytes_per_token
        budget = settings.kv_cache_memory_bytes
        if budget is None and self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            # What this process may still take under the utilisation cap, less headroom for activations and graphs.
            allowed = int(total * settings.gpu_memory_utilization) - (total - free)
            budget = min(need, max(0, allowed - max(1 << 30, total // 20)))
        elif budget is None:
            import psutil  # not on every GPU image; only the CPU default needs it

            budget = min(need, CPU_KV_CACHE_BYTES, psutil.virtual_memory().available // 2)
        slots = plan_num_slots(shape, self.max_model_len, settings.max_num_seqs, budget)
        if slots < settings.max_num_seqs:
            log.warning("the KV-cache budget (%.0f MiB) holds %d sequences of %d tokens, fewer than max_num_seqs=%d; "
                        "more requests wait", budget / MiB, slots, self.max_model_len, settings.max_num_seqs)
        return SlotKVCache(shape, slots, self.max_model_len, self.device)

    def _on_device(self):
        """Kernels, graph capture and streams use the thread's current CUDA device: make it ours (an instance on
        GPU N > 0, or a runner built on another thread than the one that calls it)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def encode(self, text: str) -> list[int]:
        """Prompt text -> ids, on Triton's execute thread. No special tokens added: chat templates carry them."""
        return self._prompt_tokenizer(text, add_special_tokens=False).input_ids

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().out_features

    @property
    def logits_bytes_per_token(self) -> int:
        """One position's logits, as a prefill that scores prompts keeps them."""
        return self.vocab_size * torch.empty((), dtype=self.dtype).element_size()

    def _forward(self, rows_lora: Sequence[RowLoRA], all_positions: bool = False, **kwargs) -> torch.Tensor:
        if self.lora is None or not any(rows_lora):
            logits = self.model(**kwargs).logits
        else:
            with self.lora.use(LoRABatch.from_rows(rows_lora)):
                logits = self.model(**kwargs).logits
        return logits if all_positions else logits[:, -1, :]

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[list[int]], slots: Sequence[int], rows_lora: Sequence[RowLoRA],
                all_positions: bool = False) -> torch.Tensor:
        """Prompts of new sequences, left-padded into one forward, their K/V written to `slots`: last-position
        logits [n, vocab], or with `all_positions` every position's [n, width, vocab] (prompt scoring)."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        positions = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            positions[row, width - len(prompt):] = torch.arange(len(prompt))
        lengths = [len(p) for p in prompts]
        with self._on_device():
            return self._forward(
                rows_lora, all_positions, input_ids=ids.to(self.device), position_ids=positions.to(self.device),
                attention_mask=self.attention.build(lambda w: prefill_mask(lengths, width, self.dtype, self.device, w)),
                use_cache=True, logits_to_keep=0 if all_positions else 1,
                **{self._cache_kwarg: self.kv.prefill_view(slots, lengths, width)},
            )

    @torch.inference_mode()
    def decode(self, slots: Sequence[int], token_ids: Sequence[int], positions: Sequence[int],
               rows_lora: Sequence[RowLoRA]) -> torch.Tensor:
        """One new token per running sequence (in its KV slot, at column `positions[i]` = tokens it has cached).
        Logits [len(slots), vocab] in the order given."""
        with self._on_device():
            return self._decode(slots, token_ids, positions, rows_lora)

    def _decode(self, slots, token_ids, positions, rows_lora) -> torch.Tensor:
        rows = max(slots) + 1  # the slot prefix: row r = slot r; free slots inside it are dummy rows
        # Captured graphs hold one adapter per row: a step with a LoRA stack runs eagerly.
        graphed = (self.graphs is not None and rows <= self.graphs.buckets[-1]
                   and all(len(r.pairs) <= 1 for r in rows_lora))
        if not graphed and rows - len(slots) > len(slots) // 8:  # sparse: run the live rows, gather their K/V
            inputs = self._decode_inputs(token_ids, positions)
            return self._decode_forward(inputs, max(positions) + 1, rows_lora,
                                        torch.tensor(list(slots), device=self.device))
        ids = [self.pad_token_id] * rows
        pos = [0] * rows
        lora = [RowLoRA()] * rows
        for slot, token, p, row_lora in zip(slots, token_ids, positions, rows_lora):
            ids[slot], pos[slot], lora[slot] = token, p, row_lora
        if graphed:
            logits = self.graphs(self._decode_inputs(ids, pos, "cpu"), LoRABatch.from_rows(lora))
        else:  # attention reads only the columns some row has filled
            logits = self._decode_forward(self._decode_inputs(ids, pos), max(pos) + 1, lora)
        return logits.index_select(0, torch.tensor(list(slots), device=logits.device))

    def _decode_inputs(self, ids: Sequence[int], positions: Sequence[int], device=None) -> dict[str, torch.Tensor]:
        device = device or self.device
        return {"input_ids": torch.tensor(ids, dtype=torch.long, device=device).view(-1, 1),
                "position_ids": torch.tensor(positions, dtype=torch.long, device=device).view(-1, 1)}

    def _decode_forward(self, inputs: dict[str, torch.Tensor], width: int, lora: Sequence[RowLoRA] | None = None,
                        slots: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step; row i is slot i, or slots[i] when given. With `width` = max_model_len and no `lora`
        (LoRA from the context's fixed row buffers) every shape is static: the form CUDA graphs capture."""
        positions = inputs["position_ids"]
        rows = positions.shape[0]
        mask = self.attention.build(lambda w: decode_mask_into(
            torch.empty(rows, 1, 1, width, dtype=self.dtype, device=self.device), positions, w))
        cache = self.kv.decode_view(positions.view(-1), width, slots)
        kwargs = {"input_ids": inputs["input_ids"], "position_ids": positions, "attention_mask": mask,
                  "use_cache": True, self._cache_kwarg: cache}
        if lora is None:  # graph capture: LoRA rows come from the context's static buffers
            return self.model(**kwargs).logits[:, -1, :]
        return self._forward(lora, **kwargs)

    def _capture(self, max_batch: int) -> GraphedLoRAForward | None:
        buckets = [b for b in GRAPH_BUCKETS if b <= min(max_batch, self.kv.num_slots)]
        if self.kv.num_slots not in buckets and self.kv.num_slots <= max_batch:
            buckets.append(self.kv.num_slots)
        started = time.monotonic()
        before = torch.cuda.memory_reserved(self.device) if self.device.type == "cuda" else 0
        try:
            with self._on_device():
                graphs = GraphedLoRAForward(
                    self.lora, self.device, lambda inputs: self._decode_forward(inputs, self.max_model_len),
                    lambda n: {"input_ids": torch.full((n, 1), self.pad_token_id, dtype=torch.long,
                                                       device=self.device),
                               "position_ids": torch.zeros((n, 1), dtype=torch.long, device=self.device)},
                    buckets=buckets,
                )
        except Exception as exc:  # serving eagerly is slower, never wrong
            log.warning("CUDA-graph capture failed (%s: %s); the decode step runs eagerly", type(exc).__name__, exc)
            return None
        after = torch.cuda.memory_reserved(self.device) if self.device.type == "cuda" else 0
        log.info("captured decode CUDA graphs for batches %s (%s) in %.1f s, %.0f MiB", buckets,
                 "with and without LoRA" if self.lora else "base model", time.monotonic() - started,
                 (after - before) / MiB)
        return graphs
