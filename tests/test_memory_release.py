"""Memory that ComfyUI can see: what a DNO run declares, where its budget comes from, the reward
models' dtype, and that two DNO workflows back to back give their memory back.

The workflow tests run ``tests/memory_workflows.py`` in a fresh process (ComfyUI's own executor
and output cache, in-process there; see its docstring for why) and check its counters; the
``gpu`` one needs CUDA and runs on the GPU machine (``python3 -m pytest tests -m gpu``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfy_host import import_comfy
from tests import reward_fixtures as fx
from tiny_checkpoints import sd15_checkpoint, sd15_controlnet

from dno import DNOConfig, DNOError, ProbabilityRegularizer, VP, optimize
from dno.memory import GIB, budget_from_free, default_budget_bytes, plan_stored_steps, planned_working_set
from toy_models import BlockDenoiser, Brightness, block_decode, block_noise, vp_sigmas

TESTS = Path(__file__).resolve().parent
RUNNER = TESTS / "memory_workflows.py"
KIB, MIB = 1024, 1024 ** 2


@pytest.fixture(scope="module")
def pack():
    import_comfy()
    from node_pack import load_node_pack
    module = load_node_pack()
    memory = sys.modules[module.__name__ + ".nodes.memory"]
    rewards = sys.modules[module.__name__ + ".nodes.rewards"]
    return memory, rewards


# --------------------------------------------------------------------------- what is declared

def test_the_declared_working_set_is_what_the_plan_then_stores():
    """For every memory mode the room declared ahead of the run (planned_working_set) is, once the
    estimates are the measured sizes, the room in which plan_stored_steps stores what the mode
    says: the same reserve for one step's backward, the same cap without a budget."""
    step, decode, window, weights = GIB, GIB // 2, 10, 5 * GIB
    reserve = 2 * GIB + GIB // 4                   # recompute one step: 2 x its activations, + 1/8
    cases = {True: 0, "blocks": 0, False: 10, 3: 3, 30: 10, "auto": 8}
    for mode, stored in cases.items():
        declared = planned_working_set(mode, window, step, decode)
        assert declared == reserve + stored * step, mode
        cap = 8 * GIB if mode == "auto" else None
        plan = plan_stored_steps(weights + declared, weights, step, decode, window, max_stored_bytes=cap)
        assert plan.stored_steps == stored and not plan.block_checkpointing, mode
    # "auto" with the user's budget: the budget less the weights in it, at least the reserve
    assert planned_working_set("auto", window, step, decode, budget_bytes=20 * GIB, weights_bytes=weights) == 15 * GIB
    assert planned_working_set("auto", window, step, decode, budget_bytes=6 * GIB, weights_bytes=weights) == reserve
    assert planned_working_set("auto", 4, step, decode) == reserve + 4 * step     # a short window


def test_working_set_is_estimated_from_comfyuis_own_estimates(pack):
    memory, _ = pack

    class Model:         # ComfyUI's BaseModel.memory_required / VAE.memory_used_decode interfaces
        shapes = []

        def memory_required(self, shape):
            self.shapes.append(list(shape))
            return 100 * MIB

    class Vae:
        vae_dtype = torch.float16

        def memory_used_decode(self, shape, dtype):
            assert dtype == torch.float16
            return 300 * MIB

    model, vae, shape = Model(), Vae(), (2, 4, 64, 64)
    config = DNOConfig(checkpoint=True)
    got = memory.working_set_bytes(config, Brightness(), model, vae, shape, steps=20, weights_bytes=0)
    step, decode = int(memory.STEP_ACTIVATION_FACTOR * 100 * MIB), int(memory.DECODE_ACTIVATION_FACTOR * 300 * MIB)
    assert got == planned_working_set(True, 20, step, decode)
    assert model.shapes[-1] == [4, 4, 64, 64]      # one model call on the CFG batch
    # the window of the run, the user's budget less the weights, no gradient at all
    windowed = memory.working_set_bytes(DNOConfig(checkpoint=False, window=5), Brightness(), model, vae, shape, 20, 0)
    assert windowed == planned_working_set(False, 5, step, decode)
    budgeted = memory.working_set_bytes(DNOConfig(memory_budget_gb=40), Brightness(), model, vae, shape, 20, 10 * GIB)
    assert budgeted == 30 * GIB
    zeroth = memory.working_set_bytes(DNOConfig(method="zeroth_order", estimator_batch=4), Brightness(), model,
                                      vae, shape, 20, 0)
    assert zeroth == 4 * 300 * MIB


# --------------------------------------------------------------------------- where the budget comes from

def test_budget_is_what_is_allocated_and_free_less_the_larger_reserve():
    assert budget_from_free(10 * GIB, 50 * GIB, 80 * GIB) == 52 * GIB                          # a tenth: 8 GiB
    assert budget_from_free(10 * GIB, 50 * GIB, 80 * GIB, host_reserve_bytes=12 * GIB) == 48 * GIB
    assert budget_from_free(1 * GIB, 3 * GIB, 8 * GIB) == 2 * GIB                              # at least 2 GiB
    assert budget_from_free(0, GIB, 8 * GIB) == 0
    assert default_budget_bytes(torch.device("cpu")) is None
    with pytest.raises(DNOError, match="auto_budget_bytes"):
        DNOConfig(auto_budget_bytes=-1).validate()


