"""``python -m dno run`` on a tiny SD1.5-layout pipeline folder: end to end, killed and resumed.

The command runs from the repository root as a user runs it (``python -m dno``), in a subprocess.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

REPO = Path(__file__).resolve().parents[1]
SAMPLING = ["--steps", "3", "--height", "32", "--width", "32", "--guidance-scale", "3"]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from tiny_pipelines import save_tiny_sd
    return save_tiny_sd(tmp_path_factory.mktemp("pipeline") / "tiny-sd")


def command(pipeline, prompts, out, *extra):
    return [sys.executable, "-m", "dno", "run", "--pipeline", str(pipeline), "--prompts", str(prompts),
            "--out", str(out), *SAMPLING, *extra]


def records(out: Path) -> list:
    """The complete lines of results.jsonl (not one being written, or cut off)."""
    path = out / "results.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.is_file() else []
    return [json.loads(line) for line in lines if line.strip()]


def test_run_end_to_end_matches_the_python_call(pipeline, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\n\n  a blue car  \n")
    out = tmp_path / "out"
    proc = subprocess.run(command(pipeline, prompts, out, "--reward", "brightness", "--seeds", "0,5",
                                  "--opt-steps", "2", "--lr", "0.1", "--gamma", "1"),
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = records(out)
    assert sorted(r["key"] for r in found) == ["0:0", "0:5", "1:0", "1:5"]
    assert {r["prompt"] for r in found} == {"a red apple", "a blue car"}
    for r in found:
        assert len(r["rewards"]) == 3 and r["stop_reason"] == "completed" and len(r["probability"]) == 3
        assert r["best_reward"] == max(r["rewards"]) and r["initial_reward"] == r["rewards"][0]
        assert (out / r["image"]).is_file() and (out / r["start_image"]).is_file()
    assert (out / "rewards.png").stat().st_size > 0
    assert json.loads((out / "settings.json").read_text())["opt_steps"] == 2
    assert "prompt 1 seed 5" in proc.stderr and "[4/4]" in proc.stderr      # progress and the summary lines

    # the command line runs what the Python call runs
    from diffusers import DiffusionPipeline
    from dno import ProbabilityRegularizer
    from dno.diffusers_host import optimize_pipeline
    from dno.rewards import BuiltinReward
    pipe = DiffusionPipeline.from_pretrained(str(pipeline))
    direct = optimize_pipeline(pipe, "a blue car", BuiltinReward("brightness"), opt_steps=2, steps=3,
                               guidance_scale=3, height=32, width=32, seed=5, lr=0.1,
                               regularizer=ProbabilityRegularizer(gamma=1.0))
    line = next(r for r in found if r["key"] == "1:5")
    torch.testing.assert_close(torch.tensor(line["rewards"]), torch.tensor([h.reward[0] for h in direct.history]),
                               rtol=1e-5, atol=1e-6)
    from PIL import Image
    import numpy as np
    saved = np.asarray(Image.open(out / line["image"]), dtype=np.int16)
    assert np.abs(saved - np.asarray(direct.images[0], dtype=np.int16)).max() <= 1

    # run again: everything is done, nothing runs, nothing is added
    again = subprocess.run(command(pipeline, prompts, out, "--reward", "brightness", "--seeds", "0,5",
                                   "--opt-steps", "2", "--lr", "0.1", "--gamma", "1"),
                           capture_output=True, text=True, timeout=300, cwd=REPO, env=env())
    assert again.returncode == 0 and "4 done before, 0 to run" in again.stderr
    assert records(out) == found


def stopped_after(args, results: int, out: Path):
    """The CLI in a subprocess that stops itself (SIGSTOP) once its results file holds ``results``
    lines (tests/cli_stopping_after.py): a signal sent now lands mid-run, after exactly those
    results. Waits on the process's own stop, not on the clock (a watchdog kills it after 5 min)."""
    wrapped = [sys.executable, str(REPO / "tests" / "cli_stopping_after.py"), str(results), *args[3:]]
    proc = subprocess.Popen(wrapped, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**env(), "PYTHONPATH": str(REPO)})
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
    finally:
        watchdog.cancel()
    if not os.WIFSTOPPED(status):
        proc.returncode = os.waitstatus_to_exitcode(status)
        raise AssertionError(f"the run ended (status {status}) before its result {results}: "
                             f"{proc.stderr.read()[-3000:]}")
    assert len(records(out)) == results
    return proc


