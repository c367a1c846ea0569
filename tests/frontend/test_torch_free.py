"""The FastAPI process never imports torch: it needs transformers only for tokenizers and chat templates, and its
imports of backend code are the torch-free modules (adapter file names, locations, registry entries, parameters).
Checked on the session's real frontend process after it served every kind of text request."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx

from backends.llm.chat import apply_chat_template
from backends.settings import REPO_ROOT, default_llm_model_path
from tools.session import API_KEY

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def _mapped_libraries(pid: int) -> set[str]:
    return {Path(line.split()[-1]).name for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if len(line.split()) >= 6 and ".so" in line}


def test_the_frontend_process_serves_text_without_torch(frontend):
    url = frontend.url
    chat = httpx.post(f"{url}/v1/chat/completions", headers=HEADERS, timeout=120, json={
        "model": "uppercase", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0,
        "logprobs": True, "top_logprobs": 2})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["logprobs"]["content"]  # token texts came from the frontend's tokenizer
    scored = httpx.post(f"{url}/v1/completions", headers=HEADERS, timeout=120, json={
        "model": "llm", "prompt": "Paris is", "max_tokens": 0, "echo": True, "logprobs": 1})
    assert scored.status_code == 200, scored.text
    tokens = httpx.post(f"{url}/tokenize", headers=HEADERS, timeout=60,
                        json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert tokens["count"] > 0
    info = httpx.get(f"{url}/tokenizer_info", headers=HEADERS, timeout=60).json()
    assert info["chat_template"]

    libraries = _mapped_libraries(frontend.proc.pid)
    assert any(name.startswith("libpython") or name.startswith("_ssl") for name in libraries)  # the check sees
    assert not {name for name in libraries if "torch" in name}, sorted(n for n in libraries if "torch" in n)


def test_its_chat_template_is_the_one_the_backends_apply():
    """Without torch, transformers still renders the same prompt (the tests' process has torch loaded)."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    code = ("import sys; sys.modules['torch'] = None; import json; from backends.llm.chat import apply_chat_template;"
            f"print(json.dumps(apply_chat_template({messages!r}, {str(default_llm_model_path())!r})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == apply_chat_template(messages)
