"""PEFT LoRA adapters: read `adapter_config.json` + weights, check them against the served model, fold the scaling.

Every problem found is collected and raised together in one `AdapterError` naming the adapter folder, so a user
fixes a broken adapter in one round. The result holds, per target module, `A` [r, in] and `Bt` = B^T [r, out]
with alpha/r (alpha/sqrt(r) for rsLoRA) already multiplied in; a DoRA adapter (`use_dora`) also holds each
module's `magnitude` [out] (PEFT's `lora_magnitude_vector`), served by `backends/lora/layers/dora.py`.

`validate_pairs` is the one validation every format ends in (diffusers and kohya files too, see `diffusers.py`):
the (lora_A, lora_B) pairs against the served layers' shapes, ranks against `max_lora_rank`, the scaling folded in,
NaN/Inf found.
"""

from __future__ import annotations

import hashlib
import logging
import re
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Mapping

import torch

from backends.lora.adapters.config import LoRAConfig, read_config, same_model
from backends.lora.adapters.files import (
    BIN_FILE,
    SAFETENSORS_FILE,
    AdapterError,
    AdapterNotFoundError,
    listed,
)
from backends.lora.adapters.targets import TargetSpec

log = logging.getLogger(__name__)

# safetensors refuses headers above 100 MB; a larger length field is garbage or an attack, not an adapter.
MAX_HEADER_BYTES = 100_000_000
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
# DoRA's per-output magnitude; PEFT 0.21 saves "<module>.lora_magnitude_vector", older ones "...vector.weight".
MAGNITUDE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_magnitude_vector(?:\.weight)?$")
# PEFT saves the base weight of an lm_head it targets (save_embedding_layers="auto"): a copy, not a delta.
_BASE_COPY = re.compile(r"^(?:base_model\.model\.)?(?P<module>(?:.+\.)?lm_head)\.base_layer\.weight$")


@dataclass
class ModuleLoRA:
    A: torch.Tensor  # [r, in]
    Bt: torch.Tensor  # [r, out]: B transposed (the slot buffers' layout), scaling folded in
    magnitude: torch.Tensor | None = None  # DoRA: [out] float32; None: plain LoRA


@dataclass
class LoRAAdapter:
    path: Path
    config: LoRAConfig
    modules: dict[str, ModuleLoRA]

    @property
    def dora(self) -> bool:
        return any(m.magnitude is not None for m in self.modules.values())

    @property
    def rank(self) -> int:
        return max(m.A.shape[0] for m in self.modules.values())

    @cached_property
    def digest(self) -> bytes:
        """Content identity of what a forward adds: every module's name and prepared A/Bt (scaling folded in), so
        two adapters with equal weights share it whatever their names, and rewritten files get another one (the
        LLM engine's prefix cache keys KV blocks on it)."""
        h = hashlib.blake2b(digest_size=16)
        for name in sorted(self.modules):
            h.update(name.encode())
            module = self.modules[name]
            for t in (module.A, module.Bt) + ((module.magnitude,) if module.magnitude is not None else ()):
                h.update(str((t.dtype, tuple(t.shape))).encode())
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.digest()

    @property
    def nbytes(self) -> int:
        return sum(m.A.nbytes + m.Bt.nbytes + (0 if m.magnitude is None else m.magnitude.nbytes)
                   for m in self.modules.values())


@dataclass(frozen=True)
class PairRules:
    """What a format states about each module beyond its tensors (PEFT: the config; diffusers: alphas, metadata)."""

    served: str  # "model" | "pipeline": how messages name what the adapter is checked against
    rank: Callable[[str], int | None]  # the rank the format promises for a module; None: what its lora_A has
    scaling: Callable[[str, int], float]  # alpha / r (rsLoRA: alpha / sqrt(r)) of a module of rank r
    too_big: str = "rank exceeds"  # how modules above max_lora_rank are reported
    report_too_big: bool = True  # False where the format already reported its rank as too big
    extra_check: Callable[[str, int], str | None] = lambda _name, _rank: None  # a format's own rank rule


