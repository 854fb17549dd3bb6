"""The held-out judge of the objects model: which of the 16 prompts does an image show?

A small CNN trained (by ``demo.train_objects``) on dataset images with their labels, separately
from the learned reward (other seeds, another network, a classification loss), so it can check
the conditional model's samples without sharing the reward's blind spots:

* :func:`accuracy`: the share of images it labels with their prompt (the model's samples should
  be recognisable: >= 90 %);
* :func:`features` and :func:`kernel_distance`: its penultimate features and the kernel
  inception distance (KID, unbiased MMD^2 with the cubic polynomial kernel) between two image
  sets in that space; the feature-space distance of optimised samples from dataset images.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from demo.model import WEIGHTS_DIR, encode, load_network
from demo.objects import NUM_CLASSES

RECOGNISER_WEIGHTS = WEIGHTS_DIR / "objects_classifier.safetensors"


class ObjectClassifier(nn.Module):
    """Image [0,1] (B,3,32,32) -> logits over the 16 prompts; ``embed`` gives the features."""

    def __init__(self, width: int = 32, num_classes: int = NUM_CLASSES, feature_dim: int = 64):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1, stride=2), nn.GroupNorm(8, 2 * w), nn.SiLU(),       # 16x16
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1, stride=2), nn.GroupNorm(8, 4 * w), nn.SiLU(),   # 8x8
            nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.GroupNorm(8, 4 * w), nn.SiLU())
        self.embed_head = nn.Linear(8 * w, feature_dim)
        self.out = nn.Linear(feature_dim, num_classes)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        h = self.body(encode(images))
        return self.embed_head(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.embed(images)))


def load_recogniser(path: Path = RECOGNISER_WEIGHTS, device: str = "cpu") -> ObjectClassifier:
    return load_network(ObjectClassifier, path, "objects classifier", device)


@torch.no_grad()
def predict(images: torch.Tensor, classifier: ObjectClassifier) -> torch.Tensor:
    return classifier(images.clamp(0, 1).float()).argmax(dim=1)


@torch.no_grad()
def accuracy(images: torch.Tensor, labels: torch.Tensor, classifier: ObjectClassifier) -> float:
    return float((predict(images, classifier).cpu() == labels.cpu()).float().mean())


@torch.no_grad()
def features(images: torch.Tensor, classifier: ObjectClassifier) -> torch.Tensor:
    return torch.relu(classifier.embed(images.clamp(0, 1).float()))


def kernel_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """MMD^2 between feature sets a (m, d) and the reference b (n, d) with a Gaussian kernel.

    The kernel's width is the median distance between reference features (fixed by the reference,
    so every set is measured with the same kernel). The biased (V-statistic) estimate is used: it
    is never negative and, for sets of equal size, ranks them with far less noise than the
    unbiased one at the 8 samples a run has; a set drawn from the reference's distribution
    scores a small positive floor that shrinks with its size, not 0.
    """
    a, b = a.double(), b.double()
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("kernel_distance needs at least 2 samples in each set")
    width = torch.cdist(b, b).median().clamp_min(1e-6)
    k = lambda x, y: torch.exp(-torch.cdist(x, y).pow(2) / (2 * width ** 2))
    return float(k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean())
