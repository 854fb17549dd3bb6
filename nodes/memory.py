"""What ComfyUI's model management sees of a DNO run.

ComfyUI decides what stays on the GPU from the models it loaded (``load_models_gpu``) and the
memory a run says it needs besides them (``memory_required``, as its own trainer declares it in
comfy_extras/nodes_train.py). A DNO run needs far more than plain sampling: the activations its
backward pass keeps. So the sampler loads the UNet, ControlNets and VAE in one call with that
working set (and the reward models' weights) declared, and ComfyUI unloads other models until it
is free; then the reward models, in full. The automatic memory plan takes its budget from
ComfyUI's view of free memory after that. Reward models are ComfyUI models too (a
``ModelPatcher`` each, see ``nodes/rewards.py``): loaded, counted and unloaded like the others,
in the dtype the run computes in.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sampler_helpers

from ..dno.memory import GIB, budget_from_free, planned_working_set
from ..dno.optimize import DNOConfig, resolve_method

log = logging.getLogger("DNO")

# One stored sampling step's activations over ComfyUI's inference estimate of that model call
# (BaseModel.memory_required of the CFG batch), from the plans measured on an H200 (bf16,
# 2026-12-03, bench/results/2026-12-03-h200-graphs-run{1,2}.jsonl, step_gib / decode_gib):
# SD1.5 512² 1.22 GiB against 0.16 GiB (7.5x), SDXL 1024² 9.36 GiB against 0.51 GiB (18x).
# The larger is taken: a declaration that is too high only unloads models that could have
# stayed; one too low leaves the plan fewer steps to store.
STEP_ACTIVATION_FACTOR = 18.0
# One decode's activations over ComfyUI's inference estimate of it (VAE.memory_used_decode):
# 1.73 / 1.06 GiB for SD1.5 512², 6.91 / 4.25 GiB for SDXL 1024² (the same runs): 1.6x both.
DECODE_ACTIVATION_FACTOR = 1.6

_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def reward_dtype(precision: str, device) -> torch.dtype:
    """The dtype reward models run in: the run's precision (``"auto"``: the UNet's compute dtype)
    on a GPU, fp32 on a CPU (half-precision weights there are slow, fp16 partly unsupported;
    a bf16 run on a CPU autocasts the fp32 weights)."""
    if torch.device(device).type == "cpu":
        return torch.float32
    return _HALF.get(precision, torch.float32)


def managed_rewards(reward) -> list:
    """The rewards inside ``reward`` whose weights ComfyUI manages (each ManagedReward, with its
    ``patcher``: the reward itself, or the parts of a sum); none for rewards without weights."""
    if not isinstance(reward, torch.nn.Module):
        return []
    return [module for module in reward.modules()
            if isinstance(getattr(module, "patcher", None), comfy.model_patcher.ModelPatcher)]


def unload(patcher: comfy.model_patcher.ModelPatcher) -> bool:
    """Take one model out of ComfyUI's loaded models (its weights go to its offload device), as
    ``free_memory`` does for the models it picks. False if it was not loaded."""
    for index, loaded in enumerate(mm.current_loaded_models):
        if loaded.model is patcher:
            mm.current_loaded_models.pop(index).model_unload()
            return True
    return False


def model_call_bytes(base_model, shape) -> int:
    """ComfyUI's estimate for one plain model call on the CFG batch of ``shape``."""
    return int(base_model.memory_required([2 * int(shape[0])] + [int(s) for s in shape[1:]]))


def plain_decode_bytes(vae, shape) -> int:
    """ComfyUI's estimate for one plain decode of a latent of ``shape`` (0 if it has none)."""
    estimate = getattr(vae, "memory_used_decode", None)
    return 0 if estimate is None else int(estimate(list(shape), vae.vae_dtype))


def working_set_bytes(config: DNOConfig, reward, base_model, vae, shape, steps: int, weights_bytes: int) -> int:
    """The memory to declare for a DNO run besides its models' weights (``memory_required``).

    Without a gradient (zeroth-order estimates) the run renders ``estimator_batch`` copies at a
    time and keeps nothing; otherwise see ``dno.memory.planned_working_set``, with one stored
    step and one decode estimated from ComfyUI's own estimates (the factors above).
    """
    call, decode = model_call_bytes(base_model, shape), plain_decode_bytes(vae, shape)
    if resolve_method(config.method, reward) == "zeroth_order":
        return int(config.estimator_batch) * max(call, decode)
    step, decode = int(STEP_ACTIVATION_FACTOR * call), int(DECODE_ACTIVATION_FACTOR * decode)
    window = steps if not config.window else min(int(config.window), steps)
    budget = None if config.memory_budget_gb is None else int(config.memory_budget_gb * GIB)
    return planned_working_set(config.checkpoint, window, step, decode, budget, weights_bytes)


def plain_sampling_minimum(base_model, conds, shape) -> int:
    """What plain sampling needs at least besides the weights (ComfyUI's minimum for one model
    call without the CFG batch, and its ControlNets' inference memory): below it ComfyUI loads
    the weights partially, as it would for a plain KSampler."""
    _, controls_memory = comfy.sampler_helpers.get_additional_models(conds or {}, base_model.get_dtype())
    return int(base_model.memory_required([int(s) for s in shape])) + int(controls_memory)


def load_run_models(patchers, memory_required: int, minimum_memory_required: int) -> None:
    """Load every model of the run in one call with the run's working set declared: ComfyUI frees
    ``memory_required`` besides their weights (unloading other models), and loads weights only
    partially where not even ``minimum_memory_required`` is left. Outside inference mode, as
    ComfyUI's trainer does, so weights patched now (LoRAs) are ordinary tensors."""
    unique = list({id(p): p for p in patchers if p is not None}.values())
    if any(torch.device(p.load_device).type != "cpu" for p in unique):    # ComfyUI frees no CPU memory
        log.info("DNO: loading %d models with %.2f GiB declared for the run", len(unique),
                 memory_required / GIB)
    with torch.inference_mode(False):
        mm.load_models_gpu(unique, memory_required=memory_required,
                           minimum_memory_required=minimum_memory_required)


def auto_budget_bytes(device) -> Optional[int]:
    """The automatic memory plan's budget from ComfyUI's view of free memory on ``device``
    (``get_free_memory``: the driver's and the allocator's free memory) and its reserve for other
    programs (``--reserve-vram``); None off CUDA, where the plan measures nothing."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return budget_from_free(torch.cuda.memory_allocated(device), mm.get_free_memory(device),
                            mm.get_total_memory(device), mm.extra_reserved_memory())