def test_automatic_budget_is_comfyuis_view_of_free_memory(pack, monkeypatch):
    """On a GPU the budget is built from ComfyUI's get_free_memory, total and --reserve-vram (faked
    here: the CPU machine has no GPU); off CUDA there is none (the plan measures nothing there)."""
    memory, _ = pack
    mm = memory.mm
    cuda = torch.device("cuda", 0)
    asked = []
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: asked.append(dev) or 30 * GIB)
    monkeypatch.setattr(mm, "get_total_memory", lambda dev=None, torch_total_too=False: 40 * GIB)
    monkeypatch.setattr(mm, "extra_reserved_memory", lambda: 6 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 4 * GIB)
    assert memory.auto_budget_bytes(cuda) == 4 * GIB + 30 * GIB - 6 * GIB
    assert asked == [cuda]
    assert memory.auto_budget_bytes(torch.device("cpu")) is None


@pytest.mark.gpu
def test_the_core_plans_within_the_budget_the_host_passes():
    device = torch.device("cuda")
    sigmas = vp_sigmas(8)
    den = BlockDenoiser().to(device)

    def plan(budget):
        result = optimize(den, sigmas, Brightness(), block_decode, block_noise(sigmas, device), VP, eta=1.0,
                          config=DNOConfig(steps=1, lr=0.05, checkpoint="auto", auto_budget_bytes=budget,
                                           cuda_graphs=False),
                          regularizer=ProbabilityRegularizer(gamma=1.0, k=1, permutations=4))
        return result.memory_plan

    in_use = torch.cuda.memory_allocated(device)   # read before the runs: they leave memory allocated
    tight = plan(in_use)                                 # no room at all: store nothing
    roomy = plan(in_use + 8 * GIB)
    assert tight.budget_bytes == in_use and tight.stored_steps == 0
    assert roomy.stored_steps == 8


# --------------------------------------------------------------------------- reward models

def test_reward_dtype_is_the_runs_on_a_gpu_and_fp32_on_a_cpu(pack):
    memory, _ = pack
    assert memory.reward_dtype("fp16", torch.device("cuda", 0)) == torch.float16
    assert memory.reward_dtype("bf16", "cuda") == torch.bfloat16
    assert memory.reward_dtype("fp32", "cuda") == torch.float32
    for precision in ("fp16", "bf16", "fp32"):
        assert memory.reward_dtype(precision, "cpu") == torch.float32


def test_managed_reward_is_cast_counted_and_differentiable_in_bf16(pack, tmp_path):
    """Casting a reward model unloads it from ComfyUI, which then counts (and loads) its new size;
    in bf16 the gradient still reaches the image. A sum of rewards casts its model parts."""
    memory, rewards = pack
    # the node pack's own copy of the core (ComfyUI imports it as part of the package)
    core = sys.modules[rewards.__name__.rsplit(".nodes.", 1)[0] + ".dno.rewards"]
    BuiltinReward, WeightedReward = core.BuiltinReward, core.WeightedReward
    path, _ = fx.save_open_clip_file(str(tmp_path))
    with torch.inference_mode():          # as ComfyUI's executor runs the loader node
        reward = rewards._managed(core.load_clip_score_reward, path, quick_gelu=False, scale=100.0)
    mm = memory.mm
    loaded = lambda: any(m is reward.patcher for m in mm.loaded_models())
    fp32_size = reward.patcher.model_size()
    reward.prepare(torch.device("cpu"))
    assert loaded() and reward.dtype == torch.float32

    combined = WeightedReward([(reward, 1.0), (BuiltinReward("brightness"), 0.5)])
    assert memory.managed_rewards(combined) == [reward]
    combined.prepare(torch.device("cpu"), torch.bfloat16)
    assert reward.dtype == torch.bfloat16 and loaded()
    assert all(p.dtype == torch.bfloat16 for p in reward.parameters() if p.is_floating_point())
    assert reward.patcher.model_size() == fp32_size // 2 == mm.module_size(reward.inner)

    reward.cast(torch.float32)
    assert not loaded() and reward.patcher.model_size() == fp32_size
    reward.prepare(torch.device("cpu"), torch.bfloat16)
    images = torch.rand(2, 3, 40, 40).requires_grad_()
    reward(images, ["a cat", "a dog"]).sum().backward()
    assert images.grad.dtype == torch.float32
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    mm.unload_all_models()
    assert not loaded()


# --------------------------------------------------------------------------- two workflows back to back

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("memory-models")
    sd15_checkpoint(base / "checkpoints", vae="taesd", filename="v1-5-pruned-emaonly.safetensors")
    sd15_controlnet(base / "controlnet", filename="control_v11p_sd15_canny_fp16.safetensors")
    (base / "dno_rewards").mkdir()
    fx.save_open_clip_file(str(base / "dno_rewards"))
    return base


