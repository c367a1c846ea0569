"""LoRA stacks (several adapters per request, each with its scale): every batched path applies the sum of a row's
adapters' deltas, against a float64 reference; rows without LoRA stay bit-identical to the base."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backends.lora.ops.batch import LoRABatch
from backends.lora.ops.torch_ops import DENSE_MAX_ROW_SLOTS, conv_lora_apply, lora_apply, plan

# Per sequence: a stack of (slot, scale); [] = base. Mixed depths, shared and distinct adapters, a zero scale.
STACKS = [[(0, 0.7), (1, 0.3)], [(0, 1.0)], [], [(2, 0.5), (1, 1.0)], [(3, 1.0), (2, 0.0), (0, 2.0)], [(1, 0.25)]]


def _padded(stacks: list[list[tuple[int, float]]]) -> tuple[list[list[int]], list[list[float]]]:
    depth = max(1, max(len(s) for s in stacks))
    slots = [[s for s, _ in st] + [-1] * (depth - len(st)) for st in stacks]
    scales = [[c for _, c in st] + [0.0] * (depth - len(st)) for st in stacks]
    return slots, scales


def _reference(y0, x, stacks, A, Bt, tokens):
    out = y0.double().clone()
    for row in range(x.shape[0]):
        for slot, scale in stacks[row // tokens]:
            out[row] += scale * (x[row].double() @ A[slot].double().t()) @ Bt[slot].double()
    return out


@pytest.mark.parametrize("rows,tokens,mode", [(6, 1, "dense"), (6 * 30, 1, "grouped"), (6, 7, "segments")])
def test_a_stack_applies_the_sum_of_its_adapters_on_every_path(rows, tokens, mode):
    gen = torch.Generator().manual_seed(rows + tokens)
    K, R, n_in, n_out = 4, 8, 32, 24
    A, Bt = torch.randn(K, R, n_in, generator=gen), torch.randn(K, R, n_out, generator=gen)
    A[1, 5:], Bt[1, 5:] = 0, 0  # a rank-5 adapter, zero-padded
    stacks = [STACKS[i % len(STACKS)] for i in range(rows)]
    x = torch.randn(rows * tokens, n_in, generator=gen)
    y0 = torch.randn(rows * tokens, n_out, generator=gen)
    lora = LoRABatch.build(*_padded(stacks))
    batch = plan(lora, max_rank=R)
    assert (batch.row_mode if tokens == 1 else "segments") == mode
    assert lora.live_slots == {0, 1, 2, 3}
    got = lora_apply(y0.clone(), x, batch, A, Bt)
    torch.testing.assert_close(got.double(), _reference(y0, x, stacks, A, Bt, tokens), atol=1e-4, rtol=1e-5)
    base_rows = [i for i in range(rows * tokens) if not stacks[i // tokens]]
    assert torch.equal(got[base_rows], y0[base_rows])


def test_all_scales_zero_is_the_base_bit_for_bit_and_one_column_equals_the_single_adapter_form():
    gen = torch.Generator().manual_seed(0)
    A, Bt = torch.randn(3, 4, 8, generator=gen), torch.randn(3, 4, 6, generator=gen)
    x, y0 = torch.randn(12, 8, generator=gen), torch.randn(12, 6, generator=gen)
    zero = plan(LoRABatch.build([[0, 1], [2, -1]], [[0.0, 0.0], [0.0, 0.0]]), max_rank=4)
    assert zero.empty and torch.equal(lora_apply(y0.clone(), x, zero, A, Bt), y0)
    for tokens in (1, 6):
        n = 12 // tokens
        slots, scales = [i % 3 - 1 for i in range(n)], [0.5 + i for i in range(n)]
        flat = lora_apply(y0.clone(), x, plan(LoRABatch.build(slots, scales), max_rank=4), A, Bt)
        column = lora_apply(y0.clone(), x, plan(LoRABatch.build([[s] for s in slots], [[c] for c in scales]),
                                                max_rank=4), A, Bt)
        assert torch.equal(flat, column)


def test_stack_shapes_must_agree():
    with pytest.raises(ValueError, match="slot ids of shape"):
        LoRABatch.build([[0, 1]], [[1.0]])
    assert 6 * 4 <= DENSE_MAX_ROW_SLOTS  # the dense case above really is dense


def test_conv_stack_sums_each_adapters_locon_delta():
    gen = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    R, K = 2, 3
    A = torch.randn(K, R, 3 * 9, generator=gen)
    Bt = torch.randn(K, R, 5, generator=gen)
    stacks = [[(0, 0.7), (2, 0.3)], [], [(1, 1.0)]]
    x = torch.randn(3, 3, 8, 8, generator=gen)
    with torch.no_grad():
        y0 = conv(x)
        got = conv_lora_apply(y0.clone(), x, plan(LoRABatch.build(*_padded(stacks)), max_rank=R), A, Bt, conv, 0, 3)
        expected = y0.clone()
        for row, stack in enumerate(stacks):
            for slot, scale in stack:
                down = torch.nn.functional.conv2d(x[row:row + 1], A[slot].view(R, 3, 3, 3), None, 2, 1)
                expected[row] += scale * torch.einsum("rhw,ro->ohw", down[0], Bt[slot])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1], y0[1])
