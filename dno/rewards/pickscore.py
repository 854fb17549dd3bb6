"""PickScore: a CLIP ViT-H-14 fine-tuned on Pick-a-Pic, in Hugging Face ``CLIPModel`` layout.

Accepts the model folder (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``, with the
tokenizer files if present) or a single safetensors of the same state dict. Score as in the
PickScore reference: ``logit_scale.exp() * cosine(image, text)``; pixels as ``CLIPProcessor``
prepares them (shortest side 224, centre crop).
"""
from __future__ import annotations

from .clip_backbone import build_hf_clip, detect_layout
from .loading import RewardFileError, load_state_dict
from .text_image import TextImageReward

EXPECTED_PICKSCORE = "PickScore weights (Hugging Face CLIPModel layout, vision and text towers)"


def load_pickscore_reward(path: str) -> TextImageReward:
    state = load_state_dict(path, EXPECTED_PICKSCORE)
    if detect_layout(state) != "hf" or "text_model.embeddings.token_embedding.weight" not in state:
        sample = ", ".join(sorted(state)[:5])
        raise RewardFileError(
            f"'{path}' is not {EXPECTED_PICKSCORE}: it lacks 'vision_model.*' / 'text_model.*' "
            f"keys (its first keys are: {sample})."
        )
    clip = build_hf_clip(state, path, quick_gelu=False, preprocess=None)
    return TextImageReward(clip, name="PickScore", use_logit_scale=True)
