"""The model side of generation: load the causal LM, size its paged KV cache, run one forward per engine step.

A step (`ModelRunner.step`) runs every scheduled row at once: decode rows (one token each) and prefill chunks
(runs of a prompt's tokens), flattened into one `[1, T]` input with no padding; attention reads and writes the
paged cache through each row's block table (`paged_attention`). Each row carries its own adapters (`RowLoRA`); the
step's rows become one `LoRABatch` of token rows that the patched model's `LoRAContext` runs (rows without an
adapter run the exact base computation). On CUDA a step of decode rows only replays a CUDA graph captured at load
per batch-size bucket (`GraphedLoRAForward`); elsewhere, or with `enforce_eager`, it runs eagerly.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from backends.llm.cuda_graphs import GraphedLoRAForward
from backends.llm.kv_cache import DEFAULT_BLOCK_SIZE, KVShape, MiB, PagedKVCache, plan_num_blocks
from backends.llm.paged_attention import ATTENTION, Chunk, StepLayout
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
    dtype: str = "auto"  # auto = bfloat16 on a GPU or CPU that has it (GPU else float16, CPU else float32)
    max_model_len: int | None = None  # None = the model's max_position_embeddings
    max_num_seqs: int = 32  # running sequences at most (the default KV budget is sized for this many full ones)
    kv_cache_memory_bytes: int | None = None  # None: CPU min(4 GiB, half the free RAM); GPU see below
    block_size: int = DEFAULT_BLOCK_SIZE  # tokens per KV block
    enable_prefix_caching: bool = True
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
            block_size=param_int(params, "block_size", d.block_size),
            enable_prefix_caching=param_bool(params, "enable_prefix_caching", d.enable_prefix_caching),
            gpu_memory_utilization=param_float(params, "gpu_memory_utilization", d.gpu_memory_utilization),
            enforce_eager=param_bool(params, "enforce_eager", d.enforce_eager),
            max_graph_batch=param_int(params, "max_graph_batch", d.max_graph_batch),
        )
        if not 1 <= settings.block_size <= 1024:
            raise ValueError(f"model parameter 'block_size' must be in 1..1024, got {settings.block_size}")
        if settings.max_num_seqs < 1:
            raise ValueError(f"model parameter 'max_num_seqs' must be >= 1, got {settings.max_num_seqs}")
        if settings.kv_cache_memory_bytes is not None and settings.kv_cache_memory_bytes < 1:
            raise ValueError(f"model parameter 'kv_cache_memory_bytes' must be positive, got "
                             f"{settings.kv_cache_memory_bytes}")
        if not 0 < settings.gpu_memory_utilization <= 1:
            raise ValueError(f"model parameter 'gpu_memory_utilization' must be in (0, 1], got "
                             f"{settings.gpu_memory_utilization}")
        return settings


def check_layer_types(config, where: str) -> None:
    """Full and sliding-window attention layers are served (each layer passes its own window to the attention
    function); other layer types (linear, chunked attention) are refused naming them."""
    types = set(getattr(config, "layer_types", None) or [])
    unsupported = types - {"full_attention", "sliding_attention"}
    if unsupported:
        raise ValueError(f"{where}: attention layer types {sorted(unsupported)} are not supported; only full and "
                         f"sliding-window attention layers are")


@dataclass(frozen=True)
class StepRow:
    """One sequence's part of an engine step."""

    tokens: Sequence[int]  # fed this step: its next uncached tokens (one while decoding)
    start: int  # position of tokens[0] = tokens already in its blocks
    blocks: Sequence[int]  # its block table, covering start + len(tokens) tokens
    lora: RowLoRA = RowLoRA()
    logits: str = "last"  # "last", "all" (every fed position: prompt scoring) or "none" (a chunk mid-prompt)


