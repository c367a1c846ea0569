"""Every LLM family we serve, on a tiny random model of it (tools/fixtures/llm_families.py), in-process through the same
runner the server steps: greedy tokens equal transformers `generate`; a mixed-adapter batch [a, none, b, a@0.5]
equals PEFT per row, on prefill logits (1e-4) and on greedy tokens; prompts cross the 8-token sliding windows.
Also: adapters trained on q/k/v and gate/up load onto Phi-3's fused layers (against PEFT on the same weights as a
Llama), LoRA on lm_head, and the bad inputs of issue 13, each refused with its message.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from backends.llm.runner import ModelRunner, RunnerSettings, StepRow, check_layer_types
from backends.lora.adapters.files import AdapterError
from backends.lora.adapters.peft import load_adapter
from backends.lora.manager.config import LoRAServingConfig
from backends.lora.ops.batch import RowLoRA
from tools.fixtures.adapters import half_scale_copy, make_random_adapter
from tools.fixtures.llm_families import FAMILIES, load_family, make_family

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Hello!", "Sliding windows are eight tokens wide here.",
           "Mixed batches, one adapter per row."]
STEPS = 8
RANK = 8


def _leaf_names(model, runner_layers) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n in runner_layers})


class Rows:
    """Prefill the prompts together in chunks of `CHUNK` tokens (one LoRA row each; the chunks attend to the blocks
    their earlier chunks wrote, through sliding windows too), then decode them together for `steps` tokens."""

    CHUNK = 6

    def __init__(self, runner: ModelRunner, rows_lora: list[RowLoRA]):
        self.runner = runner
        self.prompts = [runner.encode(p) for p in PROMPTS]
        self.rows_lora = rows_lora

    def run(self, steps: int = STEPS) -> tuple[torch.Tensor, list[list[int]]]:
        kv = self.runner.kv
        ids = [list(p) for p in self.prompts]
        computed, blocks = [0] * len(ids), [[] for _ in ids]
        first: list[torch.Tensor | None] = [None] * len(ids)
        while any(len(t) - len(p) < steps for t, p in zip(ids, self.prompts)):
            live = [i for i, (t, p) in enumerate(zip(ids, self.prompts)) if len(t) - len(p) < steps]
            rows = []
            for i in live:
                n = min(len(ids[i]) - computed[i], self.CHUNK)
                blocks[i] += kv.pool.allocate(kv.blocks_for(computed[i] + n) - len(blocks[i]))
                last = computed[i] + n == len(ids[i])
                rows.append(StepRow(ids[i][computed[i]:computed[i] + n], computed[i], list(blocks[i]),
                                    self.rows_lora[i], "last" if last else "none"))
            for i, row, logits in zip(live, rows, self.runner.step(rows)):
                computed[i] += len(row.tokens)
                if logits is not None:
                    first[i] = logits if first[i] is None else first[i]
                    ids[i].append(int(logits.argmax()))
        for table in blocks:
            kv.pool.release(table, keep_cached=False)
        return torch.stack(first), [t[len(p):] for t, p in zip(ids, self.prompts)]


def _generate(model, prompt: list[int], steps: int = STEPS, until_eos: bool = False) -> list[int]:
    """Greedy tokens; exactly `steps` of them unless `until_eos` (then stopping at EOS, as the server does)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                             min_new_tokens=None if until_eos else steps, do_sample=False)
    return out[0, len(prompt):].tolist()


def _last_logits(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([prompt])).logits[0, -1]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    folder = make_family(request.param)
    tmp = tmp_path_factory.mktemp(request.param)
    runner = ModelRunner(folder, lora=LoRAServingConfig(max_loras=2, max_lora_rank=16),
                         settings=RunnerSettings(dtype="float32", max_model_len=96, max_num_seqs=4))
    leaves = _leaf_names(runner.model, runner.lora.layers)
    factory = lambda: load_family(folder)  # noqa: E731
    adapters = {
        "a": make_random_adapter(factory, tmp / "a", seed=1, std=0.1, r=RANK, lora_alpha=16, target_modules="all-linear"),
        # b: a different rank on a subset of the layers, named the PEFT way (leaf names)
        "b": make_random_adapter(factory, tmp / "b", seed=2, std=0.1, r=4, lora_alpha=4, target_modules=leaves[:2]),
    }
    adapters["a_half"] = half_scale_copy(adapters["a"], tmp / "a_half")
    return SimpleNamespace(name=request.param, folder=folder, runner=runner, adapters=adapters, factory=factory)


