"""Optimising the JPEG rewards with the core's hybrid estimator moves the file size the right way.

A tiny denoiser on a 6x6 latent, decoded smoothly to 48x48 RGB: the same start is optimised once
for compressibility and once for incompressibility. Any move of the noise changes the JPEG size,
so the yardstick is a random move of the same length (x_T and step noises together, per image):
64 of them give the mean and spread of the size such a move reaches. Each optimised run must end
more than one spread beyond that mean, in its own direction. A random move does that with
probability about 0.16 per image and run (one-sided normal tail), so all four together about
6e-4: the claim "the estimator moves the size the reward's way" is what passes, not luck, and the
bound does not depend on a particular JPEG library's byte counts.
"""
from __future__ import annotations

import torch

from dno import DNOConfig, DNONoise, VP, optimize
from dno.rewards import JpegReward, jpeg_sizes_kb
from dno.sampling import sample
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


def _flat(noise: DNONoise) -> torch.Tensor:
    return torch.cat([noise.x_T.flatten(1), noise.steps.transpose(0, 1).flatten(1)], 1)


def _random_move_sizes(result, start: DNONoise, draws: int = 64):
    """Mean and standard deviation, per image, of the JPEG size after a random move of the noise
    as long as the optimised run's move."""
    length = (_flat(result.noise) - _flat(start)).norm(dim=1)
    gen = torch.Generator().manual_seed(1)
    sizes = []
    for _ in range(draws):
        x_T = torch.randn(start.x_T.shape, generator=gen)
        steps = torch.randn(start.steps.shape, generator=gen)
        scale = length / _flat(DNONoise(x_T, steps)).norm(dim=1)
        moved = DNONoise(start.x_T + x_T * scale.view(-1, 1, 1, 1), start.steps + steps * scale.view(1, -1, 1, 1, 1))
        with torch.no_grad():
            sizes.append(jpeg_sizes_kb(_decode(sample(ToyDenoiser("eps"), moved, SIGMAS, VP, eta=1.0))))
    sizes = torch.tensor(sizes)
    return sizes.mean(0), sizes.std(0)


def test_hybrid_optimisation_moves_jpeg_size_in_the_right_direction():
    smaller = _optimise(compress=True)
    larger = _optimise(compress=False)
    start = -smaller.initial_reward
    torch.testing.assert_close(start, larger.initial_reward)  # same start
    start_noise = DNONoise.from_seed((2, 4, 6, 6), 4, seed=0, sde=True)
    mean, spread = _random_move_sizes(smaller, start_noise)
    assert (_late_sizes(smaller, -1) < mean - spread).all(), (_late_sizes(smaller, -1), mean, spread)
    mean, spread = _random_move_sizes(larger, start_noise)
    assert (_late_sizes(larger, +1) > mean + spread).all(), (_late_sizes(larger, +1), mean, spread)
    # the returned latent is what the reward reported: its JPEG is that many kB
    sizes = torch.tensor(jpeg_sizes_kb(_decode(smaller.latent)))
    torch.testing.assert_close(-sizes, smaller.best_reward.float())
    assert (sizes < start).all()
