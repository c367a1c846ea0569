"""CUDA paths: slot buffers on the device, and CUDA-graph replay (LoRA and base-only graphs, Triton kernels inside)
equal to eager mixed-adapter forwards."""

from __future__ import annotations

import pytest
import torch

from backends.llm.cuda_graphs import GraphedLoRAForward
from backends.lora.adapters.peft import load_adapter
from backends.lora.layers.linear import patch_model
from backends.lora.ops.batch import LoRABatch
from tools.fixtures.adapters import ALL_PROJECTIONS, make_random_adapter, tiny_llama

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_cuda_graph_replay_matches_eager_for_any_adapter_mix(tmp_path, dtype, tol):
    folders = [make_random_adapter(tiny_llama, tmp_path / f"a{i}", seed=i, r=4 + 4 * i, lora_alpha=8,
                                   target_modules=ALL_PROJECTIONS) for i in range(3)]
    model = tiny_llama().to("cuda", dtype)
    ctx = patch_model(model, max_loras=4, max_rank=16)
    for slot, folder in enumerate(folders):
        ctx.load_slot(slot, load_adapter(folder, ctx.spec, max_rank=16, dtype=dtype))

    def forward(inputs):
        return model(input_ids=inputs["input_ids"], use_cache=False).logits

    graphed = GraphedLoRAForward(ctx, "cuda", forward, lambda n: {"input_ids": torch.zeros(n, 1, dtype=torch.long,
                                                                                   device="cuda")}, buckets=(4, 8))
    gen = torch.Generator().manual_seed(0)
    for slots, scales in [([0, 1, -1, 2, 0], [1, 1, 1, 0.5, 0]), ([2, 2, 2], [1, 1, 1]), ([-1, 1], [1, 2]),
                          ([-1, 0, -1], [0, 0, 1])]:  # the last one replays the base-only graph
        ids = torch.randint(0, 256, (len(slots), 1), generator=gen).cuda()
        replayed = graphed({"input_ids": ids}, LoRABatch.build(slots, scales)).clone()
        with torch.inference_mode(), ctx.use(LoRABatch.build(slots, scales)):
            eager = forward({"input_ids": ids})
        torch.testing.assert_close(replayed.float(), eager.float(), atol=tol, rtol=tol)


def test_cuda_graph_of_patched_linears_matches_eager():
    from torch import nn

    from backends.lora.adapters.config import LoRAConfig
    from backends.lora.adapters.peft import LoRAAdapter, ModuleLoRA

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16)).cuda()
    ctx = patch_model(model, max_loras=3, max_rank=8, targets=r"\d+")
    config = LoRAConfig(r=8, lora_alpha=8, target_modules=("0", "2"))
    for slot in range(3):
        ctx.load_slot(slot, LoRAAdapter(path=None, config=config, modules={
            name: ModuleLoRA(torch.randn(8, layer.in_features), torch.randn(8, layer.out_features))
            for name, layer in ctx.layers.items()}))
    graphed = GraphedLoRAForward(ctx, "cuda", lambda i: model(i["x"]),
                                 lambda n: {"x": torch.zeros(n, 32, device="cuda")}, buckets=(2, 8))
    x = torch.randn(5, 32, device="cuda")
    slots, scales = [2, -1, 0, 1, 2], [1.0, 1.0, 0.5, 1.0, 0.0]
    replayed = graphed({"x": x}, LoRABatch.build(slots, scales)).clone()
    with torch.inference_mode(), ctx.use(LoRABatch.build(slots, scales)):
        eager = model(x)
    torch.testing.assert_close(replayed, eager, atol=1e-4, rtol=1e-4)


def test_dora_rows_on_cuda_match_peft_eager_and_in_graphs_loaded_after_capture(tmp_path):
    """DoRA on the device: eager rows against PEFT's DoRA forward, and CUDA graphs captured before any DoRA adapter
    was loaded (recaptured when its buffers appear) equal to eager; slot copies ran on the side stream."""
    from peft import PeftModel

    dora = make_random_adapter(tiny_llama, tmp_path / "dora", seed=4, std=0.1, r=4, lora_alpha=8,
                               target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    plain = make_random_adapter(tiny_llama, tmp_path / "plain", seed=5, r=4, lora_alpha=8,
                                target_modules=ALL_PROJECTIONS)
    model = tiny_llama().to("cuda")
    ctx = patch_model(model, max_loras=4, max_rank=8)
    ctx.load_slot(0, load_adapter(plain, ctx.spec, max_rank=8))

    def forward(inputs):
        return model(input_ids=inputs["input_ids"], use_cache=False).logits

    graphed = GraphedLoRAForward(ctx, "cuda", forward, lambda n: {"input_ids": torch.zeros(n, 1, dtype=torch.long,
                                                                                   device="cuda")}, buckets=(4,))
    ctx.load_slot(2, load_adapter(dora, ctx.spec, max_rank=8))
    ids = torch.randint(0, 256, (4, 1), generator=torch.Generator().manual_seed(0)).cuda()
    batch = LoRABatch.build([2, 0, -1, 2], [1.0, 1.0, 1.0, 0.0])
    with torch.inference_mode(), ctx.use(batch):
        eager = forward({"input_ids": ids})
    replayed = graphed({"input_ids": ids}, batch).clone()
    torch.testing.assert_close(replayed, eager, atol=1e-4, rtol=0)
    reference = PeftModel.from_pretrained(tiny_llama(), dora).cuda().eval()
    with torch.inference_mode():
        want = reference(input_ids=ids[:1]).logits
        base = tiny_llama().cuda()(input_ids=ids[3:]).logits
    torch.testing.assert_close(eager[:1], want, atol=1e-4, rtol=0)
    torch.testing.assert_close(eager[3:], base, atol=1e-5, rtol=0)
