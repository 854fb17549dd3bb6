"""The architecture inferred from shapes is the published one for the full-size checkpoints.

The models are built on the meta device (shapes only, no memory, no weights), in the same
layouts as the released files: open_clip ViT-L-14 / ViT-H-14 (aesthetic CLIP, HPSv2) and
Hugging Face CLIP ViT-H-14 (PickScore) / ViT-L-14 (OpenAI).
"""
from __future__ import annotations

import pytest
import torch

from dno.rewards import clip_shapes


@pytest.mark.parametrize("name", ["ViT-L-14", "ViT-H-14", "ViT-B-32", "ViT-bigG-14"])
def test_open_clip_configs_are_recovered(name):
    import open_clip

    published = open_clip.get_model_config(name)
    with torch.device("meta"):
        model = open_clip.model.CLIP(published["embed_dim"], published["vision_cfg"], published["text_cfg"])
    state = model.state_dict()
    vision = clip_shapes.open_clip_vision_config(state)
    text = clip_shapes.open_clip_text_config(state)
    assert clip_shapes.open_clip_embed_dim(state) == published["embed_dim"]
    for key, value in published["vision_cfg"].items():
        assert vision[key] == pytest.approx(value, rel=1e-4), key
    assert vision["head_width"] == published["vision_cfg"].get("head_width", 64)
    for key, value in published["text_cfg"].items():
        assert text[key] == value, key


# (vision hidden, layers, heads, patch), (text hidden, layers, heads), projection
HF_MODELS = {
    "PickScore / laion ViT-H-14": ((1280, 32, 16, 14), (1024, 24, 16), 1024),
    "openai clip-vit-large-patch14": ((1024, 24, 16, 14), (768, 12, 12), 768),
}


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_huggingface_configs_are_recovered(name):
    from transformers import CLIPConfig, CLIPModel

    (v_hidden, v_layers, v_heads, patch), (t_hidden, t_layers, t_heads), proj = HF_MODELS[name]
    config = CLIPConfig(
        vision_config=dict(hidden_size=v_hidden, intermediate_size=4 * v_hidden,
                           num_hidden_layers=v_layers, num_attention_heads=v_heads,
                           patch_size=patch, image_size=224),
        text_config=dict(hidden_size=t_hidden, intermediate_size=4 * t_hidden,
                         num_hidden_layers=t_layers, num_attention_heads=t_heads),
        projection_dim=proj,
    )
    with torch.device("meta"):
        state = CLIPModel(config).state_dict()
    vision = clip_shapes.hf_vision_config(state)
    text = clip_shapes.hf_text_config(state)
    assert vision == dict(hidden_size=v_hidden, intermediate_size=4 * v_hidden,
                          num_hidden_layers=v_layers, num_attention_heads=v_heads,
                          patch_size=patch, image_size=224, projection_dim=proj)
    assert text == dict(vocab_size=49408, hidden_size=t_hidden, intermediate_size=4 * t_hidden,
                        num_hidden_layers=t_layers, num_attention_heads=t_heads,
                        max_position_embeddings=77, projection_dim=proj)
