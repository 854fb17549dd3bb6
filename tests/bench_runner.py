"""The benchmark (bench/run.py) on the tiny SD1.5 and SDXL UNets, as the GPU tests run it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tiny_bench_records(out: Path, configs: str, *extra: str, timeout: float = 600) -> list:
    """One bench process per model (sd15, then sdxl), 8 sampling steps and 3 updates on CUDA;
    the JSON lines they wrote to ``out``, in order."""
    for model in ("sd15", "sdxl"):
        cmd = [sys.executable, str(REPO / "bench" / "run.py"), "--model", model, "--tiny",
               "--device", "cuda", "--steps", "8", "--opt-steps", "3", "--plain-repeats", "1", *extra,
               "--configs", configs, "--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]
