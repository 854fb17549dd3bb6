"""Rewards by name, for command lines: ``reward_from_name("aesthetic", files=...)``.

The names are the nodes' rewards. Those with weights read them from the files given, exactly as
the reward nodes do (``.safetensors`` preferred, other files with ``torch.load(weights_only=True)``).
"""
from __future__ import annotations

from typing import Optional

from .builtin import BUILTIN_FUNCTIONS, BuiltinReward
from .jpeg import DEFAULT_JPEG_QUALITY, JpegReward
from .loading import RewardFileError

WEIGHTED = {
    "aesthetic": "the LAION aesthetic MLP (sac+logos+ava1-l14-linearMSE.pth) as --reward-file and a CLIP "
                 "ViT-L/14 file as --clip-file",
    "hps": "HPS_v2_compressed.pt or HPS_v2.1_compressed.pt as --reward-file",
    "pickscore": "the PickScore_v1 folder or its model.safetensors as --reward-file",
    "clip-score": "a CLIP checkpoint with its text tower as --reward-file",
}
JPEG = {"jpeg-compressibility": True, "jpeg-incompressibility": False}
NAMES = tuple(BUILTIN_FUNCTIONS) + tuple(JPEG) + tuple(WEIGHTED)


def reward_from_name(name: str, reward_file: Optional[str] = None, clip_file: Optional[str] = None,
                     quick_gelu: Optional[bool] = None, jpeg_quality: int = DEFAULT_JPEG_QUALITY):
    """The reward called ``name`` (one of ``NAMES``), its weights read from the files given."""
    key = name.strip().lower().replace("_", "-")
    if key in BUILTIN_FUNCTIONS:
        return BuiltinReward(key)
    if key in JPEG:
        return JpegReward(quality=int(jpeg_quality), compress=JPEG[key])
    if key not in WEIGHTED:
        raise RewardFileError(f"unknown reward {name!r}; choose one of {', '.join(NAMES)}")
    needs_clip = key == "aesthetic"
    if reward_file is None or (needs_clip and clip_file is None):
        raise RewardFileError(f"the {key} reward needs {WEIGHTED[key]}")
    from . import load_aesthetic_reward, load_clip_score_reward, load_hps_reward, load_pickscore_reward
    if key == "aesthetic":
        return load_aesthetic_reward(reward_file, clip_file, quick_gelu=True if quick_gelu is None else quick_gelu)
    if key == "hps":
        return load_hps_reward(reward_file)
    if key == "pickscore":
        return load_pickscore_reward(reward_file)
    return load_clip_score_reward(reward_file, quick_gelu=bool(quick_gelu))
