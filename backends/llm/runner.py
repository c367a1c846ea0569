"""The model side of generation: load the causal LM and tokenizer, run prefill and decode forwards with a KV cache.

The engine only talks to this class, so the batched/LoRA forward of later work replaces `prefill`/`decode` here
without touching scheduling, sampling or streaming.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@dataclass
class ForwardResult:
    logits: torch.Tensor  # [batch, vocab] for the last position of each row
    kv_cache: object


class ModelRunner:
    def __init__(self, model_path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
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
        self.model_path = path
        self.max_model_len = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.eos_token_ids = self._eos_ids()
        log.info(
            "loaded %s on %s in %.1f s (context %d, eos %s)",
            path, self.device, time.monotonic() - started, self.max_model_len, sorted(self.eos_token_ids),
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

    @torch.inference_mode()
    def prefill(self, token_ids: list[int]) -> ForwardResult:
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return ForwardResult(out.logits[:, -1, :], out.cache)

    @torch.inference_mode()
    def decode(self, token_id: int, kv_cache: object) -> ForwardResult:
        ids = torch.tensor([[token_id]], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, cache=kv_cache, use_cache=True)
        return ForwardResult(out.logits[:, -1, :], out.cache)