def test_base_greedy_tokens_equal_generate(family):
    runner = family.runner
    _, tokens = Rows(runner, [RowLoRA()] * len(PROMPTS)).run()
    reference = load_family(family.folder)
    for prompt, got in zip(PROMPTS, tokens):
        assert got == _generate(reference, runner.encode(prompt)), f"{family.name}: {prompt!r}"


def test_mixed_adapter_batch_equals_peft_per_row(family):
    from peft import PeftModel

    runner = family.runner
    for slot, name in enumerate(("a", "b")):
        runner.lora.load_slot(slot, load_adapter(family.adapters[name], runner.lora.spec, 16))
    rows = [RowLoRA.one(0, 1.0), RowLoRA(), RowLoRA.one(1, 1.0), RowLoRA.one(0, 0.5)]
    logits, tokens = Rows(runner, rows).run()

    peft = PeftModel.from_pretrained(family.factory(), family.adapters["a"], adapter_name="a")
    for name in ("b", "a_half"):
        peft.load_adapter(family.adapters[name], adapter_name=name)
    peft.eval()
    for row, (prompt, adapter) in enumerate(zip(PROMPTS, ["a", None, "b", "a_half"])):
        ids = runner.encode(prompt)
        if adapter is None:
            with peft.disable_adapter():
                want_logits, want_tokens = _last_logits(peft, ids), _generate(peft, ids)
        else:
            peft.set_adapter(adapter)
            want_logits, want_tokens = _last_logits(peft, ids), _generate(peft, ids)
        torch.testing.assert_close(logits[row], want_logits, atol=1e-4, rtol=0,
                                   msg=lambda m: f"{family.name} row {row} ({adapter}): {m}")
        assert tokens[row] == want_tokens, f"{family.name} row {row} ({adapter})"
    base = _last_logits(load_family(family.folder), runner.encode(PROMPTS[0]))
    assert (logits[0] - base).abs().max() > 1e-2, f"{family.name}: adapter a had no effect"


# -- fused projections ---------------------------------------------------------------------------------------------

