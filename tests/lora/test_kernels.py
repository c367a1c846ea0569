"""Triton LoRA kernels (shrink/expand over slot segments) against a float64 per-row reference.

On CPU the kernels run under Triton's interpreter; the gpu-marked tests run them compiled on CUDA, eagerly and
replayed from a CUDA graph that also builds the segment metadata.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

pytest.importorskip("triton")

from backends.lora.ops import triton_ops as compiled  # noqa: E402  (after the importorskip)


def _interpreted_copy():
    """A private copy of `backends.lora.ops.triton_ops` whose kernels run under Triton's interpreter.

    Triton reads TRITON_INTERPRET when @triton.jit decorates a kernel, i.e. while the module executes. Setting it
    only around that keeps it out of other test modules, of child processes (tritonserver) and of the shared
    module, whose kernels stay compiled for the gpu tests.
    """
    name = "backends.lora.ops._triton_ops_interpreted"
    spec = importlib.util.spec_from_file_location(name, compiled.__file__)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look the defining module up
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return module


ops = _interpreted_copy()
_ENV_AFTER_IMPORT = os.environ.get("TRITON_INTERPRET")

# Largest error allowed, relative to the largest |value| of the result. fp32 runs without TF32. 16-bit dtypes
# round h to the weights' dtype before the expand (as the torch path does) and y once at the end.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
SLOTS = [2, 0, -1, 3, 0, 2, 3, 2, 0]  # unsorted, slot 1 unused
SCALES = [1.0, 0.5, 1.0, 2.0, 0.0, -1.5, 1.0, 0.25, 1.0]  # row 2 has no adapter, row 4 scale 0


def _slot_buffers(max_loras, max_rank, in_f, out_f, ranks, dtype, device="cpu", seed=0):
    """Stacked A [K, R, in] and Bt [K, R, out], slot k holding a rank ranks[k] adapter (zero-padded)."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.zeros(max_loras, max_rank, in_f)
    Bt = torch.zeros(max_loras, max_rank, out_f)
    for k, r in enumerate(ranks):
        A[k, :r] = torch.randn(r, in_f, generator=gen) / in_f**0.5
        Bt[k, :r] = torch.randn(r, out_f, generator=gen)
    return A.to(device, dtype), Bt.to(device, dtype)


def _inputs(n, in_f, out_f, dtype, device="cpu", seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_f, generator=gen).to(device, dtype)
    y = torch.randn(n, out_f, generator=gen).to(device, dtype)
    return x, y


def _reference(y, x, slots, scales, A, Bt):
    out = y.double()
    for i, (s, c) in enumerate(zip(slots, scales)):
        if s >= 0 and c != 0:
            out[i] += c * torch.einsum("k,rk,ro->o", x[i].double(), A[s].double(), Bt[s].double())
    return out


def _check(out, y0, ref, slots, scales, dtype):
    """Within TOL of the reference; rows without an adapter (slot -1, scale 0) bit-identical to y0."""
    assert out.dtype == dtype
    err = (out.double().cpu() - ref.cpu()).abs().max().item()
    assert err <= TOL[dtype] * ref.abs().max().item(), f"max error {err}"
    idle = torch.tensor([s < 0 or c == 0 for s, c in zip(slots, scales)])
    assert torch.equal(out[idle.to(out.device)], y0[idle.to(y0.device)])


def _run(module, slots, scales, dtype, max_loras=4, max_rank=16, ranks=(16, 5, 0, 12), in_f=32, out_f=48,
         device="cpu"):
    A, Bt = _slot_buffers(max_loras, max_rank, in_f, out_f, ranks, dtype, device)
    x, y0 = _inputs(len(slots), in_f, out_f, dtype, device)
    meta = module.SegmentMeta.build(torch.tensor(slots, device=device), torch.tensor(scales, device=device),
                                    max_loras)
    out = module.lora_apply_triton(y0.clone(), x, meta, A, Bt)
    _check(out, y0, _reference(y0, x, slots, scales, A, Bt), slots, scales, dtype)