def cpu_has_bf16() -> bool:
    """The CPU computes in bfloat16 natively (AVX512-BF16 or AMX): there bf16 matmuls run about twice as fast as
    float32 (measured here, AVX512-BF16: SmolLM2 prefill 0.53 -> 0.26 s, a 16-row decode 90 -> 50 ms)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: keep float32
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The `dtype` model parameter on this device; a clear ValueError for unknown or unsupported ones."""
    key = (name or "auto").strip().lower()
    key = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(key, key)
    if key == "auto":
        if device.type != "cuda":
            return torch.bfloat16 if cpu_has_bf16() else torch.float32
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
        check_layer_types(config, str(path))
        self.model.set_attn_implementation(ATTENTION)
        self._no_mask = torch.zeros(1, 1, 1, 1, dtype=self.dtype, device=self.device)  # 4-D: transformers builds none
        self.eos_token_ids = self._eos_ids()
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.max_num_seqs = settings.max_num_seqs
        self.lora: LoRAContext | None = None
        if lora is not None:
            self.lora = self._patch(lora)
        loaded = time.monotonic() - started
        self.kv = self._allocate_kv(KVShape.of(config, self.dtype), settings)
        self._graph_tables = self.kv.blocks_for(self.max_model_len)  # block-table width of the fixed-shape step
        self.graphs: GraphedLoRAForward | None = None
        if settings.cuda_graphs or (settings.cuda_graphs is None and self.device.type == "cuda"
                                    and not settings.enforce_eager):
            self.graphs = self._capture(settings.max_graph_batch)
        log.info(
            "loaded %s on %s (%s) in %.1f s: context %d, KV cache %d blocks of %d tokens (%.0f MiB, prefix caching "
            "%s), decode %s, eos %s, LoRA %s",
            path, self.device, str(self.dtype).removeprefix("torch."), loaded, self.max_model_len,
            self.kv.num_blocks, self.kv.block_size, self.kv.nbytes / MiB,
            "on" if settings.enable_prefix_caching else "off",
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

    def _allocate_kv(self, shape: KVShape, settings: RunnerSettings) -> PagedKVCache:
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
        blocks = plan_num_blocks(shape, settings.block_size, budget)
        kv = PagedKVCache(shape, blocks, settings.block_size, self.device, settings.enable_prefix_caching)
        if kv.num_tokens < self.max_model_len:
            log.warning("the KV-cache budget (%.1f MiB) holds %d tokens, fewer than max_model_len=%d: requests "
                        "needing more are refused", budget / MiB, kv.num_tokens, self.max_model_len)
        return kv

    @contextlib.contextmanager
    def stock_attention(self):
        """transformers' own SDPA attention on the served model meanwhile, for references (`generate`, a plain
        forward); the engine's steps need the paged attention back."""
        self.model.set_attn_implementation("sdpa")
        try:
            yield self.model
        finally:
            self.model.set_attn_implementation(ATTENTION)

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

    def _forward(self, lora: LoRABatch | None, **kwargs) -> torch.Tensor:
        kwargs.update(attention_mask=self._no_mask, use_cache=False)
        if lora is None or lora.empty:
            return self.model(**kwargs).logits[0]
        with self.lora.use(lora):
            return self.model(**kwargs).logits[0]

    @torch.inference_mode()
    def step(self, rows: Sequence[StepRow]) -> list[torch.Tensor | None]:
        """One forward over every row's tokens (decode rows and prefill chunks together), their keys/values written
        into their blocks. Per row: last-position logits [vocab], every position's [len, vocab] ("all"), or None."""
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].tokens) != 1)  # one-token rows first (stable)
        ordered = [rows[i] for i in order]
        with self._on_device():
            graphed = (self.graphs is not None and len(ordered) <= self.graphs.buckets[-1]
                       and all(len(r.tokens) == 1 and r.logits == "last" and len(r.lora.pairs) <= 1 for r in ordered))
            out = self._graphed(ordered) if graphed else self._eager(ordered)
        result: list[torch.Tensor | None] = [None] * len(rows)
        for j, i in enumerate(order):
            result[i] = out[j]
        return result

    def _pool_rows(self, blocks: Sequence[int], count: int) -> list[int]:
        bs = self.kv.block_size
        return [blocks[q // bs] * bs + q % bs for q in range(count)]

    def _eager(self, rows: Sequence[StepRow]) -> list[torch.Tensor | None]:
        bs = self.kv.block_size
        ids, positions, write, keep, spans = [], [], [], [], []
        singles = [r for r in rows if len(r.tokens) == 1]
        chunks = []
        for r in rows:
            offset, n = len(ids), len(r.tokens)
            ids += r.tokens
            positions += range(r.start, r.start + n)
            write += [r.blocks[q // bs] * bs + q % bs for q in range(r.start, r.start + n)]
            if n > 1:
                chunks.append(Chunk(offset, n, r.start, torch.tensor(self._pool_rows(r.blocks, r.start + n),
                                                                     device=self.device)))
            spans.append((len(keep), r.logits))
            keep += [] if r.logits == "none" else [offset + n - 1] if r.logits == "last" else range(offset, offset + n)
        device = self.device
        tables = pos = None
        width = None
        if singles:
            most = max(len(r.blocks) for r in singles)
            tables = torch.tensor([list(r.blocks) + [0] * (most - len(r.blocks)) for r in singles], device=device)
            pos = torch.tensor([r.start for r in singles], device=device)
            width = max(r.start for r in singles) + 1
        layout = StepLayout(self.kv, torch.tensor(write, device=device), tables, pos, chunks, width)
        lora = LoRABatch.from_rows([r.lora for r in rows], [len(r.tokens) for r in rows]) if self.lora else None
        logits = self._forward(lora, input_ids=torch.tensor([ids], device=device),
                               position_ids=torch.tensor([positions], device=device), kv_layout=layout,
                               logits_to_keep=torch.tensor(keep, dtype=torch.long, device=device))
        out: list[torch.Tensor | None] = []
        for r, (at, kind) in zip(rows, spans):
            out.append(None if kind == "none" else logits[at] if kind == "last" else logits[at:at + len(r.tokens)])
        return out

    def _graphed(self, rows: Sequence[StepRow]) -> list[torch.Tensor]:
        bs, width = self.kv.block_size, self._graph_tables
        tables = [list(r.blocks) + [0] * (width - len(r.blocks)) for r in rows]
        inputs = {"input_ids": torch.tensor([r.tokens[0] for r in rows]),
                  "position_ids": torch.tensor([r.start for r in rows]),
                  "write_idx": torch.tensor([r.blocks[r.start // bs] * bs + r.start % bs for r in rows]),
                  "tables": torch.tensor(tables)}
        logits = self.graphs(inputs, LoRABatch.from_rows([r.lora for r in rows]))
        return list(logits.clone())

    def _graph_forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The decode step in fixed shapes: N one-token rows, each attending over `max_model_len` pool rows through
        its block table (what CUDA graphs capture; the LoRA rows come from the context's fixed buffers)."""
        layout = StepLayout(self.kv, inputs["write_idx"], inputs["tables"], inputs["position_ids"],
                            width=self._graph_tables * self.kv.block_size)
        layout.begin()
        return self.model(input_ids=inputs["input_ids"].view(1, -1), position_ids=inputs["position_ids"].view(1, -1),
                          attention_mask=self._no_mask, use_cache=False, kv_layout=layout).logits[0]

    def _capture(self, max_batch: int) -> GraphedLoRAForward | None:
        buckets = [b for b in GRAPH_BUCKETS if b <= min(max_batch, self.max_num_seqs)]
        if self.max_num_seqs not in buckets and self.max_num_seqs <= max_batch:
            buckets.append(self.max_num_seqs)
        started = time.monotonic()
        before = torch.cuda.memory_reserved(self.device) if self.device.type == "cuda" else 0
        device = self.device
        try:
            with self._on_device():
                graphs = GraphedLoRAForward(
                    self.lora, device, self._graph_forward,
                    lambda n: {"input_ids": torch.full((n,), self.pad_token_id, dtype=torch.long, device=device),
                               "position_ids": torch.zeros(n, dtype=torch.long, device=device),
                               "write_idx": torch.full((n,), self.kv.trash_row, dtype=torch.long, device=device),
                               "tables": torch.zeros(n, self._graph_tables, dtype=torch.long, device=device)},
                    buckets=buckets, pad_values={"input_ids": self.pad_token_id, "write_idx": self.kv.trash_row},
                )
        except Exception as exc:  # serving eagerly is slower, never wrong
            log.warning("CUDA-graph capture failed (%s: %s); the decode step runs eagerly", type(exc).__name__, exc)
            return None
        after = torch.cuda.memory_reserved(self.device) if self.device.type == "cuda" else 0
        log.info("captured decode CUDA graphs for batches %s (%s) in %.1f s, %.0f MiB", buckets,
                 "with and without LoRA" if self.lora else "base model", time.monotonic() - started,
                 (after - before) / MiB)
        return graphs
