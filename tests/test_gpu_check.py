"""The GPU check (``benchmarks/gpu_check.py``) is prepared for a scarce lease, so its code paths are run here: the
smoke mode runs every part on a tiny model on the CPU and each part must come back with figures, not an error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_part_of_the_gpu_check_runs_in_smoke_mode():
    script = ("import json, sys; sys.path.insert(0, 'benchmarks'); import gpu_check; "
              "print('RESULTS ' + json.dumps(gpu_check.main(['--smoke', '--skip-vllm'])))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.split("RESULTS ", 1)[1])
    assert set(results) == {"GEMM peak TFLOP/s", "SFT", "SFT, --parallel fsdp on one device",
                            "ppo_max, builtin rollouts", "grpo, builtin rollouts", "grpo, builtin rollouts, --compile"}
    assert not [name for name, figures in results.items() if "error" in figures]
    assert results["GEMM peak TFLOP/s"]["value"] > 0
    for name in ("SFT", "SFT, --parallel fsdp on one device"):
        assert results[name]["tokens/s"] > 0 and 0 < results[name]["MFU"] < 1
    for name in ("ppo_max, builtin rollouts", "grpo, builtin rollouts", "grpo, builtin rollouts, --compile"):
        assert results[name]["generated tokens/s"] > 0 and results[name]["s/step"] > results[name]["update s"] > 0
    assert "| SFT |" in done.stdout  # the table a lease's output ends with
