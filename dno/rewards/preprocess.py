"""Differentiable CLIP image preprocessing (resize, crop or pad, normalise), in torch only.

It reproduces the models' own PIL pipelines so that a reward scores a tensor the way the
reference code scores the same picture, while letting the gradient reach the pixels:

* open_clip ``image_transform(is_train=False)``: ``Resize(size, bicubic)`` of the shortest side,
  ``CenterCrop`` (offsets rounded), ``ToTensor``, ``Normalize``.
* HPSv2's evaluation transform: resize the *longest* side to ``size`` and pad to a square with 0
  (open_clip ``resize_mode='longest'``).
* Hugging Face ``CLIPImageProcessor``: shortest side resize, centre crop with offsets floored.

PIL's bicubic filter (a=-0.5, widened when downscaling) is what ``interpolate(..., antialias=True)``
implements, so upscaling and downscaling both match. PIL resizes 8-bit images in two passes
(horizontal, then vertical) and rounds to 8 bit after each; with ``pil_rounding=True`` (the default)
we do the same in the forward pass with a straight-through rounding, so the values agree with the
PIL pipeline (mean |diff| ~1e-5 after normalisation, a rare pixel one grey level off on exact ties)
while the gradient is that of the smooth resize. Recent Pillow runs the vertical pass first for some
non-square shapes (its own cost rule); there the agreement is ~3e-3 mean, like the smooth resize. ``pil_rounding=False`` gives the smooth resize
(within about one grey level of PIL). Measured in ``tests/test_rewards_preprocess.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

RESIZE_MODES = ("shortest", "longest")
CROP_ROUNDINGS = ("round", "floor")


@dataclass(frozen=True)
class ClipPreprocess:
    """How one CLIP model wants its pixels."""

    size: int = 224
    mean: Tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: Tuple[float, float, float] = OPENAI_CLIP_STD
    resize_mode: str = "shortest"  # "longest" = fit inside the square and pad (HPSv2)
    crop_rounding: str = "round"  # torchvision/open_clip round the crop offset, HF floors it
    fill: float = 0.0  # pixel value (in [0, 1]) used to pad in "longest" mode
    pil_rounding: bool = True  # reproduce PIL's 8-bit two-pass resize values (straight-through)

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.crop_rounding not in CROP_ROUNDINGS:
            raise ValueError(
                f"crop_rounding must be one of {CROP_ROUNDINGS}, got {self.crop_rounding!r}"
            )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return preprocess_images(images, self)


def resized_size(height: int, width: int, size: int, resize_mode: str) -> Tuple[int, int]:
    """Output (height, width) of the resize step, with the same integer rounding as the references."""
    if resize_mode == "longest":
        ratio = max(height / size, width / size)
        return round(height / ratio), round(width / ratio)
    # torchvision / HF: the short side becomes `size`, the long side is truncated, not rounded.
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _crop_offset(extent: int, crop: int, rounding: str) -> int:
    if rounding == "round":
        return int(round((extent - crop) / 2.0))
    return (extent - crop) // 2


def _pad_to(images: torch.Tensor, size: int, fill: float) -> torch.Tensor:
    height, width = images.shape[-2:]
    pad_w, pad_h = max(size - width, 0), max(size - height, 0)
    if pad_w == 0 and pad_h == 0:
        return images
    padding = (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2)
    return F.pad(images, padding, mode="constant", value=fill)


def center_crop(images: torch.Tensor, size: int, rounding: str) -> torch.Tensor:
    height, width = images.shape[-2:]
    top = _crop_offset(height, size, rounding)
    left = _crop_offset(width, size, rounding)
    return images[..., top : top + size, left : left + size]


def _round_to_8bit_straight_through(images: torch.Tensor) -> torch.Tensor:
    """Forward: the value PIL stores (nearest of 256 levels). Backward: identity."""
    rounded = torch.round(images * 255.0) / 255.0
    return images + (rounded - images).detach()


def _bicubic(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    out = F.interpolate(
        images, size=(height, width), mode="bicubic", align_corners=False, antialias=True
    )
    # PIL clamps the bicubic overshoot to the valid pixel range; doing the same keeps the match.
    return out.clamp(0.0, 1.0)


def resize_bicubic(
    images: torch.Tensor, height: int, width: int, pil_rounding: bool = False
) -> torch.Tensor:
    if images.shape[-2:] == (height, width):
        return images
    if not pil_rounding:
        return _bicubic(images, height, width)
    # PIL: horizontal pass, store 8 bit, vertical pass, store 8 bit.
    out = images
    if out.shape[-1] != width:
        out = _round_to_8bit_straight_through(_bicubic(out, out.shape[-2], width))
    if out.shape[-2] != height:
        out = _round_to_8bit_straight_through(_bicubic(out, height, width))
    return out


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def preprocess_images(images: torch.Tensor, config: ClipPreprocess) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> normalised (B, 3, size, size), differentiable."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"Rewards take images shaped (B, 3, H, W) in [0, 1]; got shape {tuple(images.shape)}."
        )
    if not images.is_floating_point():
        raise ValueError(f"Rewards take float images in [0, 1]; got dtype {images.dtype}.")
    height, width = images.shape[-2:]
    new_h, new_w = resized_size(height, width, config.size, config.resize_mode)
    out = resize_bicubic(images, new_h, new_w, config.pil_rounding)
    if config.resize_mode == "longest":
        out = _pad_to(out, config.size, config.fill)
    out = center_crop(out, config.size, config.crop_rounding)
    return normalize(out, config.mean, config.std)
