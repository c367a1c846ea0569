"""Offline inference (backends/offline, scripts/offline_image.py, scripts/offline_text.py): the serving engines
in-process give the same answers as the served models: byte-identical images, token-identical greedy text."""

from __future__ import annotations

import json
import shutil

import pytest

from backends.llm.chat import apply_chat_template
from backends.settings import adapters_dir
from scripts import offline_image, offline_text
from tools.clients.diffusion import generate as served_image
from tools.clients.llm import generate as served_text

SD3_A = adapters_dir() / "diffusion" / "tiny-sd3-a"
DEMO = adapters_dir() / "demo"
IMAGE = ["--prompt", "a red cat", "--seed", "7", "--num_inference_steps", "2"]


def _png(tmp_path, name: str, *flags: str) -> bytes:
    out = tmp_path / f"{name}.png"
    assert offline_image.main([*IMAGE, *flags, "--output", str(out)]) == 0
    return out.read_bytes()


def test_offline_image_cli_equals_the_served_image(tmp_path, http_client):
    base = _png(tmp_path, "base")
    preloaded = _png(tmp_path, "pre", "--lora-path", str(SD3_A), "--lora-scale", "0.8")
    per_request = _png(tmp_path, "req", "--lora-request-path", str(SD3_A), "--lora-request-id", "77",
                       "--lora-scale", "0.8")
    zero = _png(tmp_path, "zero", "--lora-request-path", str(SD3_A), "--lora-scale", "0")
    assert base.startswith(b"\x89PNG") and preloaded != base
    assert preloaded == per_request, "a pre-loaded and a per-request adapter gave different images"
    assert zero == base, "scale 0 is not the base model"
    served, _, _ = served_image(http_client, prompt="a red cat", seed=7, num_inference_steps=2,
                                lora_name="tiny-sd3-a", lora_scale=0.8)
    assert served[0] == preloaded, "the offline image differs from the served one"
    assert served_image(http_client, prompt="a red cat", seed=7, num_inference_steps=2)[0][0] == base


def test_offline_image_cli_refuses_a_missing_or_invalid_adapter(tmp_path, capsys):
    assert offline_image.main([*IMAGE, "--lora-path", str(tmp_path / "missing"), "--output", str(tmp_path / "x.png")]) == 2
    assert f"--lora-path {tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt"
    shutil.copytree(SD3_A, corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"not safetensors")
    assert offline_image.main([*IMAGE, "--lora-request-path", str(corrupt), "--output", str(tmp_path / "y.png")]) == 2
    err = capsys.readouterr().err
    assert f"invalid LoRA adapter at {corrupt}" in err and "is not valid safetensors" in err
    assert not (tmp_path / "y.png").exists()


QUESTIONS = ["What is the capital of France?", "Say hi.", "Name a colour.", "Count to three."]


def test_offline_text_jsonl_gives_the_served_greedy_text(tmp_path, grpc_client):
    """12 prompts over the base model, both demo adapters (pre-loaded) and one adapter by path (per request),
    all in one engine run, each equal to what the server answers; a malformed line is reported with its number
    and the others still run."""
    lines, jobs = [], []
    for i, question in enumerate(QUESTIONS * 3):
        adapter = [None, "uppercase", "signature", str(DEMO / "uppercase")][i % 4]
        entry = {"messages": [{"role": "user", "content": question}], "max_tokens": 8}
        if adapter:
            entry["adapter"] = adapter
        lines.append(json.dumps(entry))
        jobs.append((question, adapter))
    lines.insert(5, "{not json")
    lines.insert(9, json.dumps({"prompt": "x", "adapter": str(tmp_path / "missing-adapter")}))
    lines.append(json.dumps({"prompt": "x", "seed": 1.5, "temperature": 0.7}))
    lines.append(json.dumps({"messages": [{"content": "no role"}]}))
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(lines) + "\n")
    code = offline_text.main(["--input", str(source), "--output", str(out), "--lora-modules",
                              f"uppercase={DEMO / 'uppercase'}", f"signature={DEMO / 'signature'}",
                              "--dtype", "float32"])  # the session's llm: batch-invariant greedy tokens
    assert code == 1  # some lines failed
    rows = {r["line"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert "line 1 column 2" in rows[6]["error"] or "Expecting" in rows[6]["error"]
    assert "LoRA adapter not found" in rows[10]["error"] and "missing-adapter" in rows[10]["error"]
    assert "'seed' must be an integer, got 1.5" in rows[15]["error"]
    assert "messages must be a non-empty list of {role, content}" in rows[16]["error"]
    good = [rows[n] for n in sorted(rows) if n not in (6, 10, 15, 16)]
    assert len(good) == 12
    for row, (question, adapter) in zip(good, jobs):
        lora = {}
        if adapter and "/" in adapter:
            lora = {"lora_path": adapter}
        elif adapter:
            lora = {"lora_name": adapter}
        served = served_text(grpc_client, apply_chat_template(question), temperature=0.0, max_tokens=8, **lora)
        assert served.error is None, served.error
        assert row["text"] == served.text, f"{question!r} ({adapter})"
        assert row["completion_tokens"] == served.num_output_tokens
        if adapter and adapter.endswith("uppercase"):
            letters = [c for c in row["text"] if c.isalpha()]
            assert letters and all(c.isupper() for c in letters), row["text"]


def test_offline_text_cli_refuses_a_missing_preloaded_adapter(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"prompt": "hi"}) + "\n")
    code = offline_text.main(["--input", str(source), "--output", str(tmp_path / "out.jsonl"), "--lora-modules",
                              f"gone={tmp_path / 'gone'}"])
    assert code == 2 and f"adapter gone: {tmp_path / 'gone'} does not exist" in capsys.readouterr().err