# -- CPU, Triton's interpreter ---------------------------------------------------------------------------------
def test_kernels_are_interpreted_and_the_env_var_does_not_leak():
    assert type(ops._shrink_kernel).__name__ == "InterpretedFunction"
    assert type(ops._expand_kernel).__name__ == "InterpretedFunction"
    assert _ENV_AFTER_IMPORT == os.environ.get("TRITON_INTERPRET")
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        assert type(compiled._shrink_kernel).__name__ != "InterpretedFunction"
        with pytest.raises(RuntimeError, match="CUDA tensors"):
            compiled.lora_shrink(torch.zeros(1, 32), torch.zeros(1, 4, 32),
                                 compiled.SegmentMeta.build(torch.zeros(1), torch.ones(1), 1))


def test_segment_meta_groups_live_rows_by_slot_stably():
    slots = torch.tensor(SLOTS + [7])  # a slot beyond max_loras is left out too
    meta = ops.SegmentMeta.build(slots, torch.tensor(SCALES + [1.0]), max_loras=4)
    assert meta.seg_len.tolist() == [2, 0, 3, 2]
    assert meta.seg_start.tolist() == [0, 2, 2, 5]
    assert meta.order[:7].tolist() == [1, 8, 0, 5, 7, 3, 6]
    assert sorted(meta.order[7:].tolist()) == [2, 4, 9]
    assert meta.scales.dtype == torch.float32 and meta.scales.tolist() == SCALES + [1.0]

    buffers = [t.data_ptr() for t in (meta.order, meta.seg_start, meta.seg_len, meta.scales)]
    meta.build_into(torch.tensor([1, 1, -1, 0, 3, 3, 3, 3, 3, 3]), torch.ones(10))
    assert [t.data_ptr() for t in (meta.order, meta.seg_start, meta.seg_len, meta.scales)] == buffers
    assert meta.seg_len.tolist() == [1, 2, 0, 6] and meta.seg_start.tolist() == [0, 1, 3, 3]
    assert meta.order[:9].tolist() == [3, 0, 1, 4, 5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="10 rows"):
        meta.build_into(torch.zeros(3), torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mixed_unsorted_slots_empty_slots_and_padded_ranks(dtype):
    # Slot 1 holds weights but no row uses it, slot 2 has rank 0; ranks 5 and 12 are zero-padded to 16.
    _run(ops, SLOTS, SCALES, dtype)


def test_one_row():
    _run(ops, [3], [0.75], torch.float32)
    _run(ops, [-1], [1.0], torch.float32)


def test_many_rows_span_several_row_tiles_per_slot():
    gen = torch.Generator().manual_seed(3)
    slots = torch.randint(-1, 4, (70,), generator=gen).tolist()
    scales = (torch.rand(70, generator=gen) * 2).tolist()
    scales[5] = scales[40] = 0.0
    _run(ops, slots, scales, torch.float32)
    _run(ops, [2] * 69 + [0], [1.0] * 70, torch.bfloat16)  # 5 row tiles of one slot


def test_rank_above_one_tile_and_features_over_several_blocks():
    # max_rank 40 pads to a 64-wide rank tile, expanded in 32-wide chunks; 80 inputs take three 32-wide K steps;
    # 72 outputs take two 64-wide N tiles.
    _run(ops, [1, 0, 1, -1, 1], [1.0, 2.0, 0.5, 1.0, 1.0], torch.float32, max_loras=2, max_rank=40, ranks=(40, 3),
         in_f=80, out_f=72)


def test_shrink_scales_rows_and_leaves_other_rows_zero():
    A, _ = _slot_buffers(4, 16, 32, 48, (16, 5, 0, 12), torch.float32)
    x, _ = _inputs(len(SLOTS), 32, 48, torch.float32)
    h = ops.lora_shrink(x, A, ops.SegmentMeta.build(torch.tensor(SLOTS), torch.tensor(SCALES), 4))
    assert h.shape == (len(SLOTS), 16) and h.dtype == torch.float32
    for i, (s, c) in enumerate(zip(SLOTS, SCALES)):
        want = c * x[i].double() @ A[s].double().T if s >= 0 and c != 0 else torch.zeros(16, dtype=torch.float64)
        torch.testing.assert_close(h[i].double(), want, atol=1e-5, rtol=1e-5)


def test_no_live_rows_leaves_y_bit_identical():
    A, Bt = _slot_buffers(4, 16, 32, 48, (16, 5, 0, 12), torch.bfloat16)
    x, y0 = _inputs(3, 32, 48, torch.bfloat16)
    meta = ops.SegmentMeta.build(torch.tensor([-1, 0, 2]), torch.tensor([1.0, 0.0, 0.0]), 4)
    assert meta.seg_len.tolist() == [0, 0, 0, 0]
    assert torch.equal(ops.lora_apply_triton(y0.clone(), x, meta, A, Bt), y0)


def test_rank_limit_and_bad_inputs_are_rejected():
    ops.check_rank(ops.MAX_KERNEL_RANK)
    with pytest.raises(ValueError, match="max_lora_rank"):
        ops.check_rank(ops.MAX_KERNEL_RANK + 1)
    meta = ops.SegmentMeta.build(torch.zeros(2), torch.ones(2), 1)
    with pytest.raises(ValueError, match="max_lora_rank"):
        ops.lora_shrink(torch.zeros(2, 8), torch.zeros(1, ops.MAX_KERNEL_RANK + 1, 8), meta)
    with pytest.raises(ValueError, match="contiguous"):
        ops.lora_shrink(torch.zeros(2, 16)[:, ::2], torch.zeros(1, 4, 8), meta)
    with pytest.raises(ValueError, match="2 rows"):
        ops.lora_shrink(torch.zeros(3, 8), torch.zeros(1, 4, 8), meta)


def test_module_imports_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    name = "backends.lora.ops._triton_ops_without_triton"
    spec = importlib.util.spec_from_file_location(name, compiled.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    meta = module.SegmentMeta.build(torch.tensor([0, -1]), torch.ones(2), 1)
    assert meta.seg_len.tolist() == [1]
    with pytest.raises(RuntimeError, match="not installed"):
        module.lora_apply_triton(torch.zeros(2, 8), torch.zeros(2, 8), meta, torch.zeros(1, 4, 8),
                                 torch.zeros(1, 4, 8))


# -- CUDA, compiled ----------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1",
                                reason="needs a CUDA device and compiled (not interpreted) kernels")
BIG = dict(max_loras=16, in_f=576, out_f=1536)


def _big_case(n, seed):
    gen = torch.Generator().manual_seed(seed)
    slots = torch.randint(-1, 16, (n,), generator=gen)
    slots[slots == 7] = 8  # slot 7 holds weights but gets no row
    scales = torch.rand(n, generator=gen) * 2 - 0.5
    scales[::9] = 0.0
    return slots.tolist(), scales.tolist()


def _big_ranks(max_rank):
    return [0 if k == 3 else max(1, (max_rank * (k + 1)) // 16) for k in range(16)]  # slot 3 empty, rest 1..max


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,max_rank", [(64, 16), (300, 64)])  # decode-sized and prefill-sized tiles
def test_cuda_kernels_match_reference(dtype, n, max_rank):
    slots, scales = _big_case(n, seed=n)
    _run(compiled, slots, scales, dtype, max_rank=max_rank, ranks=_big_ranks(max_rank), device="cuda", **BIG)



@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("build_inside", [True, False], ids=["meta_in_graph", "meta_build_into"])
def test_cuda_graph_replay_with_new_slots_written_in_place(build_inside):
    dtype, n, max_rank = torch.bfloat16, 64, 16
    A, Bt = _slot_buffers(16, max_rank, 576, 1536, _big_ranks(max_rank), dtype, "cuda")
    x, y0 = _inputs(n, 576, 1536, dtype, "cuda")
    slots = torch.full((n,), -1, dtype=torch.long, device="cuda")  # static buffers the graph reads
    scales = torch.zeros(n, dtype=torch.float32, device="cuda")
    meta = compiled.SegmentMeta.build(slots, scales, 16)

    def step():
        m = compiled.SegmentMeta.build(slots, scales, 16) if build_inside else meta
        return compiled.lora_apply_triton(y0.clone(), x, m, A, Bt)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile the kernels before capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    for seed in range(3):
        new_slots, new_scales = _big_case(n, seed)
        slots.copy_(torch.tensor(new_slots))
        scales.copy_(torch.tensor(new_scales))
        if not build_inside:
            meta.build_into(slots, scales)
        graph.replay()
        torch.cuda.synchronize()
        _check(out, y0, _reference(y0, x, new_slots, new_scales, A, Bt), new_slots, new_scales, dtype)
