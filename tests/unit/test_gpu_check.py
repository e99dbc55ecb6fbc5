"""benchmarks/gpu_check.py --dry (issue 13, item 7): the GPU check script runs on the CPU, and its
correctness checks hold there (its speed targets are for a GPU and are only reported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_runs_every_check() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("ZOSCALE_NOISE_BACKEND", None)  # the compiled kernels against the eager ones
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry"], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    records = {r.get("check", "meta"): r for r in json.loads(done.stdout)}
    assert set(records) == {"meta", "noise", "bandwidth", "mezo_step", "bf16_master", "engines"}
    assert records["noise"]["rademacher_max_ulp"] == 0.0 and records["noise"]["ok"], records["noise"]
    assert records["bf16_master"]["ok"], records["bf16_master"]
    engines = records["engines"]
    assert engines["ok"] and engines["fsdp"] == engines["local"] and len(engines["local"]) == 2, engines
    for name in ("bandwidth", "mezo_step"):  # measured and compared with the GPU target, not asserted here
        assert records[name]["target"] > 0 and isinstance(records[name]["ok"], bool)
