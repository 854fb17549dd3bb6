"""The learned reward: a small network that scores "a large, centred, saturated object of the prompted kind".

The stand-in for LAION aesthetic / HPSv2 / PickScore on the objects model: a differentiable
network trained on labelled procedural images (``demo.objects.preference`` gives the label from
the parameters that drew each image), so DNO can optimise it by autograd, and can hack it: its
output is not bounded, and an image unlike any it was trained on can score above every real
one. ``demo.train_objects`` trains it; ``demo.alignment`` measures DNO on it.

Architecture: a CNN over the image plus two coordinate channels (so "centred" is visible to
convolutions), with the prompt's embedding modulating the features (FiLM) so the same image
scores differently for different prompts; mean and max pooling, then a small head.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from demo.model import WEIGHTS_DIR, encode, load_network
from demo.objects import NUM_CLASSES, label_of
from dno.rewards.base import Reward

PREFERENCE_WEIGHTS = WEIGHTS_DIR / "objects_preference.safetensors"


def _coords(images: torch.Tensor) -> torch.Tensor:
    b, _, h, w = images.shape
    ys = torch.linspace(-1, 1, h, device=images.device, dtype=images.dtype)
    xs = torch.linspace(-1, 1, w, device=images.device, dtype=images.dtype)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([yy, xx]).expand(b, 2, h, w)


class PreferenceNet(nn.Module):
    """(images [0,1] (B,3,32,32), labels (B,)) -> preference score (B,), unbounded."""

    def __init__(self, width: int = 32, num_classes: int = NUM_CLASSES):
        super().__init__()
        w = width
        self.num_classes = num_classes
        self.stem = nn.Sequential(nn.Conv2d(5, w, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(w, 2 * w, 3, padding=1, stride=2), nn.SiLU())   # 16x16
        self.film = nn.Embedding(num_classes, 4 * w)                                       # scale, shift
        self.body = nn.Sequential(nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(2 * w, 4 * w, 3, padding=1, stride=2), nn.SiLU(),  # 8x8
                                  nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.SiLU())
        self.head = nn.Sequential(nn.Linear(8 * w, 64), nn.SiLU(), nn.Linear(64, 1))

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = torch.cat([encode(images), _coords(images)], dim=1)
        h = self.stem(x)
        scale, shift = self.film(labels).chunk(2, dim=1)
        h = self.body(h * (1 + scale[:, :, None, None]) + shift[:, :, None, None])
        return self.head(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1))[:, 0]


def load_preference_net(path: Path = PREFERENCE_WEIGHTS, device: str = "cpu") -> PreferenceNet:
    return load_network(PreferenceNet, path, "objects preference reward", device)


class PreferenceReward(Reward):
    """DNO's reward protocol over :class:`PreferenceNet`: images scored against their prompts
    ("a red circle" ...; one prompt for the whole batch, or one per image)."""

    name = "preference"
    differentiable = True
    needs_prompt = True

    def __init__(self, net: Optional[PreferenceNet] = None):
        super().__init__()
        self.net = net if net is not None else load_preference_net()

    def score(self, images: torch.Tensor, prompts: Optional[Sequence[str]]) -> torch.Tensor:
        if not prompts:
            raise ValueError("the preference reward scores an image against its prompt: pass prompts, "
                             "e.g. ['a red circle'] (demo.objects.PROMPTS lists them)")
        labels = [label_of(p) for p in prompts]
        if len(labels) == 1:
            labels = labels * images.shape[0]
        if len(labels) != images.shape[0]:
            raise ValueError(f"the preference reward got {len(labels)} prompts for {images.shape[0]} images")
        labels = torch.tensor(labels, dtype=torch.long, device=images.device)
        return self.net(images.float(), labels)
