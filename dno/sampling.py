"""Differentiable DDIM(eta) sampling in sigma space.

The sampler is a pure function of the noise: x_T and, for eta > 0, one
injected noise per step are explicit inputs, so gradient ascent on them is
ordinary autograd. Only sigmas, the schedule (see ``schedule.py``) and a
denoiser ``denoiser(x, sigma[B]) -> x0`` are needed, which is the convention
shared by k-diffusion and ComfyUI, so EPS, V and flow models all work.

eta = 1 is the ancestral / DDPM-posterior SDE sampler (the paper's default);
for a VP model it is exactly k-diffusion's ``euler_ancestral``. eta = 0 is
the deterministic DDIM ODE sampler, identical to Euler in sigma space.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from .checkpointing import checkpoint as _checkpoint
from .errors import DNOError
from .schedule import VP, NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def as_sigma_list(sigmas: Union[torch.Tensor, Sequence[float]]) -> List[float]:
    """Validate a sigma schedule and return it as Python floats.

    Floats keep the per-step coefficients out of the autograd graph and away
    from device synchronisation inside the loop.
    """
    values = [float(s) for s in (sigmas.tolist() if torch.is_tensor(sigmas) else sigmas)]
    if len(values) < 2:
        raise DNOError(f"sigmas must hold at least 2 values (got {len(values)}): "
                       "one sampling step goes from sigmas[i] to sigmas[i+1]")
    if not all(math.isfinite(s) and s >= 0 for s in values):
        raise DNOError(f"sigmas must be finite and non-negative, got {values}")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise DNOError(f"sigmas must be strictly decreasing, got {values}")
    return values


def ddim_coefficients(schedule: NoiseSchedule, sigma: float, sigma_next: float,
                      eta: float) -> Tuple[float, float, float]:
    """Coefficients (c_x0, c_eps, c_noise) of one DDIM(eta) step.

    With x = a_t x0 + b_t eps at sigma and a_s, b_s at sigma_next, DDIM sets
    x_next = a_s x0 + sqrt(b_s^2 - c^2) eps_hat + c z, where c is the fresh
    noise the schedule injects for eta (``NoiseSchedule.ancestral_noise``: the
    DDPM posterior std times eta, or ComfyUI's rectified-flow split).
    """
    a_s, b_s = schedule.signal(sigma_next), schedule.noise(sigma_next)
    if b_s == 0.0 or eta == 0.0:
        return a_s, b_s, 0.0
    c_noise = min(b_s, schedule.ancestral_noise(sigma, sigma_next, eta))
    c_eps = math.sqrt(max(0.0, b_s * b_s - c_noise * c_noise))
    return a_s, c_eps, c_noise


def step_uses_noise(schedule: NoiseSchedule, sigma: float, sigma_next: float, eta: float) -> bool:
    return ddim_coefficients(schedule, sigma, sigma_next, eta)[2] > 0.0


def ddim_step(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float,
              noise: Optional[torch.Tensor], eta: float, schedule: NoiseSchedule = VP) -> torch.Tensor:
    """One DDIM(eta) step from sigma to sigma_next given the denoised x0."""
    c_x0, c_eps, c_noise = ddim_coefficients(schedule, sigma, sigma_next, eta)
    eps = (x - x0 * schedule.signal(sigma)) / schedule.noise(sigma)
    x_next = x0 * c_x0 + eps * c_eps
    if c_noise > 0.0:
        if noise is None:
            raise DNOError(f"the step {sigma:.4g} -> {sigma_next:.4g} with eta={eta} needs an "
                           "injected noise; create the noise with sde=True")
        x_next = x_next + noise * c_noise
    return x_next


def denoise(denoiser: Denoiser, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The denoiser's x0 at sigma, in x's dtype."""
    return denoiser(x, x.new_full((x.shape[0],), sigma)).to(x.dtype)


def denoise_step(denoiser: Denoiser, schedule: NoiseSchedule, eta: float, sigma: float,
                 sigma_next: float, x: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
    """Call the denoiser at sigma and take one DDIM step (the checkpointed unit)."""
    return ddim_step(x, denoise(denoiser, x, sigma), sigma, sigma_next, noise, eta, schedule)


def stored_steps(window: int, checkpoint: Union[bool, int]) -> int:
    """How many window steps keep their activations instead of recomputing them.

    ``checkpoint=True`` recomputes every step (memory flat in the number of
    steps), ``False`` stores all, an int n stores n steps and recomputes the
    rest: the memory-aware middle ground.
    """
    if isinstance(checkpoint, str):
        raise DNOError(f"sample() takes checkpoint=True, False or a number of stored steps, got "
                       f"{checkpoint!r}; 'auto' and 'blocks' are resolved by dno.optimize")
    if checkpoint is True:
        return 0
    if checkpoint is False:
        return window
    return max(0, min(window, int(checkpoint)))


def sample(denoiser: Denoiser, noise, sigmas, schedule: NoiseSchedule = VP, eta: float = 1.0,
           latent: Optional[torch.Tensor] = None, full_denoise: bool = True,
           window: Optional[int] = None, checkpoint: Union[bool, int] = True) -> torch.Tensor:
    """Run DDIM(eta) from ``noise`` and return the final latent.

    ``noise`` is a :class:`dno.noise.DNONoise`. ``window`` = K is the paper's
    ``opt_time``: the last K sampling steps carry a graph through the
    denoiser, and the noise that enters the first of them stays
    differentiable with every noise after it. That noise is x_T when K
    covers every step, else the noise injected by the step before the
    window, whose own denoiser call runs without a graph (its input is
    fixed). So K reaches K noises, as in the official code: the last step
    injects none (sigma 0), and the noises and x_T before are fixed.
    ``None`` means every step, x_T included. ``latent`` is the starting
    image for img2img (sigmas then start below sigma_max and
    ``full_denoise`` is False).
    """
    sig = as_sigma_list(sigmas)
    n = len(sig) - 1
    noise.validate(n, eta, schedule, sig)
    window = n if window is None else int(window)
    if not 0 <= window <= n:
        raise DNOError(f"window must be between 0 and the number of steps ({n}), got {window}")
    first_graph_step = n - window
    keep = stored_steps(window, checkpoint)
    grad_on = torch.is_grad_enabled()

    x_T = noise.x_T if first_graph_step == 0 else noise.x_T.detach()
    x = schedule.start(sig[0], x_T, latent, full_denoise)
    for i in range(n):
        z = noise.steps[i] if noise.steps is not None else None
        args = (denoiser, schedule, eta, sig[i], sig[i + 1])
        if i < first_graph_step - 1:
            with torch.no_grad():
                x = denoise_step(*args, x, None if z is None else z.detach())
        elif i == first_graph_step - 1:
            # the step whose injected noise enters the window: only that noise is differentiable
            with torch.no_grad():
                x0 = denoise(denoiser, x, sig[i])
            x = ddim_step(x, x0, sig[i], sig[i + 1], z, eta, schedule)
        elif grad_on and i - first_graph_step >= keep:
            x = _checkpoint(denoise_step, *args, x, z)
        else:
            x = denoise_step(*args, x, z)
    return schedule.finish(sig[-1], x)
