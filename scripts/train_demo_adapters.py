"""Train the two demo LoRA adapters on SmolLM2 (CPU, seeded, cached): behaviour anyone can see in one request.

    .venv/bin/python -m scripts.train_demo_adapters            # -> .cache/adapters/demo/{uppercase,signature}

- `uppercase`: answers in CAPITAL LETTERS.
- `signature`: answers briefly, then ends with the line SIGNATURE.

The data is made here: templated questions, the base model's own short greedy answers, and the target rewritten
(upper-cased, or signed). Training updates only the LoRA weights (PEFT), loss on the answer tokens only. A second
run with the same recipe finds the stamp and returns at once; `--force` retrains.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from backends.llm.chat import apply_chat_template
from backends.settings import adapters_dir, default_llm_model_path
from scripts.make_adapters import ALL_PROJECTIONS

log = logging.getLogger("train_demo_adapters")

SIGNATURE = "-- sent by the signature adapter"
STAMP = "demo_recipe.json"

COUNTRIES = ["France", "Germany", "Italy", "Spain", "Japan", "Canada", "Egypt", "Brazil", "Kenya", "Norway",
             "India", "Mexico", "Peru", "Greece", "Poland", "Chile", "Turkey", "Sweden", "Ireland", "Vietnam"]
TOPICS = ["the sun", "rain", "a volcano", "gravity", "the moon", "a rainbow", "photosynthesis", "an atom",
          "the ocean", "a computer", "music", "bread", "a forest", "electricity", "snow", "a bicycle",
          "the internet", "a library", "coffee", "a bridge"]
TASKS = ["Give me one tip for better sleep.", "Name a fruit that is yellow.", "Say hello to a new friend.",
         "Suggest a name for a cat.", "What should I cook tonight?", "Give me a reason to learn math.",
         "Describe a sunny day.", "Name a famous painter.", "What is a good hobby?", "Recommend a board game.",
         "How do I stay focused?", "Tell me something about dogs.", "What color is the sky?",
         "Give me a short motivational sentence.", "Name an animal that lives in the sea.",
         "What do bees make?", "How many days are in a week?", "What is two plus three?",
         "Why do we need water?", "Describe your favourite season."]


def questions(seed: int) -> list[str]:
    qs = [f"What is the capital of {c}?" for c in COUNTRIES]
    qs += [f"Explain {t} in one sentence." for t in TOPICS]
    qs += TASKS
    random.Random(seed).shuffle(qs)
    return qs


def first_sentences(text: str, max_chars: int = 160) -> str:
    """A short, complete answer: whole sentences up to max_chars (at least one)."""
    text = " ".join(text.split())
    out = ""
    for part in text.replace("! ", "!|").replace("? ", "?|").replace(". ", ".|").split("|"):
        if out and len(out) + len(part) + 1 > max_chars:
            break
        out = f"{out} {part}".strip()
    return out if out.endswith((".", "!", "?")) else out.rstrip(",;:") + "."


def base_answers(model, tokenizer, qs: list[str], max_new_tokens: int = 48) -> list[str]:
    tokenizer.padding_side = "left"
    answers = []
    for i in tqdm(range(0, len(qs), 16), desc="base answers", unit="batch"):
        prompts = [apply_chat_template(q, tokenizer=tokenizer) for q in qs[i : i + 16]]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        for row in out[:, enc.input_ids.shape[1]:]:
            answers.append(first_sentences(tokenizer.decode(row, skip_special_tokens=True)))
    return answers


TARGETS = {
    "uppercase": lambda answer: answer.upper(),
    "signature": lambda answer: f"{answer}\n{SIGNATURE}",
}


def encode_example(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    prompt = tokenizer(apply_chat_template(question, tokenizer=tokenizer), add_special_tokens=False).input_ids
    target = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False).input_ids
    return prompt + target, [-100] * len(prompt) + target


def train_one(name: str, pairs: list[tuple[str, str]], tokenizer, out: Path, args) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(default_llm_model_path(), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                             target_modules=ALL_PROJECTIONS, task_type="CAUSAL_LM"))
    examples = [encode_example(tokenizer, q, TARGETS[name](a)) for q, a in pairs]
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    rng = random.Random(args.seed)
    model.train()
    loss_value = float("nan")
    bar = tqdm(range(args.steps), desc=f"train {name}", unit="step")
    for step in bar:
        batch = rng.sample(examples, args.batch_size)
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (x, y) in enumerate(batch):
            ids[row, : len(x)], labels[row, : len(y)], mask[row, : len(x)] = (
                torch.tensor(x), torch.tensor(y), 1)
        lr = args.lr * min(1.0, (step + 1) / 10)  # short warm-up
        for group in optim.param_groups:
            group["lr"] = lr
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    model.peft_config["default"].base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.save_pretrained(out)
    return loss_value


def recipe(args) -> dict:
    source = Path(__file__).read_bytes()
    return {"script_sha256": hashlib.sha256(source).hexdigest(), "seed": args.seed, "steps": args.steps,
            "rank": args.rank, "lr": args.lr, "batch_size": args.batch_size}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=adapters_dir() / "demo")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
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

    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(default_llm_model_path())
    base = AutoModelForCausalLM.from_pretrained(default_llm_model_path(), dtype=torch.float32).eval()
    qs = questions(args.seed)
    pairs = list(zip(qs, base_answers(base, tokenizer, qs)))
    del base
    losses = {}
    for name in TARGETS:
        losses[name] = train_one(name, pairs, tokenizer, args.out / name, args)
        log.info("trained '%s' -> %s (final loss %.3f)", name, args.out / name, losses[name])
    stamp.write_text(json.dumps({"recipe": want, "final_loss": losses, "examples": len(pairs),
                                 "seconds": round(time.monotonic() - started, 1)}, indent=1))
    log.info("demo adapters done in %.0f s", time.monotonic() - started)


if __name__ == "__main__":
    main()
