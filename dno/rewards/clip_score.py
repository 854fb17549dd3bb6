"""CLIP score: ``scale * cosine(image, prompt)`` with any CLIP the user has.

``scale`` defaults to 100, the convention of torchmetrics' CLIPScore (without its clamp at 0, which
would stop the gradient for poorly matching images). The file may be in open_clip or Hugging Face
layout; OpenAI-trained weights need ``quick_gelu=True``, LAION-trained ones ``False``.
"""
from __future__ import annotations

from .clip_backbone import load_clip_backbone
from .text_image import TextImageReward

CLIP_SCORE_SCALE = 100.0


def load_clip_score_reward(path: str, quick_gelu: bool = False, scale: float = CLIP_SCORE_SCALE) -> TextImageReward:
    clip = load_clip_backbone(path, quick_gelu=quick_gelu,
                              expected="a CLIP checkpoint with text tower (open_clip or HF layout)")
    if not clip.has_text:
        from .loading import RewardFileError

        raise RewardFileError(
            f"'{path}' holds only a CLIP image tower; CLIP score needs the text tower too (use a "
            "full CLIP checkpoint, not a clip_vision file)."
        )
    return TextImageReward(clip, name="CLIP score", scale=scale)
