"""Diffusion LoRA files -> one validated `LoRAAdapter` keyed by pipeline module names (`transformer.x`, `unet.x`,
`text_encoder.x`, `text_encoder_2.x`), the names `PipelineLoRA` patches.

Accepted, in the forms people download or train:
- a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`) trained on the denoiser (transformer/UNet):
  read by `peft.load_adapter`;
- diffusers LoRA files (`pytorch_lora_weights.safetensors`, PEFT-style or the older `lora.down/up` keys, with
  alphas, alpha_pattern and rank_pattern from the file's `lora_adapter_metadata`) and kohya/A1111 files
  (`lora_unet_*`, `lora_te*_*` keys with `.alpha`), given as the file or its folder. These may carry LoCon weights
  for a UNet's convolutions (down [r, in, kh, kw] with the layer's kernel, up [out, r, 1, 1]), which are flattened
  to the [r, in*kh*kw] / [out, r] layout of the slot buffers.

A folder with `adapter_config.json` is PEFT's; a single file's format is sniffed once (`file_format`); a pure
converter per source turns the file's state dict into PEFT names under our component names
(`_convert_diffusers_to_peft`: the pipeline class's own `lora_state_dict`, then diffusers' key mappings), and
`peft.validate_pairs` validates every format the same way. Everything wrong is collected into one `AdapterError`
naming the file.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from backends.lora.adapters.config import LoRAConfig, pattern_value
from backends.lora.adapters.files import (
    CONFIG_FILE,
    DIFFUSERS_WEIGHT_FILE,
    AdapterError,
    AdapterNotFoundError,
    listed,
)
from backends.lora.adapters.peft import (
    MAGNITUDE,
    LoRAAdapter,
    PairRules,
    load_adapter,
    read_safetensors,
    validate_pairs,
)
from backends.lora.adapters.targets import TargetSpec

_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
_ALPHA = re.compile(r"^(?P<module>.+?)(?:\.lora_A(?:\.[A-Za-z0-9_-]+)?\.weight)?\.alpha$")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
PEFT_NAMES, DIFFUSERS = "peft-names", "diffusers"  # the single-file formats


def weights_file(path: Path) -> Path | None:
    """The single LoRA file of a diffusers/kohya adapter given as a file or as a folder holding one."""
    if path.is_file():
        return path
    preferred = path / DIFFUSERS_WEIGHT_FILE
    if preferred.is_file():
        return preferred
    files = sorted(path.glob("*.safetensors"))
    return files[0] if len(files) == 1 else None


def file_format(state: dict, denoiser: str) -> str:
    """A single file's keys: already PEFT names under our component names, or anything diffusers converts
    (kohya/A1111, diffusers' older `lora.down/up` keys, PEFT names under diffusers' component names)."""
    components = (denoiser, *TEXT_ENCODERS)
    if all(k.endswith(".alpha") or ((_KEY.match(k) or MAGNITUDE.match(k)) and k.split(".", 1)[0] in components)
           for k in state):
        return PEFT_NAMES
    return DIFFUSERS


def _convert_diffusers_to_peft(state: dict, pipeline_cls, denoiser: str, state_dict_kwargs: dict,
                               file: Path) -> tuple[dict, dict]:
    """(state dict, alphas) with PEFT names under our component names, by diffusers' own converters."""
    from diffusers.utils.state_dict_utils import (
        DIFFUSERS_OLD_TO_PEFT,
        convert_state_dict,
        convert_unet_state_dict_to_peft,
    )

    try:
        converted = pipeline_cls.lora_state_dict(dict(state), **state_dict_kwargs)
    except (ValueError, KeyError) as exc:  # diffusers' converters reject keys they cannot rename
        raise AdapterError(file, [f"not a LoRA file diffusers can read for {pipeline_cls.__name__}: "
                                  f"{exc}"]) from None
    state, alphas = (converted[0], converted[1] or {}) if isinstance(converted, tuple) else (converted, {})

    def convert(d: dict) -> dict:
        te = {k: v for k, v in d.items() if k.split(".", 1)[0] in TEXT_ENCODERS}
        rest = {k: v for k, v in d.items() if k not in te}
        return {**convert_unet_state_dict_to_peft(rest), **convert_state_dict(te, DIFFUSERS_OLD_TO_PEFT)}

    # diffusers' kohya conversion names the denoiser "unet"; a transformer pipeline's modules live elsewhere.
    rename = (lambda k: k) if denoiser == "unet" else (lambda k: re.sub(r"^unet\.", f"{denoiser}.", k))
    return ({rename(k): v for k, v in convert(state).items()},
            {rename(k): v for k, v in convert(alphas).items()})


