"""JPEG (in)compressibility, the DDPO/DNO non-differentiable objective.

Each image is rounded to 8 bit and encoded with PIL at ``quality`` (95 as in the reference code);
the size is in kilobytes (bytes / 1000). Compressibility is ``-size`` (DNO makes files smaller),
incompressibility ``+size``. There is no gradient: the optimiser uses the hybrid estimator.
"""
from __future__ import annotations

import io
from typing import List, Optional, Sequence

import torch

from .base import Reward

DEFAULT_JPEG_QUALITY = 95


def to_uint8_hwc(images: torch.Tensor):
    """(B, 3, H, W) floats in [0, 1] -> numpy (B, H, W, 3) uint8, as the reference code rounds."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"Rewards take images shaped (B, 3, H, W) in [0, 1]; got shape {tuple(images.shape)}."
        )
    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def jpeg_sizes_kb(images: torch.Tensor, quality: int = DEFAULT_JPEG_QUALITY) -> List[float]:
    from PIL import Image

    sizes = []
    for array in to_uint8_hwc(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=int(quality))
        sizes.append(buffer.tell() / 1000.0)
    return sizes


class JpegReward(Reward):
    differentiable = False

    def __init__(self, quality: int = DEFAULT_JPEG_QUALITY, compress: bool = True):
        super().__init__()
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {quality}.")
        self.quality = int(quality)
        self.compress = bool(compress)
        self.name = "jpeg_compressibility" if compress else "jpeg_incompressibility"

    def score(self, images: torch.Tensor, prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
        sizes = torch.tensor(jpeg_sizes_kb(images, self.quality), dtype=torch.float32,
                             device=images.device)
        return -sizes if self.compress else sizes
