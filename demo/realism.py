"""In-distribution measures for the shapes model: how much does an image look like the training data?

Two measures, neither needs a human:

``RealismClassifier`` / ``realism``
    A small CNN trained (by ``demo.train``) to tell shapes-dataset images from
    corrupted versions of them: brightness/contrast pushed until pixels clip,
    washed-out or crushed colours, additive noise, high-frequency patterns, blur,
    flattened or posterised images, channel shifts. ``realism(images)`` is its
    probability that each image is an uncorrupted dataset image. It measures
    *"no visible artefact of the kinds a reward hack produces"*, not beauty and
    not the full likelihood: an image it has never seen a corruption like could
    still fool it. It is never used as a reward, only as a judge, so DNO does not
    optimise against it.

``denoising_error``
    The diffusion model's own x0-prediction error on the image, averaged over
    fixed noise levels and fixed noise. Images the model has learned to denoise
    well are the ones near its training distribution (this is the per-image
    diffusion loss, a bound on the negative log-likelihood up to weighting).
    Lower is more in distribution.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from demo.model import WEIGHTS_DIR, encode, load_network

CLASSIFIER_WEIGHTS = WEIGHTS_DIR / "realism_classifier.safetensors"


class RealismClassifier(nn.Module):
    """Image [0,1] (B,3,32,32) -> logit that the image is an uncorrupted dataset image."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1, stride=2), nn.SiLU(),          # 16x16
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, stride=2), nn.SiLU(),  # 8x8
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.SiLU(),
        )
        # Mean and max pooling: max catches small local artefacts (a few clipped pixels).
        self.head = nn.Linear(8 * w, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.features(encode(images))
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return self.head(pooled)[:, 0]


def corrupt(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random corruption per image (the classifier's negatives), values in [0,1]."""
    n = images.shape[0]
    dev = gen.device   # the generator's device (the committed classifier: the CPU)
    kind = torch.randint(0, 9, (n,), generator=gen, device=dev).tolist()
    u = torch.rand(n, 1, 1, 1, generator=gen, device=dev).flatten().tolist()
    out = []
    noise = torch.randn(images.shape, generator=gen, device=dev).to(images.device)
    yy, xx = torch.meshgrid(torch.arange(images.shape[2], device=images.device),
                            torch.arange(images.shape[3], device=images.device), indexing="ij")
    checker = ((yy + xx) % 2).float() * 2 - 1
    for i in range(n):
        x, k, a, z = images[i], kind[i], u[i], noise[i]
        if k == 0:    # brighten until clipping (the brightness hack)
            x = (x * (1 + 1.5 * a) + 0.15 + 0.5 * a).clamp(0, 1)
        elif k == 1:  # darken until clipping
            x = (x * (1 - 0.7 * a) - 0.1 - 0.3 * a).clamp(0, 1)
        elif k == 2:  # wash out towards white (no clipping, just out-of-range values)
            x = x * (1 - 0.25 - 0.75 * a) + 0.25 + 0.75 * a
        elif k == 3:  # additive Gaussian noise
            x = (x + (0.03 + 0.3 * a) * z).clamp(0, 1)
        elif k == 4:  # high-frequency pattern (the incompressibility hack)
            x = (x + (0.05 + 0.3 * a) * checker * torch.sign(z)).clamp(0, 1)
        elif k == 5:  # blur
            x = F.avg_pool2d(x[None], 3 + 2 * int(a * 2), stride=1, padding=1 + int(a * 2), count_include_pad=False)[0]
        elif k == 6:  # flatten towards the mean colour / posterise (the compressibility hack)
            mean = x.mean(dim=(1, 2), keepdim=True)
            x = x * (0.5 - 0.5 * a) + mean * (0.5 + 0.5 * a)
            x = torch.round(x * 4) / 4 if a > 0.5 else x
        elif k == 7:  # over-saturate colours with clipping
            grey = x.mean(dim=0, keepdim=True)
            x = (grey + (x - grey) * (2.5 + 3 * a)).clamp(0, 1)
        else:         # per-channel shift with clipping
            x = (x + (0.2 + 0.4 * a) * torch.sign(z[:, :1, :1])).clamp(0, 1)
        out.append(x)
    return torch.stack(out)


def load_classifier(path: Path = CLASSIFIER_WEIGHTS, device: str = "cpu") -> RealismClassifier:
    return load_network(RealismClassifier, path, "realism classifier", device)


@torch.no_grad()
def realism(images: torch.Tensor, classifier: RealismClassifier) -> torch.Tensor:
    """Probability [B] that each image [0,1] is an uncorrupted shapes-dataset image."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"realism: images must be (B,3,H,W) in [0,1], got shape {tuple(images.shape)}")
    return torch.sigmoid(classifier(images.clamp(0, 1).float()))


@torch.no_grad()
def denoising_error(images: torch.Tensor, denoiser, sigmas: Sequence[float] = (0.2, 0.5, 1.0), seed: int = 0) -> torch.Tensor:
    """Mean squared x0-prediction error [B] of the model on ``images`` ([0,1]) at fixed noise levels."""
    x0 = encode(images.clamp(0, 1).float())
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(x0.shape[0])
    for s in sigmas:
        eps = torch.randn(x0.shape, generator=gen).to(x0.device)
        sigma = torch.full((x0.shape[0],), float(s), device=x0.device)
        pred = denoiser(x0 + s * eps, sigma)
        total += (pred - x0).pow(2).flatten(1).mean(dim=1).cpu()
    return total / len(sigmas)
