"""The initial and per-step noise of a pipeline run, drawn as diffusers or as ComfyUI draws it.

``"diffusers"``: x_T as the pipeline's ``prepare_latents`` draws it
(``randn_tensor`` with the caller's generator or generators, in the
pipeline's dtype), then, for SDE sampling, one noise per step from the same
generator, as ``EulerAncestralDiscreteScheduler`` and ``DDIMScheduler(eta > 0)``
draw them. So DNO at 0 optimisation steps gives the pipeline's own image for
the same generator.

``"comfyui"``: x_T as ``comfy.sample.prepare_noise`` draws it from the seed
(on the CPU) and the step noises as its ancestral samplers do
(``default_noise_sampler``: a generator on the sampling device seeded with
the seed, one draw per step that ends above sigma 0). So the same seed gives
the DNO nodes' noise.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from ..errors import DNOError
from ..noise import DNONoise

SOURCES = ("diffusers", "comfyui")
Generators = Union[torch.Generator, List[torch.Generator], None]


def generators_for(seed: Union[int, Sequence[int], None], batch: int) -> Generators:
    """One CPU generator for an int seed (the whole batch from it, as ``pipe(generator=...)``),
    one per image for a list of seeds, None for no seed."""
    if seed is None:
        return None
    if isinstance(seed, int):
        return torch.Generator(device="cpu").manual_seed(seed)
    seeds = [int(s) for s in seed]
    if len(seeds) != batch:
        raise DNOError(f"seed: {len(seeds)} seeds for {batch} images; give one int or one seed per image")
    return [torch.Generator(device="cpu").manual_seed(s) for s in seeds]


def diffusers_noise(shape: Sequence[int], steps: int, sde: bool, generator: Generators, device: torch.device,
                    x_dtype: torch.dtype, step_dtype: torch.dtype,
                    latents: Optional[torch.Tensor] = None) -> DNONoise:
    from diffusers.utils.torch_utils import randn_tensor
    shape = tuple(int(s) for s in shape)
    if latents is not None:
        if tuple(latents.shape) != shape:
            raise DNOError(f"latents has shape {tuple(latents.shape)}, expected the unit-normal noise of shape "
                           f"{shape} (for Flux: unpacked, (batch, channels, height / 8, width / 8))")
        x_T = latents.to(device)
    else:
        x_T = randn_tensor(shape, generator=generator, device=device, dtype=x_dtype)
    step_noise = None
    if sde:
        step_noise = torch.stack([randn_tensor(shape, generator=generator, device=device, dtype=step_dtype).float()
                                  for _ in range(int(steps))])
    return DNONoise(x_T.float(), step_noise)


def comfyui_noise(shape: Sequence[int], seed: int, sigmas: Sequence[float], sde: bool,
                  device: torch.device) -> DNONoise:
    if not isinstance(seed, int):
        raise DNOError(f"noise='comfyui' takes one int seed for the batch (as ComfyUI's KSampler), got {seed!r}")
    shape = tuple(int(s) for s in shape)
    x_T = torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(seed)).to(device)
    step_noise = None
    if sde:
        generator = torch.Generator(device=device).manual_seed(seed)
        draws = []
        for i in range(len(sigmas) - 1):
            draws.append(torch.randn(shape, generator=generator, device=device) if sigmas[i + 1] > 0
                         else torch.zeros(shape, device=device))
        step_noise = torch.stack(draws)
    return DNONoise(x_T.float(), step_noise)
