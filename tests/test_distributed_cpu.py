"""Several processes on the CPU (torchrun, gloo): the same results as one process.

* The hybrid and zeroth-order estimates with their perturbed renders split over 2 processes
  equal the one-process estimates for the same perturbations, and each process renders only
  its own share (tests/distributed_worker.py).
* ``torchrun --nproc-per-node 2 -m dno run`` gives the same per-prompt results as one process,
  with the prompts shared out (``--parallel prompts``) and with each job's estimator renders
  split (``--parallel estimator``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dno import StopOptimization
from dno.distributed import AgreedStopping, Processes, rounds

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def test_split_estimates_equal_the_single_process_estimates(tmp_path):
    import distributed_worker as worker
    proc = subprocess.run(TORCHRUN + [str(REPO / "tests" / "distributed_worker.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    torch.set_num_threads(1)
    alone = worker.single_process()
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["backend"] == "gloo"
    chunks = -(-worker.Q // worker.CHUNK)
    # each process rendered every other chunk of perturbations (twice: the hybrid and the zeroth-order)
    assert alone["rendered"] == [worker.CHUNK] * chunks * 2
    for r in ranks:
        assert r["rendered"] == [worker.CHUNK] * (chunks // 2) * 2
    for r in ranks:
        torch.testing.assert_close(r["hybrid"], alone["hybrid"], rtol=1e-5, atol=1e-6)
        for ours, theirs in zip(r["zeroth"], alone["zeroth"]):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["rewards"], alone["rewards"], rtol=1e-5, atol=1e-6)
        # three Adam steps on estimates summed in another order: Adam's first steps scale each
        # number's gradient to about lr whatever its size, so float rounding shows at ~1e-4
        torch.testing.assert_close(r["latent"], alone["latent"], rtol=1e-3, atol=5e-4)
    assert not torch.equal(alone["rewards"][0], alone["rewards"][-1])      # the optimisation moved


class TwoProcesses(Processes):
    """A group of two whose other process reports ``other`` flags (no real communication)."""

    def __init__(self, other):
        super().__init__(rank=0, world=2)
        self.other = other

    def any(self, flags):
        return [bool(a) or bool(b) for a, b in zip(flags, self.other)]


class Info:
    def __init__(self, step, best, elapsed, total=10):
        self.step, self.total_steps, self.elapsed = step, total, elapsed
        self.best_reward = torch.tensor([best])


def test_agreed_stopping_stops_every_process_when_any_would():
    here = AgreedStopping(TwoProcesses([False, False]), time_budget=None, target_reward=1.0)
    here(Info(0, 0.5, 0.1))                                        # nobody stops
    there_late = AgreedStopping(TwoProcesses([False, True]), time_budget=100.0, target_reward=None)
    with pytest.raises(StopOptimization, match="time budget of 100.0s reached after 0 updates"):
        there_late(Info(0, 0.5, 0.1))                              # the other process's clock ran out
    reached = AgreedStopping(TwoProcesses([False, False]), time_budget=None, target_reward=0.4)
    with pytest.raises(StopOptimization, match="target reward 0.4 reached at step 3"):
        reached(Info(3, 0.5, 0.1))
    assert reached.reason == "target reward 0.4 reached at step 3"
    AgreedStopping(TwoProcesses([True, True]), None, None)(Info(10, 0.5, 0.1))   # the last step: no stop


def test_rounds_give_each_process_one_job_per_round():
    assert list(rounds(list(range(5)), 2)) == [[0, 1], [2, 3], [4]]
    assert list(rounds([], 2)) == []


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    pytest.importorskip("diffusers")
    from tiny_pipelines import save_tiny_sd
    folder = tmp_path_factory.mktemp("pipeline") / "tiny-sd"
    return save_tiny_sd(folder)


def dno_run(pipeline, prompts, out, *extra, processes=1, timeout=300):
    command = ([sys.executable, "-m", "dno"] if processes == 1 else TORCHRUN + ["-m", "dno"])
    command += ["run", "--pipeline", str(pipeline), "--prompts", str(prompts), "--out", str(out),
                "--steps", "3", "--height", "32", "--width", "32", "--guidance-scale", "3", *extra]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r["key"]: r for r in map(json.loads, (Path(out) / "results.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("parallel,extra", [
    ("prompts", ["--reward", "brightness", "--seeds", "0-1", "--opt-steps", "2", "--lr", "0.1"]),
    # the hybrid estimator on a continuous reward: a JPEG size could jump on a float rounding
    ("estimator", ["--reward", "brightness", "--method", "hybrid", "--seeds", "4", "--opt-steps", "2",
                   "--lr", "0.1", "--grad-samples", "4", "--estimator-batch", "2", "--perturbation", "0.05"]),
])
def test_torchrun_gives_the_results_of_one_process(pipeline, tmp_path, parallel, extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\na blue car\n" + ("a green tree\n" if parallel == "prompts" else ""))
    alone = dno_run(pipeline, prompts, tmp_path / "one", *extra)
    shared = dno_run(pipeline, prompts, tmp_path / "two", *extra, "--parallel", parallel, processes=2)
    assert sorted(shared) == sorted(alone) and len(alone) == (6 if parallel == "prompts" else 2)
    if parallel == "prompts":
        assert {r["rank"] for r in shared.values()} == {0, 1}      # the jobs were shared out
    assert all(r["world"] == 2 for r in shared.values())
    for key, record in alone.items():
        other = shared[key]
        assert other["stop_reason"] == record["stop_reason"] == "completed"
        assert other["best_step"] == record["best_step"] and other["rendered"] == record["rendered"]
        torch.testing.assert_close(torch.tensor(other["rewards"]), torch.tensor(record["rewards"]),
                                   rtol=1e-5, atol=1e-6)
        assert (tmp_path / "two" / other["image"]).is_file()
    if parallel == "estimator":
        assert any(r["rewards"][-1] != r["rewards"][0] for r in alone.values())
