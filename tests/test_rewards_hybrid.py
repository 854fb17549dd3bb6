"""Optimising the JPEG rewards with the core's hybrid estimator moves the file size the right way.

A tiny denoiser on a 6x6 latent, decoded smoothly to 48x48 RGB: the same start is optimised once
for compressibility and once for incompressibility. A drift of the size that any perturbation
would cause cannot pass both: the sizes must move apart, each in its own direction.
"""
from __future__ import annotations

import torch

from dno import DNOConfig, DNONoise, VP, optimize
from dno.rewards import JpegReward, jpeg_sizes_kb
from tests.toy_models import ToyDenoiser, to_image, vp_sigmas

SIGMAS = vp_sigmas(4)


def _decode(latent):
    return torch.nn.functional.interpolate(to_image(latent), size=(48, 48), mode="bilinear",
                                           align_corners=False)


def _optimise(compress: bool):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the JPEG reward is discontinuous: fix the reduction order
    try:
        noise = DNONoise.from_seed((2, 4, 6, 6), 4, seed=0, sde=True)
        return optimize(ToyDenoiser("eps"), SIGMAS, JpegReward(quality=95, compress=compress), _decode,
                        noise, VP, eta=1.0,
                        config=DNOConfig(steps=20, lr=0.1, q=16, mu=0.05, method="hybrid", seed=0))
    finally:
        torch.set_num_threads(threads)


def _late_sizes(result, sign):
    # mean over the last five steps: the optimiser's current state, not a lucky best-so-far
    return sign * torch.tensor([h.reward for h in result.history[-5:]]).mean(0)


def test_hybrid_optimisation_moves_jpeg_size_in_the_right_direction():
    smaller = _optimise(compress=True)
    larger = _optimise(compress=False)
    start = -smaller.initial_reward
    torch.testing.assert_close(start, larger.initial_reward)  # same start
    assert (_late_sizes(smaller, -1) < start * 0.99).all(), (start, _late_sizes(smaller, -1))
    assert (_late_sizes(larger, +1) > start * 1.01).all(), (start, _late_sizes(larger, +1))
    # the returned latent is what the reward reported: its JPEG is that many kB
    sizes = torch.tensor(jpeg_sizes_kb(_decode(smaller.latent)))
    torch.testing.assert_close(-sizes, smaller.best_reward.float())
    assert (sizes < start).all()
