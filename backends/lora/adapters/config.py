"""A PEFT LoRA adapter's `adapter_config.json`: parsed into `LoRAConfig`, every problem collected at once (like
vLLM's `peft_helper`), and PEFT's rules for which modules it targets and with which rank and alpha. Torch-free."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from backends.lora.adapters.files import CONFIG_FILE, AdapterError

_DEFAULT_LAYER = re.compile(r".*\.[^.]*\.(\d+)\.")


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
    use_dora: bool = False  # DoRA: each targeted module also holds a magnitude vector (lora_magnitude_vector)

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
        r = pattern_value(self.rank_pattern, module, self.r)
        alpha = pattern_value(self.alpha_pattern, module, self.lora_alpha)
        return int(r), float(alpha)

    def scaling(self, module: str) -> float:
        r, alpha = self.rank_and_alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _layer_index(module: str, patterns: tuple[str, ...] | None) -> int | None:
    if patterns:
        match = re.match(rf".*\.(?:{'|'.join(patterns)})\.(\d+)\.", module)
    else:
        match = _DEFAULT_LAYER.match(module)
    return int(match.group(1)) if match else None


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: the first key matching the end of the module name wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def parse_config(raw: Any, problems: list[str]) -> LoRAConfig | None:
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
        use_dora=bool(raw.get("use_dora")),
    )


def same_model(a: str, b: str) -> bool:
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
    config = parse_config(raw, problems)
    if config is None:
        raise AdapterError(path, problems)
    return config
