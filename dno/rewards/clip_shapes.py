"""Infers a CLIP architecture from the tensor shapes of its checkpoint.

Real reward checkpoints come without a config (the HPS ``.pt`` is a bare open_clip state dict, a
``clip_vision`` safetensors is a bare Hugging Face state dict), and a model *name* would only fit the
full-size file. Shapes give width, depth, patch size, image size, embedding size, context length and
vocabulary; the number of attention heads is not visible in the shapes, so it comes from the
published CLIP family (table below) and otherwise from the usual 64-wide heads.
"""
from __future__ import annotations

import math
import re
from typing import Dict, Mapping, Optional

import torch

# width -> heads of the released CLIP towers (OpenAI, LAION/open_clip): ViT-B/L/H/g/bigG.
VISION_HEADS = {768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}
TEXT_HEADS = {512: 8, 768: 12, 1024: 16, 1280: 20}
DEFAULT_HEAD_WIDTH = 64


def attention_heads(width: int, tower: str) -> int:
    table = VISION_HEADS if tower == "vision" else TEXT_HEADS
    if width in table:
        return table[width]
    return max(1, width // DEFAULT_HEAD_WIDTH)


def count_layers(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of distinct ``{prefix}{i}.`` blocks."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in state for m in [pattern.match(key)] if m}
    return max(indices) + 1 if indices else 0


def _grid_image_size(num_positions: int, patch_size: int) -> int:
    grid = math.isqrt(num_positions - 1)
    if grid * grid != num_positions - 1:
        raise ValueError(f"{num_positions - 1} patch positions do not form a square grid")
    return grid * patch_size


# ---------------------------------------------------------------- open_clip layout


def open_clip_vision_config(state: Mapping[str, torch.Tensor]) -> Dict:
    conv = state["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    layers = count_layers(state, "visual.transformer.resblocks.")
    heads = attention_heads(width, "vision")
    mlp_width = state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    config = dict(
        image_size=_grid_image_size(state["visual.positional_embedding"].shape[0], patch),
        layers=layers,
        width=width,
        head_width=width // heads,
        patch_size=patch,
        mlp_ratio=mlp_width / width,
    )
    if "visual.transformer.resblocks.0.ls_1.gamma" in state:
        config["ls_init_value"] = 1.0  # any value: it only switches the LayerScale parameters on
    if "visual.ln_pre.weight" not in state:
        config["no_ln_pre"] = True
    return config


def open_clip_text_config(state: Mapping[str, torch.Tensor]) -> Optional[Dict]:
    if "token_embedding.weight" not in state:
        return None
    vocab, width = state["token_embedding.weight"].shape
    mlp_width = state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    config = dict(
        context_length=state["positional_embedding"].shape[0],
        vocab_size=vocab,
        width=width,
        heads=attention_heads(width, "text"),
        layers=count_layers(state, "transformer.resblocks."),
        mlp_ratio=mlp_width / width,
    )
    if "transformer.resblocks.0.ls_1.gamma" in state:
        config["ls_init_value"] = 1.0
    return config


def open_clip_embed_dim(state: Mapping[str, torch.Tensor]) -> int:
    return int(state["visual.proj"].shape[1])


# ---------------------------------------------------------------- Hugging Face layout


def hf_vision_config(state: Mapping[str, torch.Tensor]) -> Dict:
    patch_w = state["vision_model.embeddings.patch_embedding.weight"]
    hidden, patch = patch_w.shape[0], patch_w.shape[-1]
    positions = state["vision_model.embeddings.position_embedding.weight"].shape[0]
    return dict(
        hidden_size=hidden,
        intermediate_size=state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=count_layers(state, "vision_model.encoder.layers."),
        num_attention_heads=attention_heads(hidden, "vision"),
        patch_size=patch,
        image_size=_grid_image_size(positions, patch),
        projection_dim=state["visual_projection.weight"].shape[0],
    )


def hf_text_config(state: Mapping[str, torch.Tensor]) -> Optional[Dict]:
    key = "text_model.embeddings.token_embedding.weight"
    if key not in state:
        return None
    vocab, hidden = state[key].shape
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=count_layers(state, "text_model.encoder.layers."),
        num_attention_heads=attention_heads(hidden, "text"),
        max_position_embeddings=state["text_model.embeddings.position_embedding.weight"].shape[0],
        projection_dim=state["text_projection.weight"].shape[0],
    )
