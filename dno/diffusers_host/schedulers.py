"""A diffusers scheduler read as the core's sigmas, schedule and model timesteps.

The core samples DDIM(eta) in sigma space (``dno.sampling``). What it needs from
a pipeline's scheduler is the noise level of every step, the model timestep
at each level, how the first latent is scaled from the unit-normal noise,
and in which space the scheduler hands back its final latent:

* ``EulerDiscreteScheduler`` / ``EulerAncestralDiscreteScheduler`` work in
  k-diffusion's form (``x = x0 + sigma * eps``, the core's own): their
  ``sigmas`` and ``timesteps`` are taken as they are, and the first latent is
  the noise times ``init_noise_sigma``. DDIM(eta = 1) on their sigmas is
  Euler ancestral, eta = 0 is Euler.
* ``DDIMScheduler`` works in the variance-preserving form
  (``x = sqrt(a) x0 + sqrt(1 - a) eps``): sigma = sqrt((1 - a) / a) at each
  timestep and, after the last, at the ``final_alpha_cumprod`` it steps to;
  its latents are the core's divided by sqrt(1 + sigma^2).
* ``FlowMatchEulerDiscreteScheduler`` (SD3, Flux): the core's flow form
  ``x = (1 - sigma) x0 + sigma eps``, its ``sigmas`` and ``timesteps`` as
  they are; eta = 0 is its Euler step. eta > 0 uses ComfyUI's ancestral split
  (``FLOW_RF``), as the nodes do on flow models.

Any other scheduler (PNDM, DPM-Solver, UniPC, ...) is rebuilt from its config
as Euler ancestral (eta > 0) or Euler (eta = 0) for VP models, and as
FlowMatch Euler for flow models, with a log line saying so: DNO's sampler is
DDIM(eta), and those schedulers are other samplers.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, List

import torch

from ..errors import DNOError
from ..schedule import FLOW, FLOW_RF, VP, WrappedSchedule

log = logging.getLogger("DNO")

PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow")
_TOLD = set()


@dataclass(frozen=True, eq=False)
class PipelineSchedule(WrappedSchedule):
    """The core's schedule, with the first and the last latent as the diffusers scheduler has them."""
    start_scale: float = 1.0    # first latent = unit noise * start_scale (in the core's sigma space)
    finish_scale: float = 1.0   # the scheduler's final latent = finish_scale * the core's

    def start(self, sigma, x_T, latent, full_denoise):
        if latent is not None:
            raise DNOError("the diffusers adapter runs text-to-image only (no start latent)")
        return x_T * self.start_scale

    def finish(self, sigma, x):
        return x if self.finish_scale == 1.0 else x * self.finish_scale


@dataclass
class SamplingPlan:
    scheduler: Any                  # the scheduler the plan was read from (a copy of the pipeline's)
    sigmas: List[float]             # the core's noise levels, n + 1 of them
    timesteps: torch.Tensor         # (n,) the model timestep at sigmas[i]
    schedule: PipelineSchedule
    prediction: str                 # one of PREDICTIONS

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1


def _classes():
    from diffusers import (DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                           FlowMatchEulerDiscreteScheduler)
    return DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, FlowMatchEulerDiscreteScheduler


def sampling_scheduler(scheduler, eta: float, flow: bool):
    """A fresh scheduler of the pipeline's kind (its state is left alone), or the Euler one DNO
    samples with when the pipeline's is another sampler."""
    ddim, euler, ancestral, flow_euler = _classes()
    known = (flow_euler,) if flow else (ddim, euler, ancestral)
    if isinstance(scheduler, known):
        return type(scheduler).from_config(scheduler.config)
    chosen = flow_euler if flow else (ancestral if eta > 0 else euler)
    if (type(scheduler), chosen) not in _TOLD:        # once per process, not once per job
        _TOLD.add((type(scheduler), chosen))
        log.info("DNO: the pipeline's %s is not a DDIM / Euler sampler; DNO samples DDIM(eta=%g) on the "
                 "sigmas of %s built from its config", type(scheduler).__name__, eta, chosen.__name__)
    return chosen.from_config(scheduler.config)


