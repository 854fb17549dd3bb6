"""Weighted sum of rewards.

Differentiable only when every part is: one non-differentiable part makes the optimiser treat the
whole sum as a black box (hybrid estimator), which is what mixing e.g. aesthetic and JPEG needs.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .base import Reward


class WeightedReward(Reward):
    def __init__(self, parts: Sequence[Tuple[Reward, float]]):
        super().__init__()
        parts = [(r, float(w)) for r, w in parts if r is not None]
        if not parts:
            raise ValueError("Combine rewards needs at least one reward.")
        for reward, _ in parts:
            if not isinstance(reward, Reward):
                raise TypeError(f"Combine rewards takes Reward objects, got {type(reward).__name__}.")
        self.rewards = torch.nn.ModuleList([r for r, _ in parts])
        self.weights = [w for _, w in parts]
        self.differentiable = all(r.differentiable for r in self.rewards)
        self.needs_prompt = any(getattr(r, "needs_prompt", False) for r in self.rewards)
        self.name = " + ".join(f"{w:g}*{r.name}" for r, w in zip(self.rewards, self.weights))

    def prepare(self, device, dtype: Optional[torch.dtype] = None) -> None:
        """Gets every part ready on ``device`` (parts that manage their own memory do it
        themselves, in ``dtype`` when given); the others are only moved."""
        for reward in self.rewards:
            prepare = getattr(reward, "prepare", None)
            if callable(prepare):
                prepare(device) if dtype is None else prepare(device, dtype)
            else:
                reward.to(device)

    def score(self, images: torch.Tensor, prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
        total = None
        for reward, weight in zip(self.rewards, self.weights):
            part = weight * reward.score(images, prompts).float().to(images.device)
            total = part if total is None else total + part
        return total
