"""Rewards that compare an image with its prompt through one CLIP model (HPSv2, PickScore, CLIP score).

They differ only in which file layout they accept, how pixels are prepared, and how the cosine
similarity is scaled; this module holds the shared part.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .base import Reward
from .clip_backbone import ClipBackbone
from .prompts import prompts_for_batch


class TextImageReward(Reward):
    """``scale * cosine(image_embedding, text_embedding)`` for each image and its prompt."""

    differentiable = True
    needs_prompt = True

    def __init__(self, clip: ClipBackbone, name: str, use_logit_scale: bool = False, scale: float = 1.0):
        super().__init__()
        self.clip = clip
        self.name = name
        self.use_logit_scale = use_logit_scale
        self.scale = float(scale)

    def score(self, images: torch.Tensor, prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
        texts = prompts_for_batch(prompts, images.shape[0], self.name)
        image_features = self.clip.image_features(images)
        text_features = self.clip.text_features(texts).to(image_features.device)
        cosine = (image_features * text_features).sum(dim=-1)
        if self.use_logit_scale:
            return self.clip.logit_scale().detach().float() * cosine
        return self.scale * cosine
