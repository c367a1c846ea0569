"""PEFT LoRA adapters: read `adapter_config.json` + weights, check them against the served model, fold the scaling.

Every problem found is collected and raised together in one `AdapterError` naming the adapter folder, so a user
fixes a broken adapter in one round. The result holds, per target module, `A` [r, in] and `Bt` = B^T [r, out]
with alpha/r (alpha/sqrt(r) for rsLoRA) already multiplied in.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from backends.errors import InvalidArgument, NotFound

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
# safetensors refuses headers above 100 MB; a larger length field is garbage or an attack, not an adapter.
MAX_HEADER_BYTES = 100_000_000
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
_DEFAULT_LAYER = re.compile(r".*\.[^.]*\.(\d+)\.")
# PEFT saves the base weight of an lm_head it targets (save_embedding_layers="auto"): a copy, not a delta.
_BASE_COPY = re.compile(r"^(?:base_model\.model\.)?(?P<module>(?:.+\.)?lm_head)\.base_layer\.weight$")
_MAX_LISTED = 6


class AdapterError(InvalidArgument):
    """The adapter exists but cannot be served; `problems` lists everything wrong with it."""

    def __init__(self, path: str | Path, problems: list[str]):
        self.path = str(path)
        self.problems = problems
        super().__init__(f"invalid LoRA adapter at {path}: " + "; ".join(problems))


class AdapterNotFoundError(NotFound):
    def __init__(self, path: str | Path, detail: str = "no such folder"):
        self.path = str(path)
        super().__init__(f"LoRA adapter not found at {path}: {detail}")


@dataclass(frozen=True)
class TargetSpec:
    """What a served model can take: its LoRA-enabled linear modules, name -> (in_features, out_features)."""

    modules: Mapping[str, tuple[int, int]]
    model_name: str | None = None  # compared with the adapter's base_model_name_or_path
    # Fused module -> its parts (`backends.lora.targets.PackedPart`: name, first output row, rows), so adapters
    # trained on the parts (q/k/v_proj) load onto the fused layer (qkv_proj).
    packed: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    # Convolutions (LoCon) -> (in_channels, kh, kw); their `modules` entry is (in_channels * kh * kw, out).
    kernels: Mapping[str, tuple[int, int, int]] = field(default_factory=dict)

    def with_parts(self) -> dict[str, tuple[int, int]]:
        """Every module an adapter may name: the layers and the parts of fused layers."""
        parts = {p.name: (self.modules[f][0], p.size) for f, ps in self.packed.items() for p in ps}
        return {**self.modules, **parts}


@dataclass(frozen=True)
class LoRAConfig:
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None

    def targets(self, module: str) -> bool:
        """PEFT's rule: a regex string must match the whole name; list entries match the name or its suffix,
        then `layers_to_transform` keeps only the listed layer indices."""
        if isinstance(self.target_modules, str):
            if self.target_modules == "all-linear":
                return not module.endswith("lm_head")
            return re.fullmatch(self.target_modules, module) is not None
        hit = any(module == t or module.endswith("." + t) for t in self.target_modules)
        if hit and self.layers_to_transform is not None:
            hit = _layer_index(module, self.layers_pattern) in self.layers_to_transform
        return hit

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        r = _pattern_value(self.rank_pattern, module, self.r)
        alpha = _pattern_value(self.alpha_pattern, module, self.lora_alpha)
        return int(r), float(alpha)

    def scaling(self, module: str) -> float:
        r, alpha = self.rank_and_alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


@dataclass
class ModuleLoRA:
    A: torch.Tensor  # [r, in]
    Bt: torch.Tensor  # [r, out]: B transposed (the slot buffers' layout), scaling folded in


@dataclass
class LoRAAdapter:
    path: Path
    config: LoRAConfig
    modules: dict[str, ModuleLoRA]

    @property
    def rank(self) -> int:
        return max(m.A.shape[0] for m in self.modules.values())

    @property
    def nbytes(self) -> int:
        return sum(m.A.nbytes + m.Bt.nbytes for m in self.modules.values())


def _layer_index(module: str, patterns: tuple[str, ...] | None) -> int | None:
    if patterns:
        match = re.match(rf".*\.(?:{'|'.join(patterns)})\.(\d+)\.", module)
    else:
        match = _DEFAULT_LAYER.match(module)
    return int(match.group(1)) if match else None


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: the first key matching the end of the module name wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _listed(names: list[str] | set[str]) -> str:
    names = sorted(names)
    more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def _parse_config(raw: Any, problems: list[str]) -> LoRAConfig | None:
    if not isinstance(raw, dict):
        problems.append(f"{CONFIG_FILE} must hold a JSON object")
        return None
    peft_type = str(raw.get("peft_type") or "")
    if peft_type.upper() != "LORA":
        problems.append(f"peft_type is {peft_type or 'missing'!r}, only LORA adapters are supported")
    for key in ("r", "lora_alpha", "target_modules"):
        if raw.get(key) in (None, "", []):
            problems.append(f"'{key}' is missing from {CONFIG_FILE}")
    r, alpha = raw.get("r"), raw.get("lora_alpha")
    if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r <= 0):
        problems.append(f"'r' must be a positive integer, got {r!r}")
    if alpha is not None and (not isinstance(alpha, (int, float)) or isinstance(alpha, bool)):
        problems.append(f"'lora_alpha' must be a number, got {alpha!r}")
    if raw.get("use_dora"):
        problems.append("DoRA adapters (use_dora: true) are not supported")
    if raw.get("modules_to_save"):
        problems.append(f"modules_to_save {raw['modules_to_save']} is not supported (only LoRA deltas are served)")
    if (raw.get("bias") or "none") != "none":
        problems.append(f"bias {raw['bias']!r} is not supported, only 'none'")
    if raw.get("lora_bias"):
        problems.append("lora_bias: true is not supported")
    targets = raw.get("target_modules")
    if targets is not None and not isinstance(targets, (str, list)):
        problems.append(f"'target_modules' must be a list or a regex string, got {type(targets).__name__}")
    if isinstance(targets, str) and targets != "all-linear":
        try:
            re.compile(targets)
        except re.error as exc:
            problems.append(f"'target_modules' regex {targets!r} is invalid: {exc}")
    layers = raw.get("layers_to_transform")
    pattern = raw.get("layers_pattern")
    if layers is not None and isinstance(targets, str):
        problems.append("layers_to_transform cannot be combined with a regex target_modules (PEFT's rule)")
    if problems:
        return None
    return LoRAConfig(
        r=r,
        lora_alpha=float(alpha),
        target_modules=targets if isinstance(targets, str) else tuple(targets),
        use_rslora=bool(raw.get("use_rslora")),
        rank_pattern=dict(raw.get("rank_pattern") or {}),
        alpha_pattern=dict(raw.get("alpha_pattern") or {}),
        layers_to_transform=(layers,) if isinstance(layers, int) else tuple(layers) if layers else None,
        layers_pattern=(pattern,) if isinstance(pattern, str) else tuple(pattern) if pattern else None,
        fan_in_fan_out=bool(raw.get("fan_in_fan_out")),
        base_model_name_or_path=raw.get("base_model_name_or_path"),
    )


def _read_safetensors(file: Path, problems: list[str]) -> dict[str, torch.Tensor] | None:
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


def finalize_modules(modules: dict[str, ModuleLoRA], scaling: Callable[[str], float],
                     dtype: torch.dtype) -> list[str]:
    """In place: `Bt` (given as B [out, r]) becomes B^T * scaling in `dtype`, `A` contiguous in `dtype`.
    Returns the modules holding NaN/Inf values (checked before any rounding)."""
    not_finite: list[str] = []
    tensors = [t for m in modules.values() for t in (m.A, m.Bt)]
    if tensors and not bool(torch.isfinite(_magnitudes(tensors)).all()):
        not_finite = [n for n, m in modules.items()
                      if not (torch.isfinite(m.A).all() and torch.isfinite(m.Bt).all())]
    for name, m in modules.items():
        m.A = m.A.to(dtype).contiguous()
        # One transposing copy at load (scaling folded in) makes every later host -> slot promotion a memcpy.
        m.Bt = torch.mul(m.Bt.t().to(dtype), scaling(name), out=torch.empty(m.Bt.shape[::-1], dtype=dtype))
    return not_finite


def _same_model(a: str, b: str) -> bool:
    norm = lambda s: s.rstrip("/").split("/")[-1].lower()  # noqa: E731
    return a == b or norm(a) == norm(b)


def read_config(path: Path) -> LoRAConfig:
    problems: list[str] = []
    file = path / CONFIG_FILE
    if not file.is_file():
        raise AdapterError(path, [f"{CONFIG_FILE} is missing"])
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(path, [f"{CONFIG_FILE} is not valid JSON: {exc}"]) from None
    config = _parse_config(raw, problems)
    if config is None:
        raise AdapterError(path, problems)
    return config


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
    if config.base_model_name_or_path and spec.model_name and not _same_model(
        config.base_model_name_or_path, spec.model_name
    ):
        message = f"trained for '{config.base_model_name_or_path}', served model is '{spec.model_name}'"
        if refuse_other_base:
            problems.append(message)
        else:
            log.warning("LoRA adapter %s: %s; loading anyway", path, message)

    if (path / SAFETENSORS_FILE).is_file():
        state = _read_safetensors(path / SAFETENSORS_FILE, problems)
    elif (path / BIN_FILE).is_file():
        state = _read_bin(path / BIN_FILE, problems)
    else:
        problems.append(f"no weights: neither {SAFETENSORS_FILE} nor {BIN_FILE} exists")
        state = None
    if state is None:
        raise AdapterError(path, problems)

    found: dict[str, dict[str, torch.Tensor]] = {}
    unexpected: list[str] = []
    for key, tensor in state.items():
        match = _KEY.match(key)
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
        problems.append(f"unexpected tensors (not lora_A/lora_B weights): {_listed(unexpected)}")

    nameable = spec.with_parts()
    expected = {m for m in nameable if config.targets(m)}
    for fused, parts in spec.packed.items():  # an adapter names either the fused layer or its parts, not both
        names = {p.name for p in parts}
        if fused in found and names & set(found):
            problems.append(f"tensors for both {fused} and its parts {_listed(names & set(found))}: an adapter "
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
                        f"{_listed(unknown)}")
    not_targeted = (set(found) & set(nameable)) - expected
    if not_targeted:
        problems.append(f"tensors for modules outside target_modules: {_listed(not_targeted)}")
    missing = {m for m in expected if set(found.get(m, {})) != {"A", "B"}}
    if expected and missing:
        problems.append(f"lora_A/lora_B tensors missing for {len(missing)} targeted modules: {_listed(missing)}")

    modules: dict[str, ModuleLoRA] = {}
    bad_shape: list[str] = []
    too_big: list[str] = []
    for name in sorted(expected - missing):
        r, _ = config.rank_and_alpha(name)
        pair = checked_pair(name, found[name]["A"], found[name]["B"], *nameable[name], spec.kernels.get(name), r)
        if isinstance(pair, str):
            bad_shape.append(pair)
            continue
        a, b = pair
        if r > max_rank:
            too_big.append(f"{name} (rank {r})")
        modules[name] = ModuleLoRA(A=a, Bt=b)
    not_finite = finalize_modules(modules, config.scaling, dtype)
    problems += fuse_parts(modules, spec, max_rank)
    if bad_shape:
        problems.append(f"shape mismatch with the served model at {len(bad_shape)} modules, e.g. {bad_shape[0]}")
    if too_big and config.r <= max_rank:
        problems.append(f"rank_pattern ranks exceed max_lora_rank {max_rank}: {_listed(too_big)}")
    if not_finite:
        problems.append(f"NaN or Inf values in the weights of {len(not_finite)} modules: {_listed(not_finite)}")
    if problems:
        raise AdapterError(path, problems)
    return LoRAAdapter(path=path, config=config, modules=modules)


def checked_pair(name: str, a: torch.Tensor, b: torch.Tensor, fan_in: int, fan_out: int,
                 kernel: tuple[int, int, int] | None, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | str:
    """(A [r, fan_in], B [fan_out, r]) in the slot layout, or what is wrong with the pair's shapes. A conv layer
    (`kernel` = (in, kh, kw)) takes LoCon's down [r, in, kh, kw] and up [out, r, 1, 1], flattened. `rank`: the
    rank the config promises (None: whatever A has)."""
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


def fuse_parts(modules: dict[str, ModuleLoRA], spec: TargetSpec, max_rank: int) -> list[str]:
    """In place: the parts of each fused layer (scaling already folded in) become one LoRA on it, A stacked by
    rows and B^T block-diagonal, so the fused output's rows of part p get exactly B_p A_p x. Returns problems."""
    problems = []
    for fused, parts in spec.packed.items():
        present = [p for p in parts if p.name in modules]
        if not present:
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
