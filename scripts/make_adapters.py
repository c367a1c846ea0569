"""Make PEFT LoRA adapters with random weights (for tests and benchmarks) with PEFT's own save_pretrained.

    .venv/bin/python -m scripts.make_adapters --out .cache/adapters/random --count 8 --rank 16

Also holds `tiny_llama()`, the small randomly initialised Llama the tests use next to SmolLM2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from backends.settings import cache_dir, default_llm_model_path

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0):
    """A 2-layer Llama (hidden 64, GQA 4/2 heads) with random weights, built from a config: no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    model.config.name_or_path = "tiny-random-llama"
    return model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json")


def random_smollm2(dest: Path, tokenizer_dir: Path | None = None, seed: int = 0, num_layers: int | None = None) -> Path:
    """A Llama with SmolLM2-135M's shape and random weights, saved with SmolLM2's tokenizer files: for machines
    that have the code but not the weights (the GPU check). Correctness there compares against transformers/PEFT
    on the same random weights."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    if (dest / "model.safetensors").is_file():
        return dest
    source = tokenizer_dir or default_llm_model_path()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=num_layers or 30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(dest)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, dest / name)
    if not (dest / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {source}: the random model needs SmolLM2's tokenizer files")
    return dest


def load_smollm2():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_llm_model_path(), dtype=torch.float32).eval()


def make_random_adapter(model_factory, out: Path, seed: int = 0, std: float = 0.02, base_name: str | None = None,
                        **lora_config) -> Path:
    """Wrap a fresh base model with PEFT's LoraConfig(**lora_config), randomise lora_A/B, save to `out`."""
    return make_random_adapters(model_factory, [out], [seed], std, base_name, **lora_config)[0]


def make_random_adapters(model_factory, outs: list[Path], seeds: list[int], std: float = 0.02,
                         base_name: str | None = None, **lora_config) -> list[Path]:
    """Many random adapters with the same config: one PEFT-wrapped model, re-randomised and saved per folder."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model_factory(), LoraConfig(**lora_config))
    if base_name is not None:
        peft_model.peft_config["default"].base_model_name_or_path = base_name
    for out, seed in zip(tqdm(outs, desc="random adapters", unit="adapter"), seeds):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        peft_model.save_pretrained(out)
    return outs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=cache_dir() / "adapters" / "random")
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--targets", nargs="+", default=ALL_PROJECTIONS)
    args = p.parse_args()
    todo = [i for i in range(args.count) if not (args.out / f"lora{i}" / "adapter_model.safetensors").is_file()]
    if todo:
        make_random_adapters(load_smollm2, [args.out / f"lora{i}" for i in todo], todo, r=args.rank,
                             lora_alpha=args.alpha, target_modules=args.targets)
    print(args.out)


if __name__ == "__main__":
    main()
