"""EleutherAI's lm-evaluation-harness, unchanged, against the test server's OpenAI frontend: its
`local-completions` backend with the remote tokenizer (our /tokenize, /detokenize, /tokenizer_info) runs a local
multiple-choice task (log-likelihoods: token-id prompts, echo, logprobs) and a local generation task on the base
model and on a demo adapter. Both finish with results, and lm-eval never had to retry a request.

lm-eval lives in its own environment (tools/client_envs.py; installed on first use, about a minute)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from backends.settings import REPO_ROOT
from tools.client_envs import ensure_lm_eval
from tools.session import API_KEY

TASKS = REPO_ROOT / "tests" / "data" / "lm_eval"


@pytest.fixture(scope="module")
def lm_eval():
    return ensure_lm_eval()


@pytest.mark.parametrize("model", ["llm", "uppercase"])
def test_lm_eval_runs_loglikelihood_and_generation_tasks(lm_eval, frontend, model, tmp_path):
    args = ",".join([f"model={model}", f"base_url={frontend.url}/v1/completions", "tokenizer_backend=remote",
                     "tokenized_requests=True", "num_concurrent=2", "max_retries=1",
                     f"auth_token={API_KEY}"])
    env = {**os.environ, "OPENAI_API_KEY": API_KEY, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(
        [str(lm_eval), "run", "--model", "local-completions", "--model_args", args,
         "--tasks", "multilora_mc,multilora_gen", "--batch_size", "4", "--include_path", str(TASKS), "--output_path",
         str(tmp_path / "out"), "--log_samples"],
        cwd=TASKS, env=env, capture_output=True, text=True, timeout=600,
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "retry" not in log.lower(), f"lm-eval retried a request:\n{log[-4000:]}"
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    assert 0 <= results["multilora_mc"]["acc,none"] <= 1
    assert 0 <= results["multilora_gen"]["exact_match,none"] <= 1
    samples = [json.loads(line) for f in (tmp_path / "out").rglob("samples_multilora_mc_*.jsonl")
               for line in f.read_text().splitlines()]
    assert len(samples) == 8 and all(len(s["resps"]) == 4 for s in samples)  # 4 scored choices per question
    generated = [json.loads(line) for f in (tmp_path / "out").rglob("samples_multilora_gen_*.jsonl")
                 for line in f.read_text().splitlines()]
    answers = [s["filtered_resps"][0] for s in generated]
    assert len(answers) == 4 and any(a.strip() for a in answers)
    letters = [c for a in answers for c in a if c.isalpha()]
    upper = sum(c.isupper() for c in letters) / max(1, len(letters))
    if model == "uppercase":  # the adapter answered (it learned capitals on chat prompts; these are raw)
        assert upper > 0.6, answers
    else:
        assert upper < 0.5, answers
