"""Benchmark baseline: the serial per-request PEFT server a user would write by hand, as a decoupled Triton Python
model (`benchmarks/baselines/peft_batched.py` is the batched one).

One request at a time (Triton calls `execute` serially for an instance): load the request's adapter into the
`PeftModel` the first time its name is seen, `set_adapter`, `generate` with a streamer that sends one response per
token. Base requests run under `disable_adapter()`. Same inputs and outputs as `model_repository/llm`, so the same
perf_analyzer input files drive both. `benchmarks/serving.py` puts it in a temporary model repository.
"""

from __future__ import annotations

import json

import torch
import triton_python_backend_utils as pb_utils
from transformers.generation.streamers import BaseStreamer

from backends import triton_io as tio
from backends.settings import default_llm_model_path


class _SendTokens(BaseStreamer):
    def __init__(self, sender, tokenizer, eos: set[int]):
        self.sender, self.tokenizer, self.eos = sender, tokenizer, eos
        self.prompt_seen = False
        self.count = 0

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands the prompt over first
            self.prompt_seen = True
            return
        if value.item() in self.eos:  # not an output token (our engine does not count it either)
            return
        self.count += 1
        text = self.tokenizer.decode(value.reshape(-1), skip_special_tokens=True)
        self.sender.send(_response(text, "", self.count))

    def end(self) -> None:
        pass


def _response(text: str, finish_reason: str, num_output_tokens: int) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(output_tensors=[
        tio.string_tensor("text_output", text), tio.string_tensor("finish_reason", finish_reason),
        tio.int_tensor("num_input_tokens", 0), tio.int_tensor("num_output_tokens", num_output_tokens),
    ])


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        params = tio.model_parameters(json.loads(args["model_config"]))
        path = params.get("model_path") or str(default_llm_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        eos = self.base.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.peft = None
        self.loaded: set[str] = set()

    def _model_for(self, name: str | None, path: str | None):
        if not name and not path:
            return None
        name = name or path
        if self.peft is None:
            from peft import PeftModel

            self.peft = PeftModel.from_pretrained(self.base, path, adapter_name=name).eval()
            self.loaded.add(name)
        elif name not in self.loaded:
            self.peft.load_adapter(path, adapter_name=name)
            self.loaded.add(name)
        self.peft.set_adapter(name)
        return self.peft

    @torch.inference_mode()
    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                prompt = tio.get_string(request, "text_input")
                max_tokens = tio.get_int(request, "max_tokens") or 256
                lora = tio.get_lora_fields(request)
                ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
                model = self._model_for(lora.name, lora.path)
                streamer = _SendTokens(sender, self.tokenizer, self.eos)
                kwargs = dict(max_new_tokens=max_tokens, do_sample=False, streamer=streamer,
                              pad_token_id=self.tokenizer.pad_token_id)
                if model is None and self.peft is not None:
                    with self.peft.disable_adapter():
                        self.peft.generate(input_ids=ids, **kwargs)
                else:
                    (model or self.base).generate(input_ids=ids, **kwargs)
                reason = "length" if streamer.count >= max_tokens else "stop"
                sender.send(_response("", reason, streamer.count), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception as exc:
                tio.send_error(sender, exc)
        return None

    def finalize(self) -> None:
        pass
