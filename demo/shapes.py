"""Procedural "shapes" dataset: 32x32 RGB scenes of coloured shapes on textured backgrounds.

Every image is a pure function of a seed, so the dataset needs no files and the
trained model's training distribution can be re-created exactly in tests.

What makes an image "in distribution" (and what the realism measure can learn):
- a smooth two-colour gradient background with a faint low-amplitude texture
  (stripes, checks or smooth blobs), never a flat field;
- one to three anti-aliased shapes (circle, square, triangle) in a single flat colour;
- every pixel value lies in [PIXEL_MIN, PIXEL_MAX]: the data never contains
  clipped black or white, so saturated regions are a sign of leaving the data.
Brightness is deliberately broad (colour values from dark to light), so a
"brighter" image can be found *inside* the distribution, and extreme brightness
(pure white) cannot.
"""
from __future__ import annotations

import math

import torch

IMAGE_SIZE = 32
PIXEL_MIN = 0.04
PIXEL_MAX = 0.92


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Vectorised HSV -> RGB for tensors of shape [B]; returns [B, 3]."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=-1)
    f = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return v[:, None] - v[:, None] * s[:, None] * f


def _random_colours(gen: torch.Generator, n: int, v_low: float, v_high: float) -> torch.Tensor:
    h = torch.rand(n, generator=gen)
    s = 0.25 + 0.7 * torch.rand(n, generator=gen)
    v = v_low + (v_high - v_low) * torch.rand(n, generator=gen)
    return _hsv_to_rgb(h, s, v)


def _background(gen: torch.Generator, n: int, size: int) -> torch.Tensor:
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    angle = 2 * math.pi * torch.rand(n, generator=gen)
    ramp = (torch.cos(angle)[:, None, None] * xx + torch.sin(angle)[:, None, None] * yy) + 0.5
    ramp = ramp.clamp(0, 1)[:, None]  # [n,1,H,W]
    c0 = _random_colours(gen, n, 0.12, 0.88)[:, :, None, None]
    c1 = _random_colours(gen, n, 0.12, 0.88)[:, :, None, None]
    image = c0 + (c1 - c0) * ramp

    # Faint texture: stripes, checks or smooth blobs (low amplitude, low frequency).
    kind = torch.randint(0, 3, (n,), generator=gen)
    freq = 2.0 + 4.0 * torch.rand(n, generator=gen)
    phase = 2 * math.pi * torch.rand(n, generator=gen)
    f = freq[:, None, None] * 2 * math.pi
    stripes = torch.sin(f * (torch.cos(angle + 1.0)[:, None, None] * xx
                             + torch.sin(angle + 1.0)[:, None, None] * yy) + phase[:, None, None])
    checks = torch.sin(f * xx + phase[:, None, None]) * torch.sin(f * yy)
    low = torch.randn(n, 1, 4, 4, generator=gen)
    blobs = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)[:, 0]
    blobs = blobs / blobs.flatten(1).abs().amax(dim=1).clamp_min(1e-6)[:, None, None]
    texture = torch.where((kind == 0)[:, None, None], stripes, torch.where((kind == 1)[:, None, None], checks, blobs))
    amplitude = 0.03 + 0.05 * torch.rand(n, generator=gen)
    return image + amplitude[:, None, None, None] * texture[:, None]


def _shape_masks(gen: torch.Generator, n: int, size: int) -> torch.Tensor:
    """Anti-aliased coverage masks [n,1,H,W] of one random shape per image."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    cx = (0.2 + 0.6 * torch.rand(n, generator=gen))[:, None, None]
    cy = (0.2 + 0.6 * torch.rand(n, generator=gen))[:, None, None]
    r = (0.1 + 0.17 * torch.rand(n, generator=gen))[:, None, None]
    rot = (2 * math.pi * torch.rand(n, generator=gen))[:, None, None]
    dx, dy = xx - cx, yy - cy
    u = torch.cos(rot) * dx + torch.sin(rot) * dy
    v = -torch.sin(rot) * dx + torch.cos(rot) * dy
    # Signed distances (negative inside).
    circle = torch.sqrt(dx ** 2 + dy ** 2) - r
    square = torch.maximum(u.abs(), v.abs()) - 0.85 * r
    tri_d = []
    for k in range(3):  # equilateral triangle as the intersection of three half-planes
        a = rot + 2 * math.pi * k / 3
        tri_d.append(torch.cos(a) * dx + torch.sin(a) * dy - 0.5 * r * 1.2)
    triangle = torch.stack(tri_d).amax(dim=0)
    kind = torch.randint(0, 3, (n,), generator=gen)[:, None, None]
    sdf = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))
    return torch.sigmoid(-sdf * size * 2.0)[:, None]  # about one pixel of anti-aliasing


def make_batch(seed: int, n: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    """``n`` dataset images as float32 [n,3,size,size] in [0,1], a pure function of ``seed``."""
    if n <= 0:
        raise ValueError(f"make_batch: n must be positive, got n={n}")
    gen = torch.Generator().manual_seed(int(seed))
    image = _background(gen, n, size)
    num_shapes = torch.randint(1, 4, (n,), generator=gen)
    for i in range(3):
        mask = _shape_masks(gen, n, size) * (num_shapes > i).float()[:, None, None, None]
        colour = _random_colours(gen, n, 0.1, 0.9)[:, :, None, None]
        image = image * (1 - mask) + colour * mask
    return image.clamp(PIXEL_MIN, PIXEL_MAX)


def brightness(images: torch.Tensor) -> torch.Tensor:
    """Mean pixel value per image (the demo's reference brightness statistic)."""
    return images.flatten(1).mean(dim=1)
