"""The LoRA kernels compile for Hopper (sm_90) on this CPU machine: Triton lowers them to PTX and its bundled ptxas
assembles a cubin, no GPU needed. With the launch configurations `lora_shrink`/`lora_expand` pick, every dtype and
rank tile up to MAX_KERNEL_RANK assembles without register spills (local memory) and within the SM's shared memory.
This proves the kernels are valid GPU programs; that they are right on a GPU is test_kernels.py's CUDA half."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from backends.lora.ops import triton_ops  # noqa: E402

if type(triton_ops._shrink_kernel).__name__ == "InterpretedFunction":
    pytest.skip("kernels imported under TRITON_INTERPRET=1 cannot be compiled", allow_module_level=True)

HOPPER = GPUTarget("cuda", 90, 32)
SHARED_PER_BLOCK = 227 * 1024  # sm_90's opt-in maximum
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
DTYPES = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
RANK_TILES = [16, 32, 64, 128, triton_ops.MAX_KERNEL_RANK]
ROWS = {"decode": 8, "prefill": 512}  # the two row regimes of the tile configurations
INDEX = {"order_ptr": "*i64", "seg_start_ptr": "*i64", "seg_len_ptr": "*i64"}


def _compile(kernel, pointers: dict[str, str], ints: list[str], cfg: dict):
    constexprs = {k: v for k, v in cfg.items() if k.startswith("BLOCK")} | {"UPCAST": False}
    signature = pointers | INDEX | dict.fromkeys(ints, "i32") | dict.fromkeys(constexprs, "constexpr")
    signature = {name: signature[name] for name in kernel.arg_names}  # the kernel's own parameter order
    return triton.compile(ASTSource(kernel, signature, constexprs), target=HOPPER,
                          options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})


def _resources(compiled, tmp_path: Path) -> dict[str, int]:
    cubin = tmp_path / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    out = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


@pytest.fixture(autouse=True)
def _quiet_fp_fusion(monkeypatch):
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", os.environ.get("TRITON_DEFAULT_FP_FUSION", "1"))


def _assert_fits(compiled, tmp_path: Path) -> None:
    usage = _resources(compiled, tmp_path)
    assert usage["LOCAL"] == 0 and usage["STACK"] == 0, f"register spills: {usage}"
    assert 0 < usage["REG"] <= 255  # read from the cubin, not defaulted
    assert compiled.metadata.shared <= SHARED_PER_BLOCK, compiled.metadata.shared


@pytest.mark.parametrize("regime", ROWS)
@pytest.mark.parametrize("rank_tile", RANK_TILES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_shrink_compiles_for_sm90_without_spills(dtype, rank_tile, regime, tmp_path):
    cfg = triton_ops._shrink_config(ROWS[regime], rank_tile)
    compiled = _compile(triton_ops._shrink_kernel,
                        {"x_ptr": DTYPES[dtype], "a_ptr": DTYPES[dtype], "h_ptr": "*fp32", "scale_ptr": "*fp32"},
                        ["K", "R", "stride_xm", "stride_al", "stride_ar", "stride_hm"], cfg)
    _assert_fits(compiled, tmp_path)


@pytest.mark.parametrize("regime", ROWS)
@pytest.mark.parametrize("rank_tile", [16, triton_ops.MAX_KERNEL_RANK])  # the rank loops in chunks of <= 32
@pytest.mark.parametrize("dtype", DTYPES)
def test_expand_compiles_for_sm90_without_spills(dtype, rank_tile, regime, tmp_path):
    cfg = triton_ops._expand_config(ROWS[regime], rank_tile)
    compiled = _compile(triton_ops._expand_kernel,
                        {"h_ptr": "*fp32", "b_ptr": DTYPES[dtype], "y_ptr": DTYPES[dtype]},
                        ["N_OUT", "R", "stride_hm", "stride_bl", "stride_br", "stride_ym"], cfg)
    _assert_fits(compiled, tmp_path)
    assert "mma" in compiled.asm["ptx"] or dtype == "fp32"  # 16-bit tiles reach the tensor cores
