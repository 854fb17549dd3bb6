"""Rewards computed from the pixels alone (no weights): brightness, darkness, saturation, contrast.

All are per-image means over pixels, so they do not depend on the resolution, and all are
differentiable. Brightness/darkness are the paper's "white"/"black" objectives; contrast is the
per-image version of the official code's variance of the channel sum.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .base import Reward


def _check(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"Rewards take images shaped (B, 3, H, W) in [0, 1]; got shape {tuple(images.shape)}."
        )
    return images.float()


def brightness(images: torch.Tensor) -> torch.Tensor:
    return _check(images).mean(dim=(1, 2, 3))


def saturation(images: torch.Tensor) -> torch.Tensor:
    """Mean chroma, max(R,G,B) - min(R,G,B): 0 for greys, 1 for pure primaries."""
    images = _check(images)
    return (images.amax(dim=1) - images.amin(dim=1)).mean(dim=(1, 2))


def contrast(images: torch.Tensor) -> torch.Tensor:
    """Variance over the pixels of the sum of the three channels (0 for a single pixel)."""
    values = _check(images).sum(dim=1).flatten(1)
    return values.var(dim=1, correction=min(1, values.shape[1] - 1))


BUILTIN_FUNCTIONS = {
    "brightness": brightness,
    "darkness": lambda images: -brightness(images),
    "saturation": saturation,
    "contrast": contrast,
}


class BuiltinReward(Reward):
    differentiable = True

    def __init__(self, kind: str):
        super().__init__()
        if kind not in BUILTIN_FUNCTIONS:
            raise ValueError(f"Unknown built-in reward {kind!r}; choose one of {sorted(BUILTIN_FUNCTIONS)}.")
        self.kind = kind
        self.name = kind

    def score(self, images: torch.Tensor, prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
        return BUILTIN_FUNCTIONS[self.kind](images)
