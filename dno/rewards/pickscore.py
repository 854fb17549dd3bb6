"""PickScore: a CLIP ViT-H-14 fine-tuned on Pick-a-Pic, in Hugging Face ``CLIPModel`` layout.

Accepts the model folder (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``, with the
tokenizer files if present) or a single safetensors of the same state dict. Score as in the
PickScore reference: ``logit_scale.exp() * cosine(image, text)``; pixels as ``CLIPProcessor``
prepares them (shortest side 224, centre crop).
"""
from __future__ import annotations

from .clip_backbone import HF_MARKER, build_hf_clip
from .loading import load_state_dict, require_keys
from .text_image import TextImageReward

EXPECTED_PICKSCORE = "PickScore weights (Hugging Face CLIPModel layout, vision and text towers)"


def load_pickscore_reward(path: str) -> TextImageReward:
    state = load_state_dict(path, EXPECTED_PICKSCORE)
    require_keys(state, [HF_MARKER, "text_model.embeddings.token_embedding.weight"], path, EXPECTED_PICKSCORE)
    clip = build_hf_clip(state, path, quick_gelu=False, preprocess=None)
    return TextImageReward(clip, name="PickScore", use_logit_scale=True)