def _phi3_as_llama(phi3):
    """A Llama with Phi-3's weights, q/k/v and gate/up split: the same function with separate projections."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = phi3.config
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, head_dim=c.hidden_size // c.num_attention_heads,
                         rms_norm_eps=c.rms_norm_eps, rope_parameters=c.rope_parameters,
                         max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False)
    llama = LlamaForCausalLM(config).eval()
    state = {}
    q = c.num_attention_heads * config.head_dim
    kv = c.num_key_value_heads * config.head_dim
    for name, tensor in phi3.state_dict().items():
        if name.endswith("qkv_proj.weight"):
            stem = name.removesuffix("qkv_proj.weight")
            for part, chunk in zip(("q", "k", "v"), tensor.split([q, kv, kv])):
                state[f"{stem}{part}_proj.weight"] = chunk
        elif name.endswith("gate_up_proj.weight"):
            stem = name.removesuffix("gate_up_proj.weight")
            gate, up = tensor.chunk(2)
            state[f"{stem}gate_proj.weight"], state[f"{stem}up_proj.weight"] = gate, up
        else:
            state[name] = tensor
    llama.load_state_dict(state)
    return llama


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    folder = make_family("phi3")
    return SimpleNamespace(folder=folder, tmp=tmp_path_factory.mktemp("phi3"),
                           runner=ModelRunner(folder, lora=LoRAServingConfig(max_loras=2, max_lora_rank=16),
                                              settings=RunnerSettings(dtype="float32", max_model_len=96,
                                                                      max_num_seqs=4)))


def test_split_qkv_and_gate_up_adapter_loads_onto_fused_phi3_layers(phi3):
    """Ranks differ per part (q 2, k 4, v 6): stacked on the fused layer they are rank 12, and each part's output
    rows get exactly its own delta, as PEFT computes it on the split model."""
    from peft import PeftModel

    llama = lambda: _phi3_as_llama(load_family(phi3.folder))  # noqa: E731
    ids = phi3.runner.encode(PROMPTS[0])
    torch.testing.assert_close(_last_logits(llama(), ids), _last_logits(load_family(phi3.folder), ids), atol=1e-5, rtol=0)
    folder = make_random_adapter(llama, phi3.tmp / "split", seed=3, std=0.1, r=4, lora_alpha=8,
                                 target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj"],
                                 rank_pattern={"q_proj": 2, "v_proj": 6}, alpha_pattern={"v_proj": 3})
    adapter = load_adapter(folder, phi3.runner.lora.spec, 16)
    assert {n.rsplit(".", 1)[-1] for n in adapter.modules} == {"qkv_proj", "gate_up_proj", "o_proj"}
    assert adapter.modules["model.layers.0.self_attn.qkv_proj"].A.shape[0] == 12
    phi3.runner.lora.load_slot(0, adapter)
    rows = [RowLoRA.one(0, 1.0), RowLoRA(), RowLoRA.one(0, 0.5), RowLoRA.one(0, 1.0)]
    logits, tokens = Rows(phi3.runner, rows).run()
    reference = PeftModel.from_pretrained(llama(), folder).eval()
    torch.testing.assert_close(logits[0], _last_logits(reference, ids), atol=1e-4, rtol=0)
    assert tokens[3] == _generate(reference, phi3.runner.encode(PROMPTS[3]))


def test_fused_rank_over_the_slot_rank_is_refused_naming_the_layer(phi3):
    llama = lambda: _phi3_as_llama(load_family(phi3.folder))  # noqa: E731
    folder = make_random_adapter(llama, phi3.tmp / "wide", seed=4, r=8, lora_alpha=8,
                                 target_modules=["q_proj", "k_proj", "v_proj"])
    with pytest.raises(AdapterError) as error:
        load_adapter(folder, phi3.runner.lora.spec, 16)
    assert "model.layers.0.self_attn.qkv_proj: its parts' ranks 8 (q_proj) + 8 (k_proj) + 8 (v_proj) = 24" in str(error.value)
    assert "exceed max_lora_rank 16" in str(error.value)


def test_split_adapter_missing_a_layers_parts_is_refused(phi3):
    """Without layer 1's q/k/v tensors the adapter is incomplete, as it would be on a split model."""
    from safetensors.torch import load_file, save_file

    llama = lambda: _phi3_as_llama(load_family(phi3.folder))  # noqa: E731
    folder = make_random_adapter(llama, phi3.tmp / "truncated", seed=7, r=4, lora_alpha=4,
                                 target_modules=["q_proj", "k_proj", "v_proj"])
    weights = folder / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if ".layers.1." not in k}, weights)
    with pytest.raises(AdapterError, match=r"missing for 3 targeted modules: model.layers.1.self_attn.k_proj"):
        load_adapter(folder, phi3.runner.lora.spec, 16)


def test_dora_on_the_parts_of_a_fused_layer_is_refused_naming_it(phi3):
    """A layer kind DoRA is not served on: Phi-3's fused qkv_proj (the parts' norms would have to be kept apart)."""
    llama = lambda: _phi3_as_llama(load_family(phi3.folder))  # noqa: E731
    folder = make_random_adapter(llama, phi3.tmp / "dora", seed=8, r=2, lora_alpha=4,
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_dora=True)
    with pytest.raises(AdapterError, match=r"DoRA is not served on the fused layer model.layers.0.self_attn.qkv_proj"):
        load_adapter(folder, phi3.runner.lora.spec, 16)


