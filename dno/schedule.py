"""How a noisy sample is formed from a clean one at noise level sigma.

Every model the sampler supports writes its noisy sample as
``x_sigma = signal(sigma) * x0 + noise(sigma) * eps``, with sigma the
k-diffusion / ComfyUI noise level:

* ``VP``: EPS- and V-prediction models (SD1.x, SD2.x, SDXL) in the
  k-diffusion "VE form": ``x = x0 + sigma * eps``. The network's input scaling
  ``1 / sqrt(1 + sigma^2)`` lives inside the denoiser, not here.
* ``FLOW``: rectified-flow / CONST models (SD3, Flux, AuraFlow):
  ``x = (1 - sigma) * x0 + sigma * eps``. ``FLOW_RF`` is the same with
  ComfyUI's split of an ancestral (eta > 0) step into kept and fresh noise.

The schedule also says how much fresh noise an eta-step injects
(``ancestral_noise``), how the first sample is built from the unit-normal
x_T (``start``) and how the last one is turned back into a latent
(``finish``), matching ComfyUI's ``noise_scaling`` / ``inverse_noise_scaling``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class NoiseSchedule:
    name: str

    def signal(self, sigma: float) -> float:
        raise NotImplementedError

    def noise(self, sigma: float) -> float:
        raise NotImplementedError

    def start(self, sigma: float, x_T: torch.Tensor, latent: Optional[torch.Tensor],
              full_denoise: bool) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, sigma: float, x: torch.Tensor) -> torch.Tensor:
        return x

    def ancestral_noise(self, sigma: float, sigma_next: float, eta: float) -> float:
        """Std of the noise an eta-step from sigma to sigma_next injects.

        eta times the std of the DDPM posterior q(x_s | x_t, x0), with
        x = a x0 + b eps: c^2 = eta^2 b_s^2 (1 - (a_t b_s / (a_s b_t))^2).
        For VP models this is k-diffusion's ``euler_ancestral`` sigma_up.
        """
        a_t, b_t = self.signal(sigma), self.noise(sigma)
        a_s, b_s = self.signal(sigma_next), self.noise(sigma_next)
        ratio = (a_t * b_s) / (a_s * b_t) if a_s > 0 else 0.0
        return eta * b_s * math.sqrt(max(0.0, 1.0 - ratio * ratio))


@dataclass(frozen=True)
class VPSchedule(NoiseSchedule):
    name: str = "vp"

    def signal(self, sigma: float) -> float:
        return 1.0

    def noise(self, sigma: float) -> float:
        return sigma

    def start(self, sigma, x_T, latent, full_denoise):
        # A VP model's x_T has variance 1 + sigma_max^2 in VE form, not sigma^2:
        # this is what ComfyUI calls max_denoise.
        scale = math.sqrt(1.0 + sigma * sigma) if full_denoise else sigma
        x = x_T * scale
        return x if latent is None else x + latent


@dataclass(frozen=True)
class FlowSchedule(NoiseSchedule):
    name: str = "flow"

    def signal(self, sigma: float) -> float:
        return 1.0 - sigma

    def noise(self, sigma: float) -> float:
        return sigma

    def start(self, sigma, x_T, latent, full_denoise):
        x = x_T * sigma
        return x if latent is None else x + latent * (1.0 - sigma)

    def finish(self, sigma, x):
        return x if sigma == 0 else x / (1.0 - sigma)


@dataclass(frozen=True)
class FlowRFSchedule(FlowSchedule):
    """Flow models with ComfyUI's split of an ancestral step (``euler_ancestral_RF``,
    which ComfyUI's ``euler_ancestral`` runs for CONST models).

    It steps deterministically down to sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta),
    rescales the signal from 1 - sigma_down to 1 - sigma_next, and adds noise of
    std sqrt(sigma_next^2 - ((1 - sigma_next) sigma_down / (1 - sigma_down))^2). It keeps
    x0's coefficient (1 - sigma_next) and the total noise std (sigma_next) of DDIM; only
    the share of fresh noise differs from the DDPM posterior. DNO uses it on ComfyUI's
    flow models, so that 0 optimisation steps reproduce the host's ancestral sampler.
    """
    name: str = "flow-rf"

    def ancestral_noise(self, sigma: float, sigma_next: float, eta: float) -> float:
        sigma_down = sigma_next * (1.0 + (sigma_next / sigma - 1.0) * eta)
        kept = (1.0 - sigma_next) * sigma_down / (1.0 - sigma_down)
        return math.sqrt(max(0.0, sigma_next * sigma_next - kept * kept))


VP = VPSchedule()
FLOW = FlowSchedule()
FLOW_RF = FlowRFSchedule()


@dataclass(frozen=True, eq=False)
class WrappedSchedule(NoiseSchedule):
    """``base``'s coefficients, for a host that builds the first and last latent its own way
    (it overrides ``start`` / ``finish``): ComfyUI's model sampling, a diffusers scheduler."""
    base: NoiseSchedule = VP

    def signal(self, sigma):
        return self.base.signal(sigma)

    def noise(self, sigma):
        return self.base.noise(sigma)

    def ancestral_noise(self, sigma, sigma_next, eta):
        return self.base.ancestral_noise(sigma, sigma_next, eta)
SCHEDULES = {"vp": VP, "eps": VP, "v": VP, "flow": FLOW, "const": FLOW, "flow-rf": FLOW_RF}


def get_schedule(name_or_schedule) -> NoiseSchedule:
    if isinstance(name_or_schedule, NoiseSchedule):
        return name_or_schedule
    try:
        return SCHEDULES[str(name_or_schedule).lower()]
    except KeyError:
        from .errors import DNOError
        raise DNOError(f"unknown noise schedule {name_or_schedule!r}; "
                       f"use one of {sorted(SCHEDULES)}") from None
