"""HPSv2 / HPSv2.1 (Human Preference Score): an open_clip ViT-H-14 fine-tuned on human choices.

The official ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` is ``{'state_dict': <open_clip
CLIP state dict>}`` (fp16). The score is the cosine of the normalised image and text embeddings,
as ``hpsv2.score`` computes it, with HPSv2's evaluation transform (longest side resized to 224,
padded to a square with black).
"""
from __future__ import annotations

from .clip_backbone import OPEN_CLIP_MARKER, build_open_clip
from .loading import load_state_dict, require_keys
from .preprocess import ClipPreprocess
from .text_image import TextImageReward

EXPECTED_HPS = "an HPSv2 checkpoint ({'state_dict': open_clip ViT-H-14 weights})"


def load_hps_reward(path: str) -> TextImageReward:
    state = load_state_dict(path, EXPECTED_HPS)
    require_keys(state, [OPEN_CLIP_MARKER, "token_embedding.weight"], path, EXPECTED_HPS)
    clip = build_open_clip(state, path, quick_gelu=False, preprocess=None)
    image_size = clip.preprocess.size
    clip.preprocess = ClipPreprocess(size=image_size, resize_mode="longest")
    return TextImageReward(clip, name="HPSv2", scale=1.0)
