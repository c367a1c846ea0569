"""Tiny random-weight causal LMs of each model family we serve, built offline from configs (seconds, cached).

The families differ in structure, not in weights: fused projections (Phi-3 `qkv_proj`/`gate_up_proj`, GPT-NeoX
`query_key_value`), q/k/v biases (Qwen2), q/k norms (Qwen3), sliding-window attention on every layer (Mistral) or
on some (Gemma-2, Gemma-3, Qwen3 with `use_sliding_window`), embedding scaling and logit soft-capping (Gemma).
A model of a few layers with a small hidden size proves the serving code paths for each; all share one byte-level
tokenizer with a ChatML template (the families' real tokenizers are not reachable offline and are not needed).
Sliding windows are 8 tokens, so test prompts of a few dozen tokens cross them.

    python -m scripts.llm_families            # every family into .cache/models/tiny-random-<family>
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import torch

from backends.settings import cache_dir

log = logging.getLogger("llm_families")

RECIPE_VERSION = 1
STAMP = "fixture_recipe.json"
WINDOW = 8
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB = 256 + len(SPECIALS)
PAD_ID, EOS_ID = 256, 258
# Shared by every family: small, but wide enough (4 query / 2 KV heads) to exercise GQA.
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=512, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=None,
               initializer_range=0.2, tie_word_embeddings=False)


def _config(family: str):
    import transformers as tf

    gqa = dict(num_key_value_heads=2, head_dim=16)
    if family == "llama":
        return tf.LlamaConfig(**_COMMON, **gqa)
    if family == "qwen2":  # q/k/v projections carry biases
        return tf.Qwen2Config(**_COMMON, **gqa)
    if family == "qwen3":  # q/k norms; hybrid: layer 0 full attention, layer 1 sliding window
        return tf.Qwen3Config(**_COMMON, **gqa, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    if family == "mistral":  # a sliding window on every layer
        return tf.MistralConfig(**_COMMON, **gqa, sliding_window=WINDOW)
    if family == "gemma":  # embeddings scaled by sqrt(hidden), GeGLU
        return tf.GemmaConfig(**_COMMON, **gqa)
    if family == "gemma2":  # alternating sliding/full layers, attention and final logit soft-capping
        return tf.Gemma2Config(**_COMMON, **gqa, sliding_window=WINDOW, query_pre_attn_scalar=16)
    if family == "gemma3":  # sliding/full with separate rope bases, q/k norms
        return tf.Gemma3TextConfig(**_COMMON, **gqa, sliding_window=WINDOW, query_pre_attn_scalar=16,
                                   layer_types=["sliding_attention", "full_attention"])
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(**_COMMON, num_key_value_heads=2)
    if family == "gpt_neox":  # fused, head-interleaved query_key_value; partial rotary; parallel residual
        return tf.GPTNeoXConfig(**{k: v for k, v in _COMMON.items() if k != "head_dim"}, rotary_pct=0.25)
    raise KeyError(family)


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "phi3", "gpt_neox")


def family_dir(family: str) -> Path:
    return cache_dir() / "models" / f"tiny-random-{family.replace('_', '-')}"


def byte_tokenizer():
    """One token per byte plus ChatML specials; decodes any id sequence (no merges, no unknown ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=SPECIALS[0], eos_token=SPECIALS[2])
    fast.chat_template = CHATML
    assert len(fast) == VOCAB and fast.convert_tokens_to_ids(SPECIALS[2]) == EOS_ID
    return fast


def build(family: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family), dtype=torch.float32).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = PAD_ID, EOS_ID
    return model


def make_family(family: str, force: bool = False) -> Path:
    """Build (once) and return the folder of `family`; a stamp records the recipe version."""
    target = family_dir(family)
    stamp = target / STAMP
    if not force and stamp.is_file() and json.loads(stamp.read_text()).get("version") == RECIPE_VERSION:
        return target
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    build(family).save_pretrained(staging)
    byte_tokenizer().save_pretrained(staging)
    (staging / STAMP).write_text(json.dumps({"version": RECIPE_VERSION, "family": family}))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    log.info("%s: built at %s", family, target)
    return target


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("families", nargs="*", metavar="FAMILY", help=f"default: all of {', '.join(FAMILIES)}")
    p.add_argument("--force", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    unknown = set(args.families) - set(FAMILIES)
    if unknown:
        p.error(f"unknown families {sorted(unknown)}; choose from {', '.join(FAMILIES)}")
    for family in args.families or FAMILIES:
        print(make_family(family, args.force))


if __name__ == "__main__":
    main()
