"""The reward protocol every DNO objective follows.

A reward maps a batch of images to one score per image; DNO *maximises* it.
Images are float tensors in [0, 1], shape (B, 3, H, W), on any device.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


class Reward(torch.nn.Module):
    """Base class for rewards.

    Subclasses implement :meth:`score`. ``differentiable`` tells the optimiser
    whether autograd through :meth:`score` gives a useful gradient; when it is
    ``False`` the optimiser uses the hybrid (zeroth-order) estimator instead.
    """

    name: str = "reward"
    differentiable: bool = True
    needs_prompt: bool = False      # scores the image against a text (HPSv2, PickScore, CLIP score)

    def score(self, images: torch.Tensor, prompts: Optional[Sequence[str]]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
        return self.score(images, prompts)
