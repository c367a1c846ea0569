"""The short version of benchmarks/soak.py: concurrent clients over every kind of request, with the llm stub killed
and tritonserver restarted mid-run; the script's own checks (no hang, no 5xx outside the fault windows, slots and
registry clean afterwards, bounded memory growth) must all pass."""

from __future__ import annotations

import json
import subprocess
import sys

from backends.settings import REPO_ROOT


def test_short_soak_with_faults_loses_nothing(tmp_path):
    report = tmp_path / "soak.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.soak", "--minutes", "1", "--concurrency", "8",
                           "--report", str(report)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    print(done.stdout[-6000:])
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["passed"] and data["outcomes"] > 50
    assert [w["fault"] for w in data["windows"]] == ["llm stub killed (SIGKILL)", "tritonserver restarted"]
    for kind in ("chat_stream", "grpc_stream", "image", "churn_load", "disconnect", "bad_nan_scale"):
        assert f"\n{kind}" in data["table"], kind
