"""``python -m dno run`` on a machine without diffusers (only requirements.txt installed): a clear
message naming requirements-diffusers.txt, exit status 2, and nothing written to --out.

diffusers is hidden in a subprocess (``sys.modules['diffusers'] = None`` makes every import of it
fail as a missing module does), so this runs whether or not diffusers is installed here.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_run_without_diffusers_names_the_requirements_file_and_writes_nothing(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    out = tmp_path / "runs" / "out"
    script = ("import sys\n"
              "sys.modules['diffusers'] = None\n"
              "from dno.cli import main\n"
              f"sys.exit(main(['run', '--pipeline', {str(tmp_path / 'sd15')!r}, '--prompts', {str(prompts)!r}, "
              f"'--reward', 'contrast', '--out', {str(out)!r}]))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "pip install -r requirements-diffusers.txt" in done.stderr, done.stderr
    assert "diffusers" in done.stderr.splitlines()[0] and "Traceback" not in done.stderr, done.stderr
    assert not out.exists() and not (tmp_path / "runs").exists(), sorted(p.name for p in tmp_path.rglob("*"))