def test_adapter_naming_a_fused_layer_and_its_parts_is_refused(phi3):
    from safetensors.torch import load_file, save_file

    folder = make_random_adapter(lambda: load_family(phi3.folder), phi3.tmp / "both", seed=8, r=4, lora_alpha=4,
                                 target_modules=["qkv_proj"])
    weights = folder / "adapter_model.safetensors"
    state = load_file(weights)
    for ab, shape in (("A", (4, 64)), ("B", (64, 4))):
        state[f"base_model.model.model.layers.0.self_attn.q_proj.lora_{ab}.weight"] = torch.zeros(shape)
    save_file(state, weights)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["qkv_proj", "q_proj"]}))
    with pytest.raises(AdapterError, match=r"tensors for both model.layers.0.self_attn.qkv_proj and its parts "
                                           r"model.layers.0.self_attn.q_proj"):
        load_adapter(folder, phi3.runner.lora.spec, 16)


def test_adapter_for_modules_the_model_lacks_is_refused(phi3, tmp_path):
    """A GPT-NeoX adapter (query_key_value) sent to Phi-3."""
    neox = make_family("gpt_neox")
    folder = make_random_adapter(lambda: load_family(neox), tmp_path / "neox", r=4, lora_alpha=4,
                                 target_modules=["query_key_value"])
    with pytest.raises(AdapterError) as error:
        load_adapter(folder, phi3.runner.lora.spec, 16)
    assert "match zero layers" in str(error.value) and "gpt_neox.layers.0.attention.query_key_value" in str(error.value)


# -- lm_head and lora_target_modules -------------------------------------------------------------------------------

def test_lm_head_lora_when_targeted_equals_peft(tmp_path):
    from peft import PeftModel

    folder = make_family("llama")
    factory = lambda: load_family(folder)  # noqa: E731
    adapter = make_random_adapter(factory, tmp_path / "head", seed=5, std=0.1, r=4, lora_alpha=8,
                                  target_modules=["v_proj", "lm_head"])
    default = ModelRunner(folder, lora=LoRAServingConfig(max_loras=1, max_lora_rank=8),
                          settings=RunnerSettings(dtype="float32", max_model_len=64))
    with pytest.raises(AdapterError, match="does not have or does not LoRA-enable: lm_head"):
        load_adapter(adapter, default.lora.spec, 8)
    runner = ModelRunner(folder,
                         lora=LoRAServingConfig(max_loras=1, max_lora_rank=8, target_modules="all-linear,lm_head"),
                         settings=RunnerSettings(dtype="float32", max_model_len=64, max_num_seqs=4))
    assert "lm_head" in runner.lora.layers and len(runner.lora.layers) == len(default.lora.layers) + 1
    runner.lora.load_slot(0, load_adapter(adapter, runner.lora.spec, 8))
    logits, tokens = Rows(runner, [RowLoRA.one(0, 1.0), RowLoRA(), RowLoRA.one(0, 1.0), RowLoRA()]).run()
    reference = PeftModel.from_pretrained(factory(), adapter).eval()
    ids = runner.encode(PROMPTS[2])
    torch.testing.assert_close(logits[2], _last_logits(reference, ids), atol=1e-4, rtol=0)
    assert tokens[2] == _generate(reference, ids)


@pytest.mark.parametrize("targets, layers", [("q_proj,v_proj", 4), ('["o_proj"]', 2), (r".*\.0\.mlp\..*_proj", 3)])
def test_lora_target_modules_narrow_the_patched_layers(targets, layers):
    runner = ModelRunner(make_family("llama"),
                         lora=LoRAServingConfig(max_loras=1, max_lora_rank=8, target_modules=targets),
                         settings=RunnerSettings(dtype="float32", max_model_len=32, max_num_seqs=1))
    assert len(runner.lora.layers) == layers


