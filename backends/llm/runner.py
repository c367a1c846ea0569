"""The model side of generation: load the causal LM and tokenizer, run batched prefill and decode forwards.

Sequences of a batch are left-padded into one `KVBatch`; each row carries its own LoRA slot and scale through
the shared `LoRAContext` of the patched model (rows without an adapter run the exact base computation).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from backends.llm.kv_cache import KVBatch, PaddedKVCache
from backends.lora.patch import LoRAContext, patch_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoRASettings:
    max_loras: int = 16  # device slots = distinct adapters in one step
    max_rank: int = 16


@dataclass(frozen=True)
class RowLoRA:
    """The adapter of one batch row: slot -1 = none."""

    slot: int = -1
    scale: float = 0.0


class ModelRunner:
    def __init__(self, model_path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 lora: LoRASettings | None = LoRASettings()):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"no model at {path} (config.json missing); run scripts/setup to convert the default model, "
                f"or point the 'model_path' parameter / MULTILORA_LLM_MODEL_PATH at a Hugging Face model folder"
            )
        started = time.monotonic()
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)  # engine thread: detokenising
        # Triton's execute thread encodes prompts while the engine thread decodes: a fast tokenizer shared between
        # threads can fail with "Already borrowed", so each side has its own.
        self._prompt_tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        config = self.model.config.get_text_config(decoder=True)
        layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
        if layer_types != {"full_attention"}:
            raise ValueError(f"{path}: only full-attention decoder models are supported, this one has {layer_types}")
        self.num_layers = int(config.num_hidden_layers)
        self.model_path = path
        self.max_model_len = int(getattr(config, "max_position_embeddings", 2048))
        self.eos_token_ids = self._eos_ids()
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.lora: LoRAContext | None = None
        if lora is not None:
            self.lora = patch_model(self.model, lora.max_loras, lora.max_rank, model_name=str(path))
        log.info(
            "loaded %s on %s in %.1f s (context %d, eos %s, LoRA %s)",
            path, self.device, time.monotonic() - started, self.max_model_len, sorted(self.eos_token_ids), lora,
        )

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return ids

    def encode(self, text: str) -> list[int]:
        """Prompt text -> ids, on Triton's execute thread. No special tokens added: chat templates carry them."""
        return self._prompt_tokenizer(text, add_special_tokens=False).input_ids

    def _forward(self, rows_lora: Sequence[RowLoRA], **kwargs) -> torch.Tensor:
        if self.lora is None or all(r.slot < 0 for r in rows_lora):
            return self.model(**kwargs).logits[:, -1, :]
        with self.lora.use([r.slot for r in rows_lora], [r.scale for r in rows_lora]):
            return self.model(**kwargs).logits[:, -1, :]

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[list[int]], rows_lora: Sequence[RowLoRA]) -> tuple[torch.Tensor, KVBatch]:
        """Prompts of new sequences, left-padded into one forward: last-position logits [n, vocab] and their cache."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)
        cache = PaddedKVCache(self.num_layers)
        logits = self._forward(rows_lora, input_ids=ids, attention_mask=mask, position_ids=positions,
                               cache=cache, use_cache=True, logits_to_keep=1)
        return logits, KVBatch(cache, mask)

    @torch.inference_mode()
    def decode(self, batch: KVBatch, token_ids: Sequence[int], rows_lora: Sequence[RowLoRA]) -> torch.Tensor:
        """One new token per running row; the batch's cache and mask grow by one column. Logits [rows, vocab]."""
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device).view(-1, 1)
        positions = batch.next_positions()
        mask = batch.mask_with_new_column()
        logits = self._forward(rows_lora, input_ids=ids, attention_mask=mask, position_ids=positions,
                               cache=batch.cache, use_cache=True)
        batch.mask = mask
        return logits
