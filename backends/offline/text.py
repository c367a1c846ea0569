"""`TextGenerator`: many prompts with mixed adapters through the continuous-batching engine, in-process.

    from backends.offline import LoRA, TextGenerator
    llm = TextGenerator(preload={"uppercase": ".cache/adapters/demo/uppercase"})
    outs = llm.generate(["What is the capital of France?"] * 2, max_tokens=16, temperature=0,
                        lora=[None, LoRA(name="uppercase")])
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from backends.errors import InvalidArgument
from backends.llm.chat import apply_chat_template, load_tokenizer
from backends.llm.engine import GenerationChunk
from backends.llm.params import GenerationRequest, build_sampling_params
from backends.llm.service import start_llm
from backends.lora.manager.selector import select_lora
from backends.offline.common import LoRASpec, per_prompt, service_params, stack_fields
from backends.structured import parse_constraint

Prompt = str | Sequence[dict]  # text as is, or chat messages (the model's chat template is applied)


@dataclass
class TextOutput:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]


class _Result:
    """An OutputSink that gathers one request's chunks."""

    def __init__(self, done: threading.Semaphore, progress: tqdm | None):
        self.chunks: list[GenerationChunk] = []
        self.error: Exception | None = None
        self._done, self._progress = done, progress

    def send(self, chunk: GenerationChunk, final: bool) -> None:
        self.chunks.append(chunk)
        if final:
            self._finish()

    def fail(self, error: Exception) -> None:
        self.error = error
        self._finish()

    def _finish(self) -> None:
        try:
            if self._progress is not None:
                self._progress.update(1)
        finally:  # whatever happens to the progress bar, the waiter must wake
            self._done.release()

    def is_cancelled(self) -> bool:
        return False

    def output(self) -> TextOutput:
        last = self.chunks[-1]
        return TextOutput("".join(c.text for c in self.chunks), last.finish_reason, last.num_input_tokens,
                          last.num_output_tokens, [t for c in self.chunks for t in c.token_ids])


class TextGenerator:
    def __init__(self, model_path: str | Path | None = None, *, preload: dict[str, str] | None = None,
                 device: str = "cpu", **settings):
        """`model_path`: a Hugging Face causal-LM folder (default: the converted SmolLM2); `preload`: adapters by
        name -> path, loaded and pinned now; `settings`: any `llm` model parameter of config.pbtxt (max_loras,
        max_lora_rank, max_num_seqs, max_model_len, dtype, ...)."""
        self.service = start_llm(service_params("llm", model_path, preload, settings), device)
        self.engine = self.service.engine
        try:  # its own tokenizer for chat templates: the engine thread's detokenises concurrently
            self._tokenizer = load_tokenizer(str(self.service.model_path))
        except BaseException:
            self.close()
            raise

    def prepare(self, prompt: Prompt, lora: LoRASpec = None, **sampling) -> GenerationRequest:
        """Validate one request as the server does (InvalidArgument / AdapterError / NotFound on a bad one)."""
        if isinstance(prompt, str):
            text = prompt
        else:
            messages = list(prompt)
            if not messages or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                       and isinstance(m.get("content"), str) for m in messages):
                raise InvalidArgument("messages must be a non-empty list of {role, content} objects with strings")
            try:
                text = apply_chat_template(messages, tokenizer=self._tokenizer)
            except Exception as exc:  # template errors (e.g. role order) are the request's fault
                raise InvalidArgument(f"cannot apply the chat template: {exc}") from None
        params = build_sampling_params(
            max_tokens=sampling.get("max_tokens"), temperature=sampling.get("temperature"),
            top_p=sampling.get("top_p"), top_k=sampling.get("top_k"), seed=sampling.get("seed"),
            stop=sampling.get("stop"), default_max_tokens=self.engine.default_max_tokens,
        )
        selection = select_lora(self.service.selector, stack_fields(lora))
        spec = sampling.get("structured_output")  # the Triton input's form, as a dict or its JSON text
        constraint = parse_constraint(spec if spec is None or isinstance(spec, str) else json.dumps(spec))
        return self.engine.prepare(GenerationRequest(uuid.uuid4().hex, text, params, lora=selection,
                                                     constraint=constraint))

    def run(self, requests: Sequence[GenerationRequest], progress: bool = True) -> list[TextOutput | Exception]:
        """Prepared requests, all submitted at once (the engine batches them); outputs in order, or the error a
        request failed with."""
        done = threading.Semaphore(0)
        bar = tqdm(total=len(requests), desc="generating", unit="prompt") if progress else None
        results = [_Result(done, bar) for _ in requests]
        try:
            for request, result in zip(requests, results):
                try:
                    self.engine.submit(request, result)
                except Exception as exc:  # this request's error; the others run
                    result.fail(exc)
            for _ in requests:
                done.acquire()
        finally:
            if bar is not None:
                bar.close()
        return [r.error if r.error is not None else r.output() for r in results]

    def generate(self, prompts: Prompt | Sequence[Prompt], lora: LoRASpec | list[LoRASpec] = None,
                 progress: bool = True, **sampling) -> list[TextOutput]:
        """Text for each prompt; `lora`: one spec for all prompts, or a list with one per prompt, where a spec is None,
        a LoRA, or a tuple of LoRA (a stack: `(LoRA("a", scale=0.7), LoRA("b", scale=0.3))`); `sampling`: max_tokens,
        temperature, top_p, top_k, seed, stop, structured_output (e.g. `{"json": schema}`, `{"regex": "..."}`; or a
        list with one per prompt, None for none).
        Raises the first request's error, as vLLM's `LLM.generate` does."""
        single = isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], dict))  # one conversation
        prompts = [prompts] if single else list(prompts)
        loras = per_prompt(lora, len(prompts))
        specs = sampling.pop("structured_output", None)  # one for all prompts, or a list with one per prompt
        specs = list(specs) if isinstance(specs, list) else [specs] * len(prompts)
        if len(specs) != len(prompts):
            raise InvalidArgument(f"structured_output: {len(specs)} constraints for {len(prompts)} prompts")
        outputs = self.run([self.prepare(p, lo, structured_output=c, **sampling)
                            for p, lo, c in zip(prompts, loras, specs)], progress)
        for out in outputs:
            if isinstance(out, Exception):
                raise out
        return outputs

    def close(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> "TextGenerator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