def _metadata_alphas(file: Path) -> dict[str, dict]:
    """diffusers' `lora_adapter_metadata` (LoraConfig fields prefixed by component) per component."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get("lora_adapter_metadata")
        packed = json.loads(raw) if raw else {}
    except (OSError, ValueError):
        return {}
    out: dict[str, dict] = {}
    for key, value in packed.items() if isinstance(packed, dict) else ():
        component, _, field = key.partition(".")
        out.setdefault(component, {})[field] = value
    return out


def _served_name(module: str, spec: TargetSpec) -> str:
    """transformers 5's CLIPTextModel lost its `text_model` level (CLIPTextModelWithProjection kept it); files
    written against transformers 4 (most in the wild: SD1.5/SDXL text encoder 1, Flux's CLIP) still name it."""
    component, _, rest = module.partition(".")
    if module not in spec.modules and rest.startswith("text_model."):
        flat = f"{component}.{rest.removeprefix('text_model.')}"
        if flat in spec.modules:
            return flat
    return module


def _load_single_file(file: Path, spec: TargetSpec, denoiser: str, pipeline_cls, max_rank: int,
                      dtype: torch.dtype, state_dict_kwargs: dict) -> LoRAAdapter:
    problems: list[str] = []
    raw = read_safetensors(file, problems)
    if raw is None:
        raise AdapterError(file, problems)
    if any("dora_scale" in k for k in raw):
        raise AdapterError(file, ["kohya DoRA weights (dora_scale) are not supported: DoRA is read from PEFT-named "
                                  "files (<module>.lora_magnitude_vector), as diffusers' save_lora_weights writes"])
    if file_format(raw, denoiser) == PEFT_NAMES:
        state, alphas = raw, {}
    elif any("lora_magnitude_vector" in k for k in raw):
        raise AdapterError(file, ["DoRA magnitudes (lora_magnitude_vector) are read from PEFT-named files only (keys "
                                  "'<component>.<module>.lora_A.weight'), not next to diffusers/kohya names"])
    else:
        state, alphas = _convert_diffusers_to_peft(raw, pipeline_cls, denoiser, state_dict_kwargs, file)
    # Alphas left as tensors in a PEFT-style file ("<module>.alpha") count as alphas too.
    alphas = {**{k: v for k, v in state.items() if k.endswith(".alpha")}, **alphas}
    state = {k: v for k, v in state.items() if not k.endswith(".alpha")}

    found: dict[str, dict[str, torch.Tensor]] = {}
    file_name: dict[str, str] = {}  # served module name -> the file's (metadata patterns use the file's names)
    unexpected = []
    for key, tensor in state.items():
        match = _KEY.match(key) or MAGNITUDE.match(key)
        if match is None or not isinstance(tensor, torch.Tensor):
            unexpected.append(key)
        else:
            served = _served_name(match["module"], spec)
            file_name[served] = match["module"]
            found.setdefault(served, {})[match.groupdict().get("ab") or "M"] = tensor
    if unexpected:
        problems.append(f"unexpected tensors (not LoRA down/up weights): {listed(unexpected)}")
    alpha_of = {}
    for key, value in alphas.items():
        match = _ALPHA.match(key)
        if match:
            number = value.item() if isinstance(value, torch.Tensor) else value
            alpha_of[_served_name(match["module"], spec)] = float(number)
    meta = _metadata_alphas(file)

    unknown = set(found) - set(spec.modules)
    if unknown:
        served = {n.split(".", 1)[0] for n in spec.modules}
        foreign = sorted({n.split(".", 1)[0] for n in unknown} - served)
        hint = (f" (this {pipeline_cls.__name__} has no {', '.join(foreign)}: an adapter for another model "
                f"family?)") if foreign else ""
        problems.append(f"weights for modules this pipeline does not have or does not LoRA-enable (only linear "
                        f"layers of the denoiser and text encoders, and a UNet's convolutions, are): "
                        f"{listed(unknown)}{hint}")
    incomplete = {m for m, ab in found.items() if not {"A", "B"} <= set(ab)}
    if incomplete:
        problems.append(f"down/up (lora_A/lora_B) pair incomplete for {len(incomplete)} modules: "
                        f"{listed(incomplete)}")
    if not found:
        problems.append("no LoRA weights found")

    def metadata(name: str) -> tuple[dict, str]:
        """The component's metadata and the module's name within it (PEFT's patterns match its end)."""
        component, _, local = file_name[name].partition(".")
        return meta.get(component, {}), local

    def metadata_rank(name: str, r: int) -> str | None:
        cfg, local = metadata(name)
        want_r = pattern_value(cfg.get("rank_pattern") or {}, local, cfg.get("r", r))
        return None if want_r == r else f"{name}: rank {r}, but the file's metadata says r/rank_pattern {want_r}"

    def scaling(name: str, r: int) -> float:
        cfg, local = metadata(name)
        alpha = alpha_of.get(name, pattern_value(cfg.get("alpha_pattern") or {}, local, cfg.get("lora_alpha", r)))
        return float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)

    rules = PairRules("pipeline", rank=lambda _name: None, scaling=scaling, extra_check=metadata_rank)
    modules, pair_problems = validate_pairs({m: found[m] for m in set(found) - unknown - incomplete}, spec.modules,
                                            spec.kernels, max_rank, dtype, rules)
    problems += pair_problems
    if problems:
        raise AdapterError(file, problems)
    rank = max(m.A.shape[0] for m in modules.values())
    config = LoRAConfig(r=rank, lora_alpha=float(rank), target_modules=tuple(sorted(modules)))
    return LoRAAdapter(path=file, config=config, modules=modules)


