"""bench/gpu_check.sh --smoke: the GPU check's whole flow (tests, checkpoint, decode at two batch
sizes beside the dense peer, a live server at two concurrencies, the summary) on the CPU under
Triton's interpreter, so the script a GPU session runs is known to work before it gets one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)  # about 2 minutes of CPU; more wall time on a shared machine
def test_smoke_run_writes_every_result_and_the_summary(tmp_path):
    out = tmp_path / "gpu-check"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--smoke", str(out)],
                          env={**env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900)
    logs = {p.name: p.read_text()[-2000:] for p in out.glob("*.log")}
    assert proc.returncode == 0, (proc.stdout, logs)
    steps = dict(line.split("\t")[:2] for line in (out / "steps.tsv").read_text().splitlines())
    assert steps.pop("gpu_kernels").startswith("skipped")          # needs compiled kernels
    assert steps.pop("dense-b1-compiled").startswith("skipped")    # torch.compile: GPU runs only
    assert set(steps.values()) == {"0"}, steps
    for name in ("decode-b1", "decode-b32"):
        result = json.loads((out / f"{name}.json").read_text())
        assert set(result["tokens_per_s"]) == {"2", "4"} and "Triton interpreter" in result["device"]
    assert json.loads((out / "dense-b1.json").read_text())["tokens_per_s"] > 0
    assert [lv["concurrency"] for lv in json.loads((out / "serve.json").read_text())["levels"]] == [1, 2]
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# BitSkip GPU check: cpu (Triton interpreter")
    assert "## Decode" in summary and "## Live server" in summary