def test_python_api_mixed_adapters_in_one_call():
    from backends.offline import LoRA, TextGenerator

    with TextGenerator(preload={"uppercase": str(DEMO / "uppercase")}, max_num_seqs=4) as llm:
        plain, upper, half_zero = llm.generate(
            [[{"role": "user", "content": "What is the capital of France?"}]] * 3, max_tokens=6, temperature=0,
            lora=[None, LoRA(name="uppercase"), LoRA(name="uppercase", scale=0.0)], progress=False)
        assert upper.text.isupper() and not plain.text.isupper()
        assert half_zero.token_ids == plain.token_ids  # scale 0 is the base model
        with pytest.raises(Exception, match="not found"):
            llm.generate("hi", lora=LoRA(name="nope"))


def test_lora_stacks_offline_give_the_served_stack_text(tmp_path, grpc_client):
    """A stack [uppercase@0.7, signature@0.5] through the Python API and a JSONL line equals the server's answer to
    the same stack; a bad stack is refused as the server refuses it."""
    from backends.errors import InvalidArgument
    from backends.offline import LoRA, TextGenerator

    question = "What is the capital of France?"
    served = served_text(grpc_client, apply_chat_template(question), temperature=0.0, max_tokens=8,
                         lora_name=["uppercase", "signature"], lora_scale=[0.7, 0.5])
    assert served.error is None, served.error
    stack = (LoRA(name="uppercase", scale=0.7), LoRA(name="signature", scale=0.5))
    preload = {"uppercase": str(DEMO / "uppercase"), "signature": str(DEMO / "signature")}
    with TextGenerator(preload=preload, max_num_seqs=4) as llm:
        stacked, plain = llm.generate([[{"role": "user", "content": question}]] * 2, lora=[stack, None],
                                      max_tokens=8, temperature=0, progress=False)
        assert stacked.text == served.text != plain.text
        for bad in (("uppercase",), ()):
            with pytest.raises(InvalidArgument, match="non-empty tuple of LoRA"):
                llm.generate("hi", lora=bad)
        with pytest.raises(InvalidArgument, match="appears twice"):
            llm.generate("hi", lora=(LoRA(name="uppercase"), LoRA(name="uppercase", scale=0.5)))

    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(json.dumps(line) for line in [
        {"messages": [{"role": "user", "content": question}], "max_tokens": 8,
         "adapter": ["uppercase", "signature"], "scale": [0.7, 0.5]},
        {"prompt": "x", "adapter": ["uppercase", "signature"], "scale": [0.7]},
        {"prompt": "x", "adapter": []},
    ]) + "\n")
    code = offline_text.main(["--input", str(source), "--output", str(out), "--lora-modules",
                              *(f"{name}={path}" for name, path in preload.items())])
    good, bad_scales, empty = map(json.loads, out.read_text().splitlines())
    assert code == 1 and good["text"] == served.text
    assert "'scale' must be a list of 2 numbers for 2 adapters" in bad_scales["error"]
    assert "'adapter' is an empty list" in empty["error"]