@pytest.mark.parametrize("targets, message", [
    ("query_key_value", "lora_target_modules 'query_key_value' match no linear layer of LlamaForCausalLM"),
    ("(unclosed", "lora_target_modules regex '(unclosed' is invalid"),
    ("[1, 2]", "must be a non-empty list of module names"),
])
def test_lora_target_modules_that_match_nothing_fail_the_load(targets, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        ModelRunner(make_family("llama"), lora=LoRAServingConfig(max_loras=1, max_lora_rank=8, target_modules=targets),
                    settings=RunnerSettings(dtype="float32", max_model_len=32))


def test_a_window_the_model_ignores_is_not_applied(tmp_path):
    """A Llama whose config.json carries a stray "sliding_window" (Qwen2 conversions do): LlamaModel's forward
    attends over everything, and so must our attention (Llama passes no window to it). (transformers' own
    `generate` does not: its DynamicCache drops
    keys beyond any configured window, so the forward is the reference here.)"""
    shutil.copytree(make_family("llama"), tmp_path / "llama", dirs_exist_ok=True)
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    (tmp_path / "llama" / "config.json").write_text(json.dumps({**config, "sliding_window": 8}))
    runner = ModelRunner(tmp_path / "llama", lora=None,
                         settings=RunnerSettings(dtype="float32", max_model_len=96, max_num_seqs=4))
    logits, _ = Rows(runner, [RowLoRA()] * len(PROMPTS)).run(steps=1)
    reference = load_family(tmp_path / "llama")
    for row, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(logits[row], _last_logits(reference, runner.encode(prompt)), atol=1e-4, rtol=0)


def test_unsupported_attention_layer_types_are_refused_naming_them():
    config = SimpleNamespace(sliding_window=None, layer_types=["full_attention", "linear_attention"])
    with pytest.raises(ValueError, match=r"attention layer types \['linear_attention'\] are not supported"):
        check_layer_types(config, "some-model")
    check_layer_types(SimpleNamespace(layer_types=["sliding_attention", "full_attention"]), "m")


# -- through tritonserver ------------------------------------------------------------------------------------------

def test_served_phi3_with_a_split_qkv_adapter_gives_pefts_greedy_text(phi3, http_client, triton_server, lora_root):
    """tritonserver serving the tiny Phi-3: concurrent requests with the q/k/v + gate/up adapter (by path), without
    it and at scale 0.5 each get the text PEFT's greedy generation gives on the split model."""
    from concurrent.futures import ThreadPoolExecutor

    import tritonclient.grpc as grpcclient
    from peft import PeftModel

    from tools.clients.llm import generate
    from tools.session import PHI3_MODEL

    llama = lambda: _phi3_as_llama(load_family(phi3.folder))  # noqa: E731
    folder = make_random_adapter(llama, lora_root / "phi3-split", seed=6, std=0.1, r=4, lora_alpha=8,
                                 target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"])
    half = half_scale_copy(folder, phi3.tmp / "phi3-split-half")
    jobs = [(PROMPTS[0], folder, None), (PROMPTS[1], None, None), (PROMPTS[2], folder, 0.5), (PROMPTS[3], folder, None)]
    http_client.load_model(PHI3_MODEL)
    try:
        def serve(job):
            client = grpcclient.InferenceServerClient(triton_server.grpc_url)
            try:
                lora = {"lora_path": str(job[1]), "lora_scale": job[2]} if job[1] else {}
                return generate(client, job[0], model=PHI3_MODEL, temperature=0.0, max_tokens=STEPS, **lora)
            finally:
                client.close()

        with ThreadPoolExecutor(len(jobs)) as pool:
            served = list(pool.map(serve, jobs))
    finally:
        http_client.unload_model(PHI3_MODEL)
    reference = PeftModel.from_pretrained(llama(), folder, adapter_name="full")
    reference.load_adapter(half, adapter_name="scaled")
    reference.eval()
    tokenizer = phi3.runner.tokenizer
    for (prompt, adapter, scale), got in zip(jobs, served):
        assert got.error is None, got.error
        ids = phi3.runner.encode(prompt)
        if adapter is None:
            with reference.disable_adapter():
                want = _generate(reference, ids, until_eos=True)
        else:
            reference.set_adapter("scaled" if scale else "full")
            want = _generate(reference, ids, until_eos=True)
        assert got.text == tokenizer.decode(want, skip_special_tokens=True), f"{prompt!r} ({adapter}, {scale})"


def test_a_model_without_linear_projections_is_refused_naming_its_layers(tmp_path):
    """GPT-2 computes its projections with transformers' Conv1D, which takes no LoRA here."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tools.fixtures.llm_families import byte_tokenizer

    GPT2LMHeadModel(GPT2Config(vocab_size=259, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel has no nn.Linear in its decoder blocks .*Conv1D"):
        ModelRunner(tmp_path, lora=LoRAServingConfig(max_loras=1, max_lora_rank=8),
                    settings=RunnerSettings(dtype="float32", max_model_len=32))


# -- LoRA stacks ---------------------------------------------------------------------------------------------

def test_llm_stack_equals_peft_with_both_adapters_active(tmp_path):
    """Rows [a@0.7 + b@0.3, base, a, b@0.5 + a@2.0] in one batch against PEFT with several adapters active at once
    (`set_adapter([...])`) and per-adapter scales (`set_scale`): last-position logits (1e-4) and 8 greedy tokens."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from backends.llm.runner import ModelRunner, RunnerSettings
    from backends.lora.adapters.peft import load_adapter
    from backends.lora.manager.config import LoRAServingConfig
    from backends.lora.ops.batch import RowLoRA
    from tools.fixtures.adapters import make_random_adapter
    from tools.fixtures.llm_families import make_family

    folder = make_family("llama")
    factory = lambda: load_family(folder)  # noqa: E731
    adapters = {"a": make_random_adapter(factory, tmp_path / "a", seed=1, std=0.1, r=8, lora_alpha=16,
                                         target_modules="all-linear"),
                "b": make_random_adapter(factory, tmp_path / "b", seed=2, std=0.1, r=4, lora_alpha=4,
                                         target_modules=["q_proj", "v_proj", "down_proj"])}
    runner = ModelRunner(folder, lora=LoRAServingConfig(max_loras=2, max_lora_rank=8),
                         settings=RunnerSettings(dtype="float32", max_model_len=96, max_num_seqs=4))
    for slot, name in enumerate(adapters):
        runner.lora.load_slot(slot, load_adapter(adapters[name], runner.lora.spec, 8))
    stacks = [{"a": 0.7, "b": 0.3}, {}, {"a": 1.0}, {"b": 0.5, "a": 2.0}]
    slot_of = {"a": 0, "b": 1}
    logits, tokens = Rows(runner, [RowLoRA.stack([(slot_of[n], c) for n, c in s.items()]) for s in stacks]).run()

    peft = PeftModel.from_pretrained(factory(), adapters["a"], adapter_name="a")
    peft.load_adapter(adapters["b"], adapter_name="b")
    peft.eval()
    for row, (prompt, stack) in enumerate(zip(PROMPTS, stacks)):
        ids = runner.encode(prompt)
        if not stack:
            with peft.disable_adapter():
                want_logits, want_tokens = _last_logits(peft, ids), _generate(peft, ids)
        else:
            peft.base_model.set_adapter(list(stack))
            for module in peft.modules():
                if isinstance(module, LoraLayer):
                    for name, scale in stack.items():
                        if name in module.scaling:
                            module.set_scale(name, scale)
            want_logits, want_tokens = _last_logits(peft, ids), _generate(peft, ids)
        torch.testing.assert_close(logits[row], want_logits, atol=1e-4, rtol=0, msg=lambda m: f"row {row}: {m}")
        assert tokens[row] == want_tokens, f"row {row} ({stack})"
    alone = _last_logits(peft, runner.encode(PROMPTS[3]))  # the last setting: b@0.5 + a@2.0
    torch.testing.assert_close(logits[3], alone, atol=1e-4, rtol=0)
