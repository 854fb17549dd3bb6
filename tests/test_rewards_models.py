"""Each reward loader on a tiny random-weight model in the real file layout, against a direct
computation with open_clip / transformers on the same weights."""
from __future__ import annotations

import os

import pytest
import torch

from dno.rewards import (
    load_aesthetic_reward, load_clip_score_reward, load_hps_reward, load_pickscore_reward,
)
from dno.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from tests import reward_fixtures as fx

PROMPTS = ["a photo of a red fox in the snow", "an oil painting of a lighthouse"]
ATOL = 1e-5
# Scores that are 100 x a cosine are compared at 1e-5 on the cosine: float32 keeps ~7 digits, and
# two correct implementations already differ by a few ulps in the normalised embeddings.
SCALED_ATOL = 100 * ATOL


def _images(size=fx.TINY_IMAGE, batch=2, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _normalize(images):
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def _open_clip_features(model, images, prompts):
    import open_clip

    with torch.no_grad():
        image = _unit(model.encode_image(_normalize(images)))
        text = _unit(model.encode_text(open_clip.tokenize(prompts)))
    return image, text


def _hf_features(model, images, prompts):
    import open_clip

    def pooled(out):  # transformers 5 returns an output object, 4.x a tensor
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    with torch.no_grad():
        image = _unit(pooled(model.get_image_features(pixel_values=_normalize(images))))
        text = _unit(pooled(model.get_text_features(input_ids=open_clip.tokenize(prompts))))
    return image, text


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_clip_score_open_clip_file_matches_open_clip(tmp_path, quick_gelu):
    path, model = fx.save_open_clip_file(str(tmp_path), seed=5, quick_gelu=quick_gelu)
    reward = load_clip_score_reward(path, quick_gelu=quick_gelu)
    images = _images()
    image, text = _open_clip_features(model, images, PROMPTS)
    expected = 100.0 * (image * text).sum(-1)
    torch.testing.assert_close(reward(images, PROMPTS), expected, atol=SCALED_ATOL, rtol=0)


def test_clip_score_wrong_activation_changes_score(tmp_path):
    # QuickGELU vs GELU is not visible in the weights: the flag must really reach the model.
    path, model = fx.save_open_clip_file(str(tmp_path), seed=5, quick_gelu=True)
    right = load_clip_score_reward(path, quick_gelu=True)(_images(), PROMPTS)
    wrong = load_clip_score_reward(path, quick_gelu=False)(_images(), PROMPTS)
    assert (right - wrong).abs().max() > 1e-4


def test_hps_matches_open_clip_cosine(tmp_path):
    path, model = fx.save_hps_file(str(tmp_path))
    reward = load_hps_reward(path)
    images = _images(seed=1)
    image, text = _open_clip_features(model, images, PROMPTS)
    torch.testing.assert_close(reward(images, PROMPTS), (image * text).sum(-1), atol=ATOL, rtol=0)


def test_hps_single_prompt_is_used_for_every_image(tmp_path):
    path, _ = fx.save_hps_file(str(tmp_path))
    reward = load_hps_reward(path)
    images = _images(seed=1)
    both = reward(images, [PROMPTS[0], PROMPTS[0]])
    torch.testing.assert_close(reward(images, [PROMPTS[0]]), both)
    torch.testing.assert_close(reward(images, PROMPTS[0]), both)


@pytest.mark.parametrize("as_folder", [True, False])
def test_pickscore_matches_transformers(tmp_path, as_folder):
    if as_folder:
        path, model = fx.save_hf_clip_folder(str(tmp_path))
    else:
        path, model = fx.save_hf_clip_file(str(tmp_path))
    reward = load_pickscore_reward(path)
    images = _images(seed=2)
    image, text = _hf_features(model, images, PROMPTS)
    expected = model.logit_scale.exp().detach() * (image * text).sum(-1)
    torch.testing.assert_close(reward(images, PROMPTS), expected, atol=SCALED_ATOL, rtol=0)


def test_aesthetic_with_open_clip_weights(tmp_path):
    mlp_path, mlp_state = fx.save_aesthetic_file(str(tmp_path))
    clip_path, model = fx.save_open_clip_file(str(tmp_path), seed=6, quick_gelu=True)
    reward = load_aesthetic_reward(mlp_path, clip_path, quick_gelu=True)
    images = _images(seed=3)
    image, _ = _open_clip_features(model, images, PROMPTS)
    expected = _reference_mlp(mlp_state, image)
    torch.testing.assert_close(reward(images), expected, atol=ATOL, rtol=0)


def test_aesthetic_with_clip_vision_file(tmp_path):
    """ComfyUI clip_vision files are HF CLIPVisionModelWithProjection state dicts (no text tower)."""
    mlp_path, mlp_state = fx.save_aesthetic_file(str(tmp_path), suffix=".safetensors")
    model = fx.tiny_hf_clip(seed=7, hidden_act="quick_gelu")
    vision_only = {k: v for k, v in model.state_dict().items()
                   if k.startswith(("vision_model.", "visual_projection."))}
    clip_path = fx.save_safetensors(vision_only, os.path.join(tmp_path, "clip_vision_tiny.safetensors"))
    reward = load_aesthetic_reward(mlp_path, clip_path, quick_gelu=True)
    images = _images(seed=4)
    image, _ = _hf_features(model, images, PROMPTS)
    torch.testing.assert_close(reward(images), _reference_mlp(mlp_state, image), atol=ATOL, rtol=0)


def _reference_mlp(state, features):
    x = features
    for index in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    return x.squeeze(-1)


def _all_differentiable_rewards(tmp_path):
    d = str(tmp_path)
    mlp_path, _ = fx.save_aesthetic_file(d)
    clip_path, _ = fx.save_open_clip_file(d, seed=6, quick_gelu=True)
    hps_path, _ = fx.save_hps_file(d)
    pick_path, _ = fx.save_hf_clip_folder(d)
    return {
        "aesthetic": load_aesthetic_reward(mlp_path, clip_path),
        "hps": load_hps_reward(hps_path),
        "pickscore": load_pickscore_reward(pick_path),
        "clip_score": load_clip_score_reward(clip_path, quick_gelu=True),
    }


def test_gradients_reach_the_pixels_and_models_are_frozen(tmp_path):
    # 40x56 input: exercises resize (both passes) and crop/pad in the gradient path.
    for name, reward in _all_differentiable_rewards(tmp_path).items():
        assert reward.differentiable
        assert not any(p.requires_grad for p in reward.parameters()), name
        images = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(9)).requires_grad_()
        scores = reward(images, PROMPTS)
        assert scores.shape == (2,), name
        scores.sum().backward()
        grad = images.grad
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name
        # each image's score depends on its own pixels only
        assert grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0, name


def test_reward_moves_with_the_module_and_accepts_other_devices_inputs(tmp_path):
    path, _ = fx.save_hps_file(str(tmp_path))
    reward = load_hps_reward(path).to(torch.float64)
    out = reward(_images(seed=1), PROMPTS)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
