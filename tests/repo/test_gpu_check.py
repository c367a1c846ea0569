"""scripts/gpu_check --cpu: the one command that proves the GPU path runs end to end on CPU (small), so it cannot
rot between the rare sessions that have a GPU."""

from __future__ import annotations

import json
import subprocess

from backends.settings import REPO_ROOT


def test_gpu_check_dry_run_on_cpu_writes_its_report(tmp_path):
    proc = subprocess.run([str(REPO_ROOT / "scripts" / "gpu_check"), str(tmp_path), "--cpu"], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["environment"]["device"] == "cpu"
    outcomes = {row[0]: row[1] for row in report["tests"]["rows"]}
    assert outcomes["test_served_greedy_tokens_equal_transformers_generate"] == "passed"
    assert outcomes["test_mixed_adapter_logits_equal_peft_adapter_names[float32]"] == "passed"
    assert outcomes["test_seeded_sampling_is_reproducible_on_the_device"] == "passed"
    assert len(report["ops_decode"]["rows"]) == 4 and len(report["ops_prefill"]["rows"]) == 2
    engine = report["engine"]["rows"]
    assert len(engine) == 4 and all(row[4] == 0 for row in engine)  # no failed request
    markdown = (tmp_path / "report.md").read_text()
    assert "decode step" in markdown and "engine serving" in markdown and "tritonserver serving benchmark: skipped" \
        in markdown