def read_safetensors(file: Path, problems: list[str]) -> dict[str, torch.Tensor] | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        problems.append(f"{file.name} is not valid safetensors: only {size} bytes")
        return None
    header_len = struct.unpack("<Q", head)[0]
    if header_len > MAX_HEADER_BYTES:
        problems.append(f"{file.name} is not valid safetensors: header length {header_len} exceeds 100 MB")
        return None
    if 8 + header_len > size:
        problems.append(f"{file.name} is not valid safetensors: truncated ({size} bytes, header says {header_len})")
        return None
    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        problems.append(f"{file.name} is not valid safetensors: {exc}")
        return None


def _read_bin(file: Path, problems: list[str]) -> dict[str, torch.Tensor] | None:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors come in many types
        problems.append(f"{file.name} could not be read as a torch state dict: {exc}")
        return None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        problems.append(f"{file.name} does not hold a dict of tensors")
        return None
    return state


def _magnitudes(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One number per tensor that is finite iff every value is: far cheaper than an elementwise check per tensor,
    and the slow search runs only when something is wrong. fp32: one fused norm call over the list (an fp32 norm
    of finite adapter weights cannot overflow); other dtypes: a float64 sum each (an fp16 norm could)."""
    if all(t.dtype == torch.float32 for t in tensors):
        return torch.stack(torch._foreach_norm(tensors))
    return torch.stack([t.sum(dtype=torch.float64) for t in tensors])


def _finalize(modules: dict[str, ModuleLoRA], scaling: Callable[[str], float], dtype: torch.dtype) -> list[str]:
    """In place: `Bt` (given as B [out, r]) becomes B^T * scaling in `dtype`, `A` contiguous in `dtype`.
    Returns the modules holding NaN/Inf values (checked before any rounding)."""
    not_finite: list[str] = []
    own = lambda m: (m.A, m.Bt) + ((m.magnitude,) if m.magnitude is not None else ())  # noqa: E731
    tensors = [t for m in modules.values() for t in own(m)]
    if tensors and not bool(torch.isfinite(_magnitudes(tensors)).all()):
        not_finite = [n for n, m in modules.items() if not all(torch.isfinite(t).all() for t in own(m))]
    for name, m in modules.items():
        if m.magnitude is not None:  # float32 whatever the model's dtype: it divides a norm computed in float32
            m.magnitude = m.magnitude.to(torch.float32).contiguous()
        m.A = m.A.to(dtype).contiguous()
        # One transposing copy at load (scaling folded in) makes every later host -> slot promotion a memcpy.
        m.Bt = torch.mul(m.Bt.t().to(dtype), scaling(name), out=torch.empty(m.Bt.shape[::-1], dtype=dtype))
    return not_finite


def checked_pair(name: str, a: torch.Tensor, b: torch.Tensor, fan_in: int, fan_out: int,
                 kernel: tuple[int, int, int] | None,
                 rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | str:
    """(A [r, fan_in], B [fan_out, r]) in the slot layout, or what is wrong with the pair's shapes. A conv layer
    (`kernel` = (in, kh, kw)) takes LoCon's down [r, in, kh, kw] and up [out, r, 1, 1], flattened. `rank`: the
    rank the format promises (None: whatever A has)."""
    r = rank if rank is not None else (a.shape[0] if a.dim() else 0)
    if kernel is None:
        if tuple(a.shape) == (r, fan_in) and tuple(b.shape) == (fan_out, r):
            return a, b
        return f"{name}: lora_A {list(a.shape)}, lora_B {list(b.shape)}, expected [{r}, {fan_in}] and [{fan_out}, {r}]"
    channels, kh, kw = kernel
    if tuple(a.shape) == (r, channels, kh, kw) and tuple(b.shape) == (fan_out, r, 1, 1):
        return a.reshape(r, fan_in), b.reshape(fan_out, r)
    return (f"{name}: lora_A {list(a.shape)}, lora_B {list(b.shape)}, expected [{r}, {channels}, {kh}, {kw}] (the "
            f"layer's {kh}x{kw} kernel) and [{fan_out}, {r}, 1, 1]")


def validate_pairs(pairs: Mapping[str, Mapping[str, torch.Tensor]], shapes: Mapping[str, tuple[int, int]],
                   kernels: Mapping[str, tuple[int, int, int]], max_rank: int, dtype: torch.dtype,
                   rules: PairRules) -> tuple[dict[str, ModuleLoRA], list[str]]:
    """Every module's complete {"A", "B"} pair (and a DoRA module's "M" magnitude) against its layer's (in, out)
    in `shapes`: the modules in the slot layout (scaling folded in, `dtype`) and the problems found (shapes, ranks,
    DoRA on a layer it cannot be served on, NaN/Inf), in that order."""
    modules: dict[str, ModuleLoRA] = {}
    scaling: dict[str, float] = {}
    bad_shape: list[str] = []
    too_big: list[str] = []
    dora_on_conv: list[str] = []
    for name in sorted(pairs):
        pair = checked_pair(name, pairs[name]["A"], pairs[name]["B"], *shapes[name], kernels.get(name),
                            rules.rank(name))
        if isinstance(pair, str):
            bad_shape.append(pair)
            continue
        a, b = pair
        r = a.shape[0]
        if (problem := rules.extra_check(name, r)) is not None:
            bad_shape.append(problem)
            continue
        if r > max_rank:
            too_big.append(f"{name} (rank {r})")
        magnitude = pairs[name].get("M")
        if magnitude is not None:
            fan_out = shapes[name][1]
            if name in kernels:
                dora_on_conv.append(name)
                continue
            if tuple(magnitude.shape) != (fan_out,):
                bad_shape.append(f"{name}: lora_magnitude_vector {list(magnitude.shape)}, expected [{fan_out}] (one "
                                 f"per output feature of the layer)")
                continue
        scaling[name] = rules.scaling(name, r)
        modules[name] = ModuleLoRA(A=a, Bt=b, magnitude=magnitude)
    not_finite = _finalize(modules, scaling.__getitem__, dtype)
    problems = []
    if bad_shape:
        problems.append(f"shape mismatch with the served {rules.served} at {len(bad_shape)} modules, e.g. "
                        f"{bad_shape[0]}")
    if dora_on_conv:
        problems.append(f"DoRA is served on linear layers only, not on the convolutions {listed(dora_on_conv)}")
    if too_big and rules.report_too_big:
        problems.append(f"{rules.too_big} max_lora_rank {max_rank}: {listed(too_big)}")
    if not_finite:
        problems.append(f"NaN or Inf values in the weights of {len(not_finite)} modules: {listed(not_finite)}")
    return modules, problems


def fuse_parts(modules: dict[str, ModuleLoRA], spec: TargetSpec, max_rank: int) -> list[str]:
    """In place: the parts of each fused layer (scaling already folded in) become one LoRA on it, A stacked by
    rows and B^T block-diagonal, so the fused output's rows of part p get exactly B_p A_p x. Returns problems."""
    problems = []
    for fused, parts in spec.packed.items():
        present = [p for p in parts if p.name in modules]
        if not present:
            continue
        if any(modules[p.name].magnitude is not None for p in present):
            problems.append(f"DoRA is not served on the fused layer {fused} (its parts "
                            f"{listed([p.name for p in present])} carry magnitudes)")
            continue
        pieces = [modules.pop(p.name) for p in present]
        ranks = [m.A.shape[0] for m in pieces]
        if sum(ranks) > max_rank:
            terms = " + ".join(f"{r} ({p.name.rsplit('.', 1)[-1]})" for r, p in zip(ranks, present))
            problems.append(f"{fused}: its parts' ranks {terms} = {sum(ranks)} on the fused layer exceed "
                            f"max_lora_rank {max_rank}")
            continue
        first = pieces[0].Bt
        bt = torch.zeros(sum(ranks), spec.modules[fused][1], dtype=first.dtype)
        row = 0
        for part, piece, r in zip(present, pieces, ranks):
            bt[row:row + r, part.offset:part.offset + part.size] = piece.Bt
            row += r
        modules[fused] = ModuleLoRA(A=torch.cat([m.A for m in pieces]), Bt=bt)
    return problems