def load_diffusion_adapter(path: str | Path, spec: TargetSpec, denoiser: str, pipeline_cls, max_rank: int,
                           dtype: torch.dtype = torch.float32, state_dict_kwargs: dict | None = None) -> LoRAAdapter:
    """A PEFT folder (denoiser), or a diffusers/kohya single file (or its folder), for the pipeline `spec`
    (LoRA-enabled convolutions in `spec.kernels`). `state_dict_kwargs` go to the pipeline class's
    `lora_state_dict` (diffusers passes SDXL's `unet_config`, which maps kohya's SGM block names onto the
    diffusers UNet)."""
    path = Path(path)
    if not path.exists():
        raise AdapterNotFoundError(path, "no such file or folder")
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        prefix = denoiser + "."
        local = lambda d: {n[len(prefix):]: v for n, v in d.items() if n.startswith(prefix)}  # noqa: E731
        sub = TargetSpec(local(spec.modules), spec.model_name, kernels=local(spec.kernels))
        adapter = load_adapter(path, sub, max_rank, dtype=dtype)
        adapter.modules = {prefix + n: m for n, m in adapter.modules.items()}
        return adapter
    file = weights_file(path)
    if file is None:
        raise AdapterError(path, [f"neither a PEFT folder ({CONFIG_FILE}) nor a folder with {DIFFUSERS_WEIGHT_FILE} "
                                  f"or exactly one .safetensors LoRA file"])
    if file.suffix != ".safetensors":
        raise AdapterError(file, ["only .safetensors LoRA files are accepted (pickled .bin/.ckpt files can run "
                                  "code when loaded)"])
    return _load_single_file(file, spec, denoiser, pipeline_cls, max_rank, dtype, state_dict_kwargs or {})
