"""DNO on the shapes model: one run, its in-distribution measures, and the best-of-N baseline.

Shared by the demo command (``demo.run_dno``) and the acceptance test, so both
measure the same thing the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from demo.model import ShapesDenoiser, decode, sampling_sigmas
from demo.realism import RealismClassifier, denoising_error, realism

IMAGE_SHAPE = (3, 32, 32)


class CountingDenoiser(torch.nn.Module):
    """Wraps a denoiser and counts forward evaluations per image (for equal-budget comparisons)."""

    def __init__(self, denoiser: torch.nn.Module):
        super().__init__()
        self.inner = denoiser
        self.image_evaluations = 0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.image_evaluations += x.shape[0]
        return self.inner(x, sigma)


def make_reward(name: str):
    """The demo's rewards by name, from the project's reward library."""
    from dno.rewards.builtin import BuiltinReward
    from dno.rewards.jpeg import JpegReward

    if name in ("brightness", "darkness", "saturation", "contrast"):
        return BuiltinReward(name)
    if name == "jpeg_incompressibility":
        return JpegReward(compress=False)
    if name == "jpeg_compressibility":
        return JpegReward(compress=True)
    raise ValueError(f"unknown demo reward {name!r}; choose brightness, darkness, saturation, contrast, "
                     "jpeg_incompressibility or jpeg_compressibility")


@dataclass
class RunSummary:
    reward_before: torch.Tensor          # (B,) unoptimised samples
    reward_after: torch.Tensor           # (B,) best sample found
    realism_before: torch.Tensor
    realism_after: torch.Tensor
    denoise_err_before: torch.Tensor
    denoise_err_after: torch.Tensor
    images_before: torch.Tensor          # (B,3,H,W) in [0,1]
    images_after: torch.Tensor
    reward_curve: List[List[float]]      # per step, per image
    denoiser_evaluations_per_image: float
    seconds: float
    stop_reason: str = ""
    probability_before: Optional[torch.Tensor] = None   # (B,) the paper's noise probability P, ~1 = typical
    probability_after: Optional[torch.Tensor] = None


def seed_noise(seeds: Sequence[int], sampling_steps: int, device="cpu"):
    """One sampling noise per seed (x_T and every step's), batched in the order of ``seeds``."""
    from dno import DNONoise

    parts = [DNONoise.from_seed((1,) + IMAGE_SHAPE, sampling_steps, seed=int(s), sde=True) for s in seeds]
    return DNONoise(torch.cat([p.x_T for p in parts]), torch.cat([p.steps for p in parts], dim=1)).to(device)


def noise_probability(noise, sigmas: torch.Tensor, eta: float = 1.0) -> torch.Tensor:
    """The paper's P of each sample's optimisable noise (x_T and the steps that inject noise):
    the product of the regulariser's block mean and covariance bounds, ~1 for typical noise."""
    from dno import ProbabilityRegularizer, VP
    from dno.noise import TrainableNoise
    from dno.optimize import optimized_noises

    sig = [float(s) for s in sigmas]
    steps, with_x_T = optimized_noises(VP, sig, eta, len(sig) - 1)
    flat = TrainableNoise(noise.detach().to("cpu"), steps, with_x_T).flat()
    return ProbabilityRegularizer(gamma=1.0, k=1, permutations=0).terms(flat.detach()).probability


def dno_run(denoiser: torch.nn.Module, classifier: RealismClassifier, reward, seeds: Sequence[int],
            gamma: float, steps: int, lr: float = 0.01, sampling_steps: int = 10, method: str = "auto",
            q: int = 8, mu: float = 0.01, permutations: int = 0, k: int = 1, precision: str = "fp32",
            callback: Optional[Callable] = None, prompts: Optional[Sequence[str]] = None, eta: float = 1.0,
            measuring_denoiser: Optional[torch.nn.Module] = None, device="cpu") -> RunSummary:
    """Run DNO from one noise per seed (batched: seeds are independent problems).

    ``prompts`` go to the reward; the denoising error is measured with ``measuring_denoiser``
    (default ``denoiser``; a guided model measures with its own unguided prediction).
    """
    import time

    from dno import DNOConfig, ProbabilityRegularizer, VP, optimize

    sigmas = sampling_sigmas(sampling_steps).to(device)
    noise = seed_noise(seeds, sampling_steps, device)
    counting = CountingDenoiser(denoiser)
    regularizer = ProbabilityRegularizer(gamma=gamma, k=k, permutations=permutations) if gamma > 0 else None
    config = DNOConfig(steps=steps, lr=lr, method=method, q=q, mu=mu, checkpoint=False,
                       estimator_batch=max(1, q // 2), precision=precision)
    curve: List[List[float]] = []
    first = {}

    def on_step(info):
        if info.step == 0:
            first["image"] = info.image.clone()
        curve.append(info.reward.tolist())
        if callback is not None:
            callback(info)

    probability_before = noise_probability(noise, sigmas, eta)
    start = time.time()
    result = optimize(counting, sigmas, reward, decode, noise=noise, schedule=VP, eta=eta,
                      config=config, regularizer=regularizer, prompts=prompts, callback=on_step)
    seconds = time.time() - start
    before, after = first["image"], result.image.clamp(0, 1)
    measuring = denoiser if measuring_denoiser is None else measuring_denoiser
    return RunSummary(
        reward_before=result.initial_reward.cpu(), reward_after=result.best_reward.cpu(),
        realism_before=realism(before, classifier), realism_after=realism(after, classifier),
        denoise_err_before=denoising_error(before, measuring), denoise_err_after=denoising_error(after, measuring),
        images_before=before.cpu(), images_after=after.cpu(), reward_curve=curve,
        denoiser_evaluations_per_image=counting.image_evaluations / len(seeds), seconds=seconds,
        stop_reason=result.stop_reason, probability_before=probability_before,
        probability_after=noise_probability(result.noise, sigmas, eta))


@torch.no_grad()
def best_of_n(denoiser: ShapesDenoiser, classifier: RealismClassifier, reward, seeds: Sequence[int], n: int,
              sampling_steps: int = 10, seed_stride: int = 100_000) -> RunSummary:
    """Best of ``n`` independent samples per seed: the baseline DNO must beat at equal evaluations."""
    from dno import VP, sample

    sigmas = sampling_sigmas(sampling_steps)
    counting = CountingDenoiser(denoiser)
    best_r, best_img, first_r, first_img = [], [], [], []
    for s in seeds:
        rewards, images = [], []
        for chunk_start in range(0, n, 32):
            m = min(32, n - chunk_start)
            noise = seed_noise([int(s) if j == 0 else int(s) + seed_stride * j
                                for j in range(chunk_start, chunk_start + m)], sampling_steps)
            img = decode(sample(counting, noise, sigmas, VP, eta=1.0)).clamp(0, 1)
            rewards.append(reward(img, None).float())
            images.append(img)
        rewards, images = torch.cat(rewards), torch.cat(images)
        k = int(rewards.argmax())
        best_r.append(rewards[k]), best_img.append(images[k])
        first_r.append(rewards[0]), first_img.append(images[0])
    before, after = torch.stack(first_img), torch.stack(best_img)
    return RunSummary(
        reward_before=torch.stack(first_r), reward_after=torch.stack(best_r),
        realism_before=realism(before, classifier), realism_after=realism(after, classifier),
        denoise_err_before=denoising_error(before, denoiser), denoise_err_after=denoising_error(after, denoiser),
        images_before=before, images_after=after, reward_curve=[],
        denoiser_evaluations_per_image=counting.image_evaluations / len(seeds), seconds=0.0)