def run_workflows(models: Path, out: Path, device: str, *extra: str) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(RUNNER), "--device", device, "--models", str(models),
                           "--out", str(out), *extra], capture_output=True, text=True, timeout=1500, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def by_step(record: dict) -> list:
    return [(c["after"], c) for c in record["censuses"]]


def check_dno_was_seen_by_model_management(record: dict, reward_dtype: str = None) -> None:
    scores, loads = record["reward_scores"], record["declared_loads"]
    assert len(loads) == 4                     # four DNO runs, each with its one declared load
    assert all(load["memory_required"] > load["minimum_memory_required"] > 0 for load in loads)
    assert all({"BaseModel", "TAESD"} <= set(load["models"]) for load in loads)
    assert [("ControlNet" in load["models"]) for load in loads] == [False, True, False, True]
    assert scores and all(s["loaded"] for s in scores), "the reward model was scored while ComfyUI had it unloaded"
    assert any(s["grad"] for s in scores)
    expected = reward_dtype or loads[0]["unet_computes"]
    assert {s["dtype"] for s in scores} == {expected}
    # The cached SAMPLER keeps no result; its history handle (nodes/history.py) keeps one CPU copy
    # of each run's output latent (the key DNO Reward History looks the run up by), nothing else.
    for entry in record["cached_sampler"]:
        assert entry["type"] == "DNOHostSampler" and entry["result"] is False, entry
        assert all(device == "cpu" and dtype == "torch.float32" and len(shape) == 4 and shape[0] == 1
                   for shape, dtype, device in entry["tensors"]), entry
        assert len(entry["tensors"]) <= 2, entry     # two runs per DNO Sampler node in this sequence


def test_two_dno_workflows_back_to_back_give_their_memory_back_on_the_cpu(models, tmp_path):
    """plain, then (DNO Sampler workflow, DNO ControlNet workflow, plain) twice, through ComfyUI's
    executor. Tolerances: the tensor census is exact (a deterministic count of what Python can
    reach, 0 bytes); resident memory, which also holds the allocator's and Python's own free
    lists, may grow by 16 MiB from one round to the next (measured: 0.1 MiB)."""
    record = run_workflows(models, tmp_path / "cpu.json", "cpu")
    check_dno_was_seen_by_model_management(record, reward_dtype="float32")
    steps = by_step(record)
    assert [name for name, _ in steps] == ["start", "plain", "sampler", "controlnet", "plain", "sampler",
                                           "controlnet", "plain", "unload_all_models"]
    first, round1, round2 = steps[1][1], steps[4][1], steps[7][1]
    assert all(c["graph_tensors"] == 0 for _, c in steps), "an autograd graph outlived its run"
    # the second round leaves exactly what the first left: nothing accumulates per DNO run
    assert round2["tensor_bytes"] == round1["tensor_bytes"]
    assert round2["rss"] - round1["rss"] <= 16 * MIB, (round1["rss"], round2["rss"])
    # and the first left only the reward model, which the bounded reward cache keeps (and
    # ComfyUI counts as a loaded model)
    reward = {m["model"]: m for m in round1["loaded_models"]}["TextImageReward"]
    assert round1["tensor_bytes"]["cpu"] - first["tensor_bytes"]["cpu"] == record["reward_tensor_bytes"]
    assert reward["loaded_bytes"] == record["reward_scores"][0]["model_size"]
    assert steps[-1][1]["loaded_models"] == []       # ComfyUI can unload it like any model


@pytest.mark.gpu
def test_two_dno_workflows_back_to_back_give_their_memory_back_on_the_gpu(models, tmp_path):
    """The same on CUDA (512x512 images), with torch.cuda.memory_allocated (cuBLAS workspaces
    freed first): round two leaves what round one left (to 16 KiB, below the smallest result
    tensor, the 64 KiB latent), round one what the plain workflow left plus the reward model
    ComfyUI keeps loaded; once ComfyUI unloads every model, under 1 MiB stays on the GPU."""
    record = run_workflows(models, tmp_path / "cuda.json", "cuda", "--size", "512", "--steps", "4",
                           "--opt-steps", "3")
    check_dno_was_seen_by_model_management(record)
    assert record["reward_scores"][0]["dtype"] in ("float16", "bfloat16")
    assert all(s["device"] == "cuda" for s in record["reward_scores"])
    steps = by_step(record)
    first, round1, round2, unloaded = steps[1][1], steps[4][1], steps[7][1], steps[-1][1]
    allocated = lambda c: c["cuda"]["allocated"]
    assert all(c["graph_tensors"] == 0 for _, c in steps), "an autograd graph outlived its run"
    assert abs(allocated(round2) - allocated(round1)) <= 16 * KIB, (allocated(round1), allocated(round2))
    kept = allocated(round1) - allocated(first)
    assert abs(kept - record["reward_cuda_bytes"]) <= 16 * KIB, (kept, record["reward_cuda_bytes"])
    assert unloaded["loaded_models"] == []
    assert allocated(unloaded) - allocated(steps[0][1]) <= MIB, [(n, allocated(c)) for n, c in steps]
