"""How a noisy sample is formed from a clean one at noise level sigma.

Every model the sampler supports writes its noisy sample as
``x_sigma = signal(sigma) * x0 + noise(sigma) * eps``, with sigma the
k-diffusion / ComfyUI noise level:

* ``VP``: EPS- and V-prediction models (SD1.x, SD2.x, SDXL) in the
  k-diffusion "VE form": ``x = x0 + sigma * eps``. The network's input scaling
  ``1 / sqrt(1 + sigma^2)`` lives inside the denoiser, not here.
* ``FLOW``: rectified-flow / CONST models (SD3, Flux, AuraFlow):
  ``x = (1 - sigma) * x0 + sigma * eps``.

The schedule also says how the first sample is built from the unit-normal
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


VP = VPSchedule()
FLOW = FlowSchedule()
SCHEDULES = {"vp": VP, "eps": VP, "v": VP, "flow": FLOW, "const": FLOW}


def get_schedule(name_or_schedule) -> NoiseSchedule:
    if isinstance(name_or_schedule, NoiseSchedule):
        return name_or_schedule
    try:
        return SCHEDULES[str(name_or_schedule).lower()]
    except KeyError:
        from .errors import DNOError
        raise DNOError(f"unknown noise schedule {name_or_schedule!r}; "
                       f"use one of {sorted(SCHEDULES)}") from None
