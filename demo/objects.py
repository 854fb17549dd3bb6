"""Procedural "objects" dataset with prompts: one coloured object of a named kind per 32x32 image.

The conditional demo model (``demo.model``, ``num_classes=16``) learns these images from their
prompt, "a red circle" ... "a blue cross": 4 kinds x 4 colours. Like ``demo.shapes``, every batch
is a pure function of a seed (and the device its generator runs on), so no files are needed.

What an image of prompt (kind, colour) is:
- a smooth two-colour gradient background of low saturation with a faint texture (stripes,
  checks or blobs), never a flat field;
- one anti-aliased object of the kind (circle, square, triangle, cross) in a flat colour of the
  colour's hue (+-0.03), saturation 0.45-1 and value 0.55-0.95, radius 0.12-0.30 of the image,
  centre anywhere in [0.2, 0.8]^2, any rotation;
- every pixel in [PIXEL_MIN, PIXEL_MAX] (as ``demo.shapes``: clipped black or white is not data).

``preference`` is the label the learned reward (``demo.preference``) is trained to predict: how
well an image fits "a large, centred, saturated object of the prompted kind", from the
parameters that drew it. It is the stand-in for a human preference score (aesthetic / HPS).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from demo.prompts import COLOURS, KINDS, NUM_CLASSES, PROMPTS, label_of  # noqa: F401 (re-exported)
from demo.shapes import IMAGE_SIZE, PIXEL_MAX, PIXEL_MIN, _hsv_to_rgb

HUES = {"red": 0.0, "yellow": 0.15, "green": 0.34, "blue": 0.62}

RADIUS = (0.12, 0.30)
CENTRE = (0.2, 0.8)
SATURATION = (0.45, 1.0)
VALUE = (0.55, 0.95)
HUE_JITTER = 0.03


@dataclass
class ObjectBatch:
    images: torch.Tensor        # (n, 3, H, W) in [PIXEL_MIN, PIXEL_MAX]
    labels: torch.Tensor        # (n,) class index into PROMPTS
    radius: torch.Tensor        # (n,) fraction of the image size
    offset: torch.Tensor        # (n,) distance of the centre from the image centre, fraction of the size
    saturation: torch.Tensor    # (n,) of the object's colour


def _rand(gen: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, device=gen.device)


def _background(gen: torch.Generator, n: int, size: int) -> torch.Tensor:
    device = gen.device
    coords = (torch.arange(size, dtype=torch.float32, device=device) + 0.5) / size - 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    angle = 2 * math.pi * torch.rand(n, generator=gen, device=device)
    ramp = ((torch.cos(angle)[:, None, None] * xx + torch.sin(angle)[:, None, None] * yy) + 0.5).clamp(0, 1)[:, None]
    colours = []
    for _ in range(2):   # low saturation, so that the object's colour is the image's colour
        colours.append(_hsv_to_rgb(torch.rand(n, generator=gen, device=device), _rand(gen, n, 0.0, 0.3),
                                   _rand(gen, n, 0.15, 0.85))[:, :, None, None])
    image = colours[0] + (colours[1] - colours[0]) * ramp
    kind = torch.randint(0, 3, (n,), generator=gen, device=device)
    f = (_rand(gen, n, 2.0, 6.0) * 2 * math.pi)[:, None, None]
    phase = (2 * math.pi * torch.rand(n, generator=gen, device=device))[:, None, None]
    stripes = torch.sin(f * (torch.cos(angle + 1.0)[:, None, None] * xx
                             + torch.sin(angle + 1.0)[:, None, None] * yy) + phase)
    checks = torch.sin(f * xx + phase) * torch.sin(f * yy)
    low = torch.randn(n, 1, 4, 4, generator=gen, device=device)
    blobs = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)[:, 0]
    blobs = blobs / blobs.flatten(1).abs().amax(dim=1).clamp_min(1e-6)[:, None, None]
    texture = torch.where((kind == 0)[:, None, None], stripes, torch.where((kind == 1)[:, None, None], checks, blobs))
    return image + _rand(gen, n, 0.02, 0.06)[:, None, None, None] * texture[:, None]


def _object_mask(kinds: torch.Tensor, cx, cy, r, rot, size: int) -> torch.Tensor:
    """Anti-aliased coverage [n,1,H,W] of one object per image, from signed distances."""
    coords = (torch.arange(size, dtype=torch.float32, device=kinds.device) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    cx, cy, r, rot = (v[:, None, None] for v in (cx, cy, r, rot))
    dx, dy = xx - cx, yy - cy
    u = torch.cos(rot) * dx + torch.sin(rot) * dy
    v = -torch.sin(rot) * dx + torch.cos(rot) * dy
    circle = torch.sqrt(dx ** 2 + dy ** 2) - r
    square = torch.maximum(u.abs(), v.abs()) - 0.82 * r
    triangle = torch.stack([torch.cos(rot + 2 * math.pi * k / 3) * dx + torch.sin(rot + 2 * math.pi * k / 3) * dy
                            for k in range(3)]).amax(dim=0) - 0.55 * r
    arm = 0.34 * r   # a plus sign: the union of two bars
    cross = torch.minimum(torch.maximum(u.abs() - r, v.abs() - arm), torch.maximum(v.abs() - r, u.abs() - arm))
    k = kinds[:, None, None]
    sdf = torch.where(k == 0, circle, torch.where(k == 1, square, torch.where(k == 2, triangle, cross)))
    return torch.sigmoid(-sdf * size * 2.0)[:, None]


def make_objects(seed: int, n: int, labels: Union[None, Sequence[int], torch.Tensor] = None,
                 device: Union[str, torch.device] = "cpu", size: int = IMAGE_SIZE) -> ObjectBatch:
    """``n`` images (of the given ``labels``, else random ones), a pure function of ``seed`` and ``device``."""
    if n <= 0:
        raise ValueError(f"make_objects: n must be positive, got n={n}")
    gen = torch.Generator(device=device).manual_seed(int(seed))
    device = gen.device
    if labels is None:
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen, device=device)
    else:
        labels = torch.as_tensor(labels, dtype=torch.long).to(device).reshape(-1)
        if labels.numel() != n or bool(((labels < 0) | (labels >= NUM_CLASSES)).any()):
            raise ValueError(f"make_objects: labels must be {n} class indices in [0, {NUM_CLASSES})")
    image = _background(gen, n, size)
    kinds, colours = labels // len(COLOURS), labels % len(COLOURS)
    r = _rand(gen, n, *RADIUS)
    cx, cy = _rand(gen, n, *CENTRE), _rand(gen, n, *CENTRE)
    rot = 2 * math.pi * torch.rand(n, generator=gen, device=device)
    hues = torch.tensor([HUES[c] for c in COLOURS], device=device)[colours]
    hue = (hues + _rand(gen, n, -HUE_JITTER, HUE_JITTER)) % 1.0
    sat = _rand(gen, n, *SATURATION)
    colour = _hsv_to_rgb(hue, sat, _rand(gen, n, *VALUE))[:, :, None, None]
    mask = _object_mask(kinds, cx, cy, r, rot, size)
    image = (image * (1 - mask) + colour * mask).clamp(PIXEL_MIN, PIXEL_MAX)
    offset = torch.sqrt((cx - 0.5) ** 2 + (cy - 0.5) ** 2)
    return ObjectBatch(image, labels, r, offset, sat)


def preference(batch: ObjectBatch, prompt_labels: torch.Tensor) -> torch.Tensor:
    """The preference score [n] in [0, 1] of each image for its prompt (the learned reward's target).

    Quality: the mean of size, centring and saturation, each scaled to [0, 1] over the dataset's
    range. An image of another kind or colour than the prompt's scores a fraction of it (0.4
    for one attribute right, 0.1 for none), so the reward also says "of the prompted kind".
    """
    size = (batch.radius - RADIUS[0]) / (RADIUS[1] - RADIUS[0])
    centred = 1 - batch.offset / (math.sqrt(2) * (0.5 - CENTRE[0]))
    saturated = (batch.saturation - SATURATION[0]) / (SATURATION[1] - SATURATION[0])
    quality = (size + centred + saturated) / 3
    prompt_labels = prompt_labels.to(batch.labels.device)
    right = (batch.labels // len(COLOURS) == prompt_labels // len(COLOURS)).float() \
        + (batch.labels % len(COLOURS) == prompt_labels % len(COLOURS)).float()
    factor = torch.where(right == 2, 1.0, torch.where(right == 1, 0.4, 0.1))
    return factor * quality
