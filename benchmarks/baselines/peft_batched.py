"""Benchmark baseline: the batched PEFT server a competent user would write, as a decoupled Triton Python model.

Triton's dynamic batcher hands `execute` whatever requests queued while the previous batch ran (up to
`max_batch_size`, which `benchmarks/serving.py` sets to the engine's `max_num_seqs`). Each batch is one
left-padded `generate(..., adapter_names=[...])`: PEFT's mixed-adapter forward, base rows as `__base__`. An adapter
is loaded into the `PeftModel` the first time its name is seen. A streamer sends one response per generated token
per request (generate hands it the whole batch's new tokens per step) and the final response as soon as that row
hit its own `max_tokens` or EOS; a stopping criterion ends each row at its own `max_tokens`, so generate stops when
the longest row is done. What this cannot do, and our engine does: let new requests join a running batch.

Same inputs and outputs as `model_repository/llm` (with the batch dimension: [1, 1] per request), so the same
perf_analyzer input files drive it. Greedy only; `lora_scale` is ignored (PEFT has no per-row scale).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from backends import triton_io as tio
from backends.settings import default_llm_model_path

BASE = "__base__"  # PEFT's adapter name for rows without an adapter


@dataclass
class _Row:
    sender: "pb_utils.InferenceResponseSender"
    max_tokens: int
    num_input_tokens: int
    count: int = 0
    done: bool = False

    def send(self, text: str, finish_reason: str = "") -> None:
        response = pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text_output", np.array([[text.encode()]], dtype=np.object_)),
            pb_utils.Tensor("finish_reason", np.array([[finish_reason.encode()]], dtype=np.object_)),
            pb_utils.Tensor("num_input_tokens", np.array([[self.num_input_tokens]], dtype=np.int32)),
            pb_utils.Tensor("num_output_tokens", np.array([[self.count]], dtype=np.int32)),
        ])
        self.done = bool(finish_reason)
        self.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if self.done else 0)


class _StreamRows(BaseStreamer):
    """generate() calls `put` with the prompt ids first, then with one new token per row every step."""

    def __init__(self, rows: list[_Row], tokenizer, eos: set[int]):
        self.rows, self.tokenizer, self.eos = rows, tokenizer, eos
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(-1).tolist()):
            if row.done:  # finished rows get pad tokens until the whole batch is done
                continue
            if token in self.eos:
                row.send("", "stop")
                continue
            row.count += 1
            row.send(self.tokenizer.decode([token], skip_special_tokens=True),
                     "length" if row.count >= row.max_tokens else "")

    def end(self) -> None:
        for row in self.rows:
            if not row.done:
                row.send("", "length")


class _RowLimits(StoppingCriteria):
    """Each row stops at its own max_tokens (generate runs to the longest one)."""

    def __init__(self, prompt_width: int, max_tokens: list[int]):
        self.prompt_width, self.max_tokens = prompt_width, torch.tensor(max_tokens)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return input_ids.shape[1] - self.prompt_width >= self.max_tokens


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        params = tio.model_parameters(json.loads(args["model_config"]))
        path = params.get("model_path") or str(default_llm_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        eos = self.base.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.peft = None

    def _adapter(self, name: str | None, path: str | None) -> str:
        if not name and not path:
            return BASE
        name = name or path
        if self.peft is None:
            from peft import PeftModel

            self.peft = PeftModel.from_pretrained(self.base, path, adapter_name=name).eval()
        elif name not in self.peft.peft_config:
            self.peft.load_adapter(path, adapter_name=name)
        return name

    @torch.inference_mode()
    def execute(self, requests: list) -> None:
        rows, prompts, adapters = [], [], []
        for request in requests:
            sender = request.get_response_sender()
            try:
                prompt = tio.get_string(request, "text_input")
                lora = tio.get_lora_fields(request)
                adapters.append(self._adapter(lora.name, lora.path))
                prompts.append(prompt)
                rows.append(_Row(sender, tio.get_int(request, "max_tokens") or 256, 0))
            except Exception as exc:
                tio.send_error(sender, exc)
        if not rows:
            return None
        try:
            batch = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            for row, mask in zip(rows, batch.attention_mask):
                row.num_input_tokens = int(mask.sum())
            width = batch.input_ids.shape[1]
            kwargs = dict(max_new_tokens=max(r.max_tokens for r in rows), do_sample=False,
                          streamer=_StreamRows(rows, self.tokenizer, self.eos),
                          stopping_criteria=StoppingCriteriaList([_RowLimits(width, [r.max_tokens for r in rows])]),
                          pad_token_id=self.tokenizer.pad_token_id)
            if self.peft is None:
                self.base.generate(**batch, **kwargs)
            else:
                self.peft.generate(**batch, adapter_names=adapters, **kwargs)
        except Exception as exc:
            for row in rows:
                if not row.done:
                    tio.send_error(row.sender, exc)
        return None

    def finalize(self) -> None:
        pass