def plan_sampling(scheduler, steps: int, eta: float, flow: bool, **timestep_options) -> SamplingPlan:
    """Read ``steps`` sampling steps of (a copy of) ``scheduler`` as the core's sampling plan.

    ``timestep_options`` go to ``set_timesteps`` as the pipeline passes them (Flux: ``sigmas``
    and ``mu``; SD3 with dynamic shifting: ``mu``).
    """
    if int(steps) < 1:
        raise DNOError(f"steps (sampling steps) must be at least 1, got {steps}")
    scheduler = sampling_scheduler(scheduler, eta, flow)
    ddim, _, _, flow_euler = _classes()
    if timestep_options.get("sigmas") is not None:     # as the pipelines' retrieve_timesteps
        scheduler.set_timesteps(device="cpu", **timestep_options)
    else:
        scheduler.set_timesteps(int(steps), device="cpu", **timestep_options)
    if isinstance(scheduler, ddim):
        return _ddim_plan(scheduler)
    config = scheduler.config
    sigmas = [float(s) for s in scheduler.sigmas]
    timesteps = torch.as_tensor(scheduler.timesteps, dtype=torch.float32).clone()
    if len(sigmas) != len(timesteps) + 1:
        raise DNOError(f"{type(scheduler).__name__} gave {len(sigmas)} sigmas for {len(timesteps)} "
                       "timesteps; DNO needs one sigma per step and a last one to step to")
    if isinstance(scheduler, flow_euler):
        if config.get("stochastic_sampling", False):
            log.info("DNO: FlowMatchEulerDiscreteScheduler(stochastic_sampling=True) re-noises every step "
                     "its own way; DNO samples DDIM(eta=%g) on its sigmas instead", eta)
        base = FLOW if eta == 0 else FLOW_RF
        # the pipelines start from the unit noise itself (their first sigma is 1)
        schedule = PipelineSchedule(name=base.name, base=base, start_scale=1.0)
        return SamplingPlan(scheduler, sigmas, timesteps, schedule, "flow")
    prediction = _prediction(config)
    schedule = PipelineSchedule(name=VP.name, base=VP, start_scale=float(scheduler.init_noise_sigma))
    return SamplingPlan(scheduler, sigmas, timesteps, schedule, prediction)


def _prediction(config) -> str:
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS[:3]:
        raise DNOError(f"the scheduler's prediction_type {prediction!r} is not supported; DNO reads "
                       "'epsilon', 'v_prediction' and 'sample' models")
    return prediction


def _ddim_plan(scheduler) -> SamplingPlan:
    """DDIM in the VP form: sigmas from ``alphas_cumprod`` at its timesteps and at the one it ends on."""
    config = scheduler.config
    if config.get("thresholding", False) or config.get("clip_sample", False):
        raise DNOError("DDIMScheduler with clip_sample or thresholding clips x0 but keeps the model's own "
                       "noise estimate, which DNO's DDIM step does not reproduce: build the scheduler with "
                       "DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, thresholding=False)")
    alphas = scheduler.alphas_cumprod.double()
    timesteps = scheduler.timesteps.long()
    ratio = config.num_train_timesteps // scheduler.num_inference_steps
    following = timesteps - ratio
    if len(timesteps) > 1 and not torch.equal(following[:-1], timesteps[1:]):
        raise DNOError(f"DDIMScheduler with timestep_spacing {config.timestep_spacing!r} steps from each "
                       "timestep to one that is not the next timestep, which a sigma schedule cannot follow; "
                       "use timestep_spacing='leading' or EulerAncestralDiscreteScheduler")
    last = int(following[-1])
    final_alpha = float(alphas[last]) if last >= 0 else float(scheduler.final_alpha_cumprod)
    levels = [float(alphas[int(t)]) for t in timesteps] + [final_alpha]
    if min(levels) <= 0.0:
        raise DNOError("DDIMScheduler has a zero-SNR step (alphas_cumprod 0: rescale_betas_zero_snr), "
                       "whose sigma is infinite; DNO's sigma-space sampler cannot start there")
    sigmas = [math.sqrt((1.0 - a) / a) for a in levels]
    start = float(scheduler.init_noise_sigma) * math.sqrt(1.0 + sigmas[0] ** 2)
    finish = 1.0 / math.sqrt(1.0 + sigmas[-1] ** 2)
    schedule = PipelineSchedule(name=VP.name, base=VP, start_scale=start, finish_scale=finish)
    return SamplingPlan(scheduler, sigmas, timesteps.float(), schedule, _prediction(config))


class TimestepTable(torch.nn.Module):
    """sigma -> the scheduler's model timestep at that sigma (the nearest of the plan's levels).

    Tensor operations only (no read-back to Python), so a render that calls it can be captured
    as a CUDA graph.
    """

    def __init__(self, plan: SamplingPlan):
        super().__init__()
        self.register_buffer("levels", torch.tensor(plan.sigmas[:-1], dtype=torch.float32), persistent=False)
        self.register_buffer("timesteps", plan.timesteps.float(), persistent=False)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        levels = self.levels.to(sigma.device)
        index = (levels[None, :] - sigma.float().reshape(-1, 1)).abs().argmin(dim=1)
        return self.timesteps.to(sigma.device)[index]


def x0_from_prediction(prediction: str, out: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The denoised x0 from the model's output at ``sigma`` (x in the core's sigma space)."""
    s = sigma.reshape((-1,) + (1,) * (x.dim() - 1)).to(x.dtype)
    if prediction == "epsilon":
        return x - s * out
    if prediction == "v_prediction":
        return x / (s * s + 1) - s / (s * s + 1).sqrt() * out
    if prediction == "sample":
        return out
    if prediction == "flow":
        return x - s * out
    raise DNOError(f"unknown prediction type {prediction!r}; one of {PREDICTIONS}")


def model_input(prediction: str, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """What the network sees at ``sigma``: a VP model the variance-preserving sample
    (``scale_model_input`` of the Euler schedulers), a flow model the sample itself."""
    if prediction == "flow":
        return x
    s = sigma.reshape((-1,) + (1,) * (x.dim() - 1)).to(x.dtype)
    return x / (s * s + 1).sqrt()
