"""Reward models for DNO: ``reward(images, prompts) -> Tensor[B]``, images (B, 3, H, W) in [0, 1].

Heavy libraries (open_clip, transformers) are imported inside the loaders only.
"""
from .aesthetic import AestheticReward, aesthetic_reward, load_aesthetic_mlp, load_aesthetic_reward
from .base import Reward
from .builtin import BUILTIN_FUNCTIONS, BuiltinReward
from .cache import cached_load, clear_reward_cache
from .clip_backbone import ClipBackbone, load_clip_backbone
from .clip_score import load_clip_score_reward
from .combine import WeightedReward
from .hps import load_hps_reward
from .jpeg import DEFAULT_JPEG_QUALITY, JpegReward, jpeg_sizes_kb
from .loading import RewardFileError, load_state_dict
from .pickscore import load_pickscore_reward
from .preprocess import ClipPreprocess, preprocess_images
from .text_image import TextImageReward

__all__ = [
    "AestheticReward", "BUILTIN_FUNCTIONS", "BuiltinReward", "ClipBackbone", "ClipPreprocess",
    "DEFAULT_JPEG_QUALITY", "JpegReward", "Reward", "RewardFileError", "TextImageReward",
    "WeightedReward", "aesthetic_reward", "cached_load", "clear_reward_cache", "jpeg_sizes_kb",
    "load_aesthetic_mlp", "load_aesthetic_reward", "load_clip_backbone", "load_clip_score_reward",
    "load_hps_reward", "load_pickscore_reward", "load_state_dict", "preprocess_images",
]