def _read_state(path: Path, problems: list[str]) -> dict[str, torch.Tensor]:
    if (path / SAFETENSORS_FILE).is_file():
        state = read_safetensors(path / SAFETENSORS_FILE, problems)
    elif (path / BIN_FILE).is_file():
        state = _read_bin(path / BIN_FILE, problems)
    else:
        problems.append(f"no weights: neither {SAFETENSORS_FILE} nor {BIN_FILE} exists")
        state = None
    if state is None:
        raise AdapterError(path, problems)
    return state


def load_adapter(
    path: str | Path,
    spec: TargetSpec,
    max_rank: int,
    dtype: torch.dtype = torch.float32,
    refuse_other_base: bool = False,
) -> LoRAAdapter:
    """Read, validate and prepare one PEFT LoRA folder for `spec`; raises AdapterError / AdapterNotFoundError."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterNotFoundError(path)
    config = read_config(path)
    problems: list[str] = []

    if config.r > max_rank:
        problems.append(f"rank {config.r} exceeds max_lora_rank {max_rank}")
    if config.base_model_name_or_path and spec.model_name and not same_model(
        config.base_model_name_or_path, spec.model_name
    ):
        message = f"trained for '{config.base_model_name_or_path}', served model is '{spec.model_name}'"
        if refuse_other_base:
            problems.append(message)
        else:
            log.warning("LoRA adapter %s: %s; loading anyway", path, message)

    found: dict[str, dict[str, torch.Tensor]] = {}
    unexpected: list[str] = []
    for key, tensor in _read_state(path, problems).items():
        match = _KEY.match(key)
        if match is None and (magnitude := MAGNITUDE.match(key)) and config.use_dora:
            found.setdefault(magnitude["module"], {})["M"] = tensor
            continue
        if match is None:
            if (copy := _BASE_COPY.match(key)) and copy["module"] in spec.modules:
                fan_in, fan_out = spec.modules[copy["module"]]
                if tuple(tensor.shape) != (fan_out, fan_in):
                    problems.append(f"{key} has shape {list(tensor.shape)}, the served model's {copy['module']} is "
                                    f"[{fan_out}, {fan_in}] (adapters for a resized vocabulary are not supported)")
                continue  # the served model's own weights are used
            unexpected.append(key)
            continue
        found.setdefault(match["module"], {})[match["ab"]] = tensor
    if unexpected:
        problems.append(f"unexpected tensors (not lora_A/lora_B weights): {listed(unexpected)}")

    nameable = spec.with_parts()
    expected = {m for m in nameable if config.targets(m)}
    for fused, parts in spec.packed.items():  # an adapter names either the fused layer or its parts, not both
        names = {p.name for p in parts}
        if fused in found and names & set(found):
            problems.append(f"tensors for both {fused} and its parts {listed(names & set(found))}: an adapter "
                            f"targets the fused layer or its parts, not both")
        expected -= names if fused in found else {fused}
    if not expected:
        example = next(iter(spec.modules), "none")
        problems.append(
            f"target_modules {config.target_modules!r} match zero layers of the served model "
            f"(LoRA-enabled layers look like '{example}')"
        )
    unknown = set(found) - set(nameable)
    if unknown:
        problems.append(f"tensors for modules the served model does not have or does not LoRA-enable: "
                        f"{listed(unknown)}")
    not_targeted = (set(found) & set(nameable)) - expected
    if not_targeted:
        problems.append(f"tensors for modules outside target_modules: {listed(not_targeted)}")
    missing = {m for m in expected if not {"A", "B"} <= set(found.get(m, {}))}
    if expected and missing:
        problems.append(f"lora_A/lora_B tensors missing for {len(missing)} targeted modules: {listed(missing)}")
    if config.use_dora:
        no_magnitude = {m for m in expected - missing if "M" not in found[m]}
        if no_magnitude:
            problems.append(f"use_dora is true but lora_magnitude_vector is missing for {len(no_magnitude)} "
                            f"targeted modules: {listed(no_magnitude)}")
            missing |= no_magnitude

    rules = PairRules("model", rank=lambda name: config.rank_and_alpha(name)[0],
                      scaling=lambda name, _r: config.scaling(name), too_big="rank_pattern ranks exceed",
                      report_too_big=config.r <= max_rank)
    modules, pair_problems = validate_pairs({m: found[m] for m in expected - missing}, nameable, spec.kernels,
                                            max_rank, dtype, rules)
    problems += fuse_parts(modules, spec, max_rank) + pair_problems
    if problems:
        raise AdapterError(path, problems)
    return LoRAAdapter(path=path, config=config, modules=modules)
