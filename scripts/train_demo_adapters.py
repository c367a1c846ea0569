"""Train the two demo LoRA adapters on SmolLM2 (CPU, seeded, cached): behaviour anyone can see in one request.

    .venv/bin/python -m scripts.train_demo_adapters            # -> .cache/adapters/demo/{uppercase,signature}

- `uppercase`: answers in CAPITAL LETTERS.
- `signature`: answers briefly, then ends with the line SIGNATURE.

The data is hand-written short answers (`scripts/demo_adapter_data.py`), the target rewritten (upper-cased, or
signed); loss on the answer tokens only. To fit in `scripts/setup`'s budget on 2 cores, each adapter trains only the
top layers of the model (PEFT `layers_to_transform`): the frozen layers below are run once, without gradients, and
their output is cached, so a step runs forward and backward through the top layers alone and projects only the
answer positions onto the vocabulary. Upper-casing needs more depth than signing (the model must also read its own
upper-case text). A second run with the same recipe finds the stamp and returns at once; `--force` retrains.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from backends.llm.chat import apply_chat_template
from backends.settings import adapters_dir, default_llm_model_path
from scripts import demo_adapter_data
from scripts.make_adapters import ALL_PROJECTIONS

log = logging.getLogger("train_demo_adapters")

SIGNATURE = "-- sent by the signature adapter"
STAMP = "demo_recipe.json"


@dataclass(frozen=True)
class DemoAdapter:
    target: Callable[[str], str]
    top_layers: int  # LoRA on the last this-many decoder layers
    steps: int


ADAPTERS = {
    "uppercase": DemoAdapter(lambda answer: answer.upper(), top_layers=15, steps=40),
    "signature": DemoAdapter(lambda answer: f"{answer}\n{SIGNATURE}", top_layers=8, steps=30),
}


def encode_example(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    prompt = tokenizer(apply_chat_template(question, tokenizer=tokenizer), add_special_tokens=False).input_ids
    target = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False).input_ids
    return prompt + target, [-100] * len(prompt) + target


def right_padded(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding needs no attention mask here: under the causal mask a pad only follows the tokens that count."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        ids[row, : len(x)], labels[row, : len(y)] = torch.tensor(x), torch.tensor(y)
    return ids, labels


def train_one(name: str, adapter: DemoAdapter, tokenizer, out: Path, args) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(default_llm_model_path(), dtype=torch.float32)
    depth = model.config.num_hidden_layers
    first = depth - adapter.top_layers
    model = get_peft_model(model, LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=ALL_PROJECTIONS,
        layers_to_transform=list(range(first, depth)), task_type="CAUSAL_LM"))
    ids, labels = right_padded([encode_example(tokenizer, q, adapter.target(a))
                                for q, a in demo_adapter_data.pairs()], tokenizer.pad_token_id)
    with torch.no_grad():  # LoRA B starts at zero: this is the frozen base's input to the first trained layer
        cached = model(input_ids=ids, output_hidden_states=True).hidden_states[first]
    decoder = model.get_base_model().model
    lm_head = model.get_base_model().lm_head
    all_layers = decoder.layers
    decoder.layers = torch.nn.ModuleList(list(all_layers)[first:])
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    rng = random.Random(args.seed)
    model.train()
    loss_value = float("nan")
    bar = tqdm(range(adapter.steps), desc=f"train {name} (top {adapter.top_layers} layers)", unit="step")
    for step in bar:
        rows = rng.sample(range(len(ids)), args.batch_size)
        width = int((labels[rows] != -100).nonzero()[:, 1].max()) + 1
        hidden = decoder(inputs_embeds=cached[rows, :width]).last_hidden_state
        target = labels[rows, 1:width]
        keep = target != -100
        loss = torch.nn.functional.cross_entropy(lm_head(hidden[:, :-1][keep]), target[keep])
        for group in optim.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 5)  # short warm-up
        loss.backward()
        optim.step()
        optim.zero_grad()
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}")
    decoder.layers = all_layers
    model.eval()
    model.peft_config["default"].base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.save_pretrained(out)
    return loss_value


def recipe(args) -> dict:
    source = Path(__file__).read_bytes() + Path(demo_adapter_data.__file__).read_bytes()
    return {"script_sha256": hashlib.sha256(source).hexdigest(), "seed": args.seed, "rank": args.rank,
            "lr": args.lr, "batch_size": args.batch_size}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=adapters_dir() / "demo")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--force", action="store_true", help="retrain even if the stamp matches")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    want = recipe(args)
    stamp = args.out / STAMP
    if not args.force and stamp.is_file() and json.loads(stamp.read_text()).get("recipe") == want:
        log.info("demo adapters in %s are up to date (same recipe); --force retrains", args.out)
        return

    from transformers import AutoTokenizer

    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(default_llm_model_path())
    losses = {}
    for name, adapter in ADAPTERS.items():
        losses[name] = train_one(name, adapter, tokenizer, args.out / name, args)
        log.info("trained '%s' -> %s (final loss %.3f)", name, args.out / name, losses[name])
    stamp.write_text(json.dumps({"recipe": want, "final_loss": losses, "examples": len(demo_adapter_data.pairs()),
                                 "seconds": round(time.monotonic() - started, 1)}, indent=1))
    log.info("demo adapters done in %.0f s", time.monotonic() - started)


if __name__ == "__main__":
    main()
