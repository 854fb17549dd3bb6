"""LAION aesthetic predictor (improved-aesthetic-predictor, ``sac+logos+ava1-l14-linearMSE.pth``).

An MLP on L2-normalised CLIP ViT-L/14 image embeddings. The released file is a bare state dict
with keys ``layers.{0,2,4,6,7}.{weight,bias}`` (768 -> 1024 -> 128 -> 64 -> 16 -> 1, with dropouts
at indices 1, 3, 5 that carry no weights); the sizes are read from the file, so any width works.
The CLIP it was trained on is OpenAI's ViT-L/14 (QuickGELU).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from .base import Reward
from .clip_backbone import ClipBackbone, load_clip_backbone
from .loading import RewardFileError, load_state_dict, require_keys

AESTHETIC_LINEAR_INDICES = (0, 2, 4, 6, 7)
# Dropout rates of the released model; inactive in eval mode, kept so the module mirrors it.
AESTHETIC_DROPOUTS = {1: 0.2, 3: 0.2, 5: 0.1}
EXPECTED_MLP = "the LAION aesthetic MLP (keys layers.0/2/4/6/7.weight and .bias)"


def build_aesthetic_mlp(state: Dict[str, torch.Tensor], path: str) -> torch.nn.Sequential:
    keys = [f"layers.{i}.{p}" for i in AESTHETIC_LINEAR_INDICES for p in ("weight", "bias")]
    require_keys(state, keys, path, EXPECTED_MLP)
    extra = sorted(set(state) - set(keys))
    if extra:
        raise RewardFileError(f"'{path}' is not {EXPECTED_MLP}: it has extra keys {extra[:4]}.")
    modules = []
    for index in range(max(AESTHETIC_LINEAR_INDICES) + 1):
        if index in AESTHETIC_LINEAR_INDICES:
            out_f, in_f = state[f"layers.{index}.weight"].shape
            modules.append(torch.nn.Linear(in_f, out_f))
        else:
            modules.append(torch.nn.Dropout(AESTHETIC_DROPOUTS[index]))
    mlp = torch.nn.Sequential(*modules)
    try:
        torch.nn.Module.load_state_dict(torch.nn.ModuleDict({"layers": mlp}), state)
    except RuntimeError as exc:
        raise RewardFileError(f"'{path}' is not {EXPECTED_MLP}: {exc}") from exc
    if mlp[-1].out_features != 1:
        raise RewardFileError(f"'{path}' is not {EXPECTED_MLP}: its last layer has "
                              f"{mlp[-1].out_features} outputs, expected 1.")
    return mlp.float().eval().requires_grad_(False)


class AestheticReward(Reward):
    name = "aesthetic"
    differentiable = True

    def __init__(self, clip: ClipBackbone, mlp: torch.nn.Sequential):
        super().__init__()
        self.clip = clip
        self.mlp = mlp

    def score(self, images: torch.Tensor, prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
        features = self.clip.image_features(images)
        return self.mlp(features.to(self.mlp[0].weight.dtype)).squeeze(-1).float()


def load_aesthetic_mlp(mlp_path: str) -> torch.nn.Sequential:
    """The aesthetic ``.pth``/``.safetensors`` file as a frozen MLP."""
    return build_aesthetic_mlp(load_state_dict(mlp_path, EXPECTED_MLP), mlp_path)


def aesthetic_reward(mlp: torch.nn.Sequential, clip: ClipBackbone, mlp_name: str, clip_name: str) -> AestheticReward:
    """The predictor on this CLIP, once the CLIP's embeddings are known to fit the MLP."""
    embed = mlp[0].in_features
    width = clip.image_embedding_size()
    if width != embed:
        raise RewardFileError(
            f"The aesthetic MLP '{mlp_name}' takes {embed}-d embeddings but the CLIP {clip_name} "
            f"gives {width}-d ones; the predictor needs CLIP ViT-L/14 (768-d)."
        )
    return AestheticReward(clip, mlp)


def load_aesthetic_reward(mlp_path: str, clip_path: str, quick_gelu: bool = True) -> AestheticReward:
    """``mlp_path``: the aesthetic ``.pth``/``.safetensors``; ``clip_path``: CLIP ViT-L/14 weights."""
    clip = load_clip_backbone(clip_path, quick_gelu=quick_gelu,
                              expected="CLIP ViT-L/14 weights for the aesthetic predictor")
    return aesthetic_reward(load_aesthetic_mlp(mlp_path), clip, mlp_path, f"'{clip_path}'")
