"""Which layers of a model take LoRA (`TargetSpec`: what a served model offers adapters), which layers of a
causal LM are patched, and how adapters trained on separate projections map onto fused ones.

The default is derived from the architecture rather than from layer names: every `nn.Linear` inside the decoder
blocks (the model's `ModuleList` of `num_hidden_layers` blocks). That covers Llama/Mistral/Qwen/Gemma
(`q_proj` ... `down_proj`), Phi-3's fused `qkv_proj`/`gate_up_proj`, GPT-NeoX's `query_key_value`/`dense_*` and
anything else built from linears, without a per-family table. `lora_target_modules` narrows or widens it with
PEFT's semantics (a regex matched against the whole name, or a list of names/suffixes; `all-linear` is the
default set and `lm_head` adds the output projection).

Packed projections (vLLM's `packed_modules_mapping`): a fused layer's output rows are its parts' outputs side by
side, so an adapter trained on the parts becomes one LoRA on the fused layer: A stacked by rows, B block-diagonal.
Any ranks per part work; the fused rank is their sum.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

from torch import nn

# Fused layer name -> its parts in output-row order, for the model types known to lay them out so (CodeGen's
# `qkv_proj`, for one, interleaves q, v, k: its adapters must target the fused layer).
PACKED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
PACKED_MODEL_TYPES = {"phi3"}  # Phi-3, Phi-3.5, Phi-4-mini
ALL_LINEAR = "all-linear"
LM_HEAD = "lm_head"

Predicate = Callable[[str, nn.Module], bool]


@dataclass(frozen=True)
class PackedPart:
    name: str  # full module name of the part, e.g. model.layers.0.self_attn.q_proj
    offset: int  # first output row of the part in the fused layer
    size: int


@dataclass(frozen=True)
class TargetSpec:
    """What a served model can take: its LoRA-enabled layers, name -> (in_features, out_features)."""

    modules: Mapping[str, tuple[int, int]]
    model_name: str | None = None  # compared with the adapter's base_model_name_or_path
    # Fused layer -> its parts, so adapters trained on the parts (q/k/v_proj) load onto the fused layer (qkv_proj).
    packed: Mapping[str, tuple[PackedPart, ...]] = field(default_factory=dict)
    # Convolutions (LoCon) -> (in_channels, kh, kw); their `modules` entry is (in_channels * kh * kw, out).
    kernels: Mapping[str, tuple[int, int, int]] = field(default_factory=dict)

    def with_parts(self) -> dict[str, tuple[int, int]]:
        """Every module an adapter may name: the layers and the parts of fused layers."""
        parts = {p.name: (self.modules[f][0], p.size) for f, ps in self.packed.items() for p in ps}
        return {**self.modules, **parts}


def parse_target_modules(value: str | None) -> str | tuple[str, ...] | None:
    """The `lora_target_modules` model parameter: empty = the architecture default; a JSON list or a
    comma-separated list of names/suffixes; anything else is a regex over full module names."""
    text = (value or "").strip()
    if not text or text == ALL_LINEAR:
        return None
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"lora_target_modules {text!r} is not a valid JSON list: {exc}") from None
        if not isinstance(items, list) or not items or not all(isinstance(i, str) and i for i in items):
            raise ValueError(f"lora_target_modules {text!r} must be a non-empty list of module names")
        return tuple(items)
    if "," in text or re.fullmatch(r"[A-Za-z0-9_.]+", text):
        return tuple(p.strip() for p in text.split(",") if p.strip())
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"lora_target_modules regex {text!r} is invalid: {exc}") from None
    return text


def decoder_blocks(model: nn.Module) -> str:
    """Name of the ModuleList holding the decoder blocks (one entry per hidden layer)."""
    config = getattr(model, "config", None)
    config = config.get_text_config(decoder=True) if config is not None else None
    layers = getattr(config, "num_hidden_layers", None)
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    exact = [n for n, m in lists if len(m) == layers]
    if exact:
        return exact[0]
    if lists:  # no config: the longest list of blocks
        return max(lists, key=lambda nm: len(nm[1]))[0]
    raise ValueError(f"{type(model).__name__} has no list of decoder blocks to put LoRA on")


def llm_targets(model: nn.Module, target_modules: str | tuple[str, ...] | None = None) -> Predicate:
    """Predicate over (name, module) choosing the linears to patch."""
    prefix = decoder_blocks(model) + "."

    def in_blocks(name: str, module: nn.Module) -> bool:
        return name.startswith(prefix) and isinstance(module, nn.Linear)

    if target_modules is None:
        return in_blocks
    if isinstance(target_modules, str):
        rx = re.compile(target_modules)
        return lambda name, module: isinstance(module, nn.Linear) and rx.fullmatch(name) is not None
    names = set(target_modules)
    default = ALL_LINEAR in names
    names.discard(ALL_LINEAR)
    # A part of a packed layer names the fused layer it lives in: `q_proj` on Phi-3 means `qkv_proj`.
    names |= {fused for fused, parts in PACKED_MODULES.items() if names & set(parts)}

    def listed(name: str, module: nn.Module) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        if default and in_blocks(name, module):
            return True
        return any(name == t or name.endswith("." + t) for t in names)

    return listed


def packed_parts(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, tuple[PackedPart, ...]]:
    """For each patched fused layer, its parts' output-row ranges, from the model config's head counts."""
    config = model.config.get_text_config(decoder=True)
    if getattr(config, "model_type", None) not in PACKED_MODEL_TYPES:
        return {}
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    out: dict[str, tuple[PackedPart, ...]] = {}
    for name, layer in layers.items():
        stem, _, leaf = name.rpartition(".")
        if leaf == "qkv_proj":
            sizes = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
        elif leaf == "gate_up_proj":
            sizes = (layer.out_features // 2,) * 2
        else:
            continue
        if sum(sizes) != layer.out_features:  # an unknown layout: adapters must target the fused layer itself
            continue
        offsets = (0, *[sum(sizes[:i + 1]) for i in range(len(sizes) - 1)])
        out[name] = tuple(PackedPart(f"{stem}.{part}", off, size)
                          for part, off, size in zip(PACKED_MODULES[leaf], offsets, sizes))
    return out