def test_killed_and_interrupted_runs_resume_with_one_result_per_prompt(pipeline, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(6)))
    out = tmp_path / "out"
    args = command(pipeline, prompts, out, "--reward", "contrast", "--opt-steps", "6", "--lr", "0.1")

    # a crash: SIGKILL right after the first result is written, and a line cut off mid-write
    proc = stopped_after(args, 1, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    first = records(out)
    assert len(first) == 1
    with open(out / "results.jsonl", "a") as handle:
        handle.write('{"key": "5:0", "prompt_index": 5, "rewa')          # what a crash mid-write leaves

    # Ctrl-C after one more result: stops with the message and exit code 130
    proc = stopped_after(args, 2, out)
    proc.send_signal(signal.SIGINT)       # pending while stopped: delivered on SIGCONT, mid-run
    proc.send_signal(signal.SIGCONT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted" in stderr and "run the same command again to resume" in stderr
    second = records(out)
    assert second[:len(first)] == first and len(second) == 2

    # the same command finishes the rest
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=REPO, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{len(second)} done before" in proc.stderr
    final = records(out)
    assert final[:len(second)] == second
    keys = [r["key"] for r in final]
    assert sorted(keys) == [f"{i}:0" for i in range(6)] and len(set(keys)) == 6
    for r in final:
        assert (out / r["image"]).is_file() and len(r["rewards"]) == 7
    assert not list((out / "images").glob("*.partial"))


def test_resume_with_other_settings_and_bad_input_are_refused(pipeline, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "settings.json").write_text(json.dumps({"lr": 0.5}))
    proc = subprocess.run(command(pipeline, prompts, out, "--reward", "brightness", "--opt-steps", "0"),
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env())
    assert proc.returncode == 2 and "other settings (" in proc.stderr and "lr: was 0.5, now 0.01" in proc.stderr
    proc = subprocess.run(command(pipeline, prompts, tmp_path / "e", "--reward", "brightness", "--parallel",
                                  "estimator"), capture_output=True, text=True, timeout=300, cwd=REPO, env=env())
    assert proc.returncode == 2 and "use --parallel prompts, or --method hybrid" in proc.stderr
    proc = subprocess.run(command(tmp_path, prompts, tmp_path / "f", "--reward", "brightness"),
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env())
    assert proc.returncode == 2 and "no model_index.json there" in proc.stderr
    from dno.rewards.loading import RewardFileError
    from dno.rewards.named import NAMES, reward_from_name
    from dno.cli import REWARDS
    assert set(REWARDS) == set(NAMES)
    with pytest.raises(RewardFileError, match="needs the LAION aesthetic MLP .* as --reward-file"):
        reward_from_name("aesthetic", reward_file="mlp.pth")
    assert reward_from_name("jpeg-compressibility", jpeg_quality=80).quality == 80


def test_seed_lists_and_ranges():
    import argparse
    from dno.cli import parse_seeds
    assert parse_seeds("0,3,5-7") == [0, 3, 5, 6, 7]
    for bad in ("", "a", "3-1", "1,1", "-2"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_seeds(bad)


def test_diffusers_is_imported_by_the_adapter_only():
    """The core and the command line's parser load without diffusers; only dno/diffusers_host imports it."""
    code = ("import sys, dno, dno.cli, dno.distributed, dno.results, dno.rewards.named\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=env())
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-2000:]
    for path in (REPO / "dno").rglob("*.py"):
        if "diffusers_host" in path.parts:
            continue
        text = path.read_text()
        assert "import diffusers" not in text and "from diffusers" not in text, path
