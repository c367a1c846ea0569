"""perf_analyzer, as the README and the benchmarks run it, against the session's tritonserver: the LoRA inputs have
dims [-1] (LoRA stacks), which perf_analyzer refuses to fill unless the input data states their shape."""

from __future__ import annotations

import json
import subprocess

from backends.llm.chat import apply_chat_template
from backends.settings import REPO_ROOT
from benchmarks.serving import demo_trace, perf_analyzer, summarise


def test_perf_analyzer_drives_the_llm_with_adapters_as_inputs(triton_server, tmp_path):
    records = perf_analyzer(triton_server, "llm", demo_trace(6, max_tokens=4), concurrency=2, requests=6,
                            workdir=tmp_path)
    row = summarise("perf_analyzer", 2, 2, records)
    assert row.requests == 6 and row.tok_per_s > 0
    assert all(max(int(o.get("num_output_tokens", 0)) for o in r["response_outputs"]) == 4 for r in records)


def test_perf_analyzer_takes_the_adapter_as_a_request_parameter(triton_server, tmp_path):
    """The README's form: `--request-parameter lora_name:uppercase:string` over plain prompt data."""
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"data": [{"text_input": [apply_chat_template("Hi")], "max_tokens": [4],
                                            "stream": [True]}]}))
    done = subprocess.run(
        [str(REPO_ROOT / "scripts" / "perf_analyzer"), "-m", "llm", "-u", triton_server.grpc_url, "-i", "grpc",
         "--async", "--streaming", "--input-data", str(inputs), "--request-count=2",
         "--request-parameter", "lora_name:uppercase:string"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
