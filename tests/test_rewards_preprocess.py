"""Each CLIP reward's torch preprocessing against the model's own PIL pipeline on a PIL image.

Achieved agreement (normalised units): identical when no resize is needed; with a resize, mean
|diff| ~1e-5 and at most ~2 % of values one 8-bit grey level apart (exact rounding ties in PIL's
fixed-point filter); the thresholds below are those measured numbers with some margin.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dno.rewards import load_clip_score_reward, load_hps_reward, load_pickscore_reward
from dno.rewards.preprocess import ClipPreprocess, OPENAI_CLIP_STD, preprocess_images
from tests import reward_fixtures as fx

ONE_LEVEL = 1.0 / 255.0 / min(OPENAI_CLIP_STD)
# (height, width): downscale, upscale, identity, non-square both ways
SHAPES = [(48, 48), (20, 20), (32, 32), (64, 48), (45, 70)]


def _pil_image(height, width, seed=0):
    gen = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(height // 4 + 1, width // 4 + 1, 3, generator=gen) * 255).byte().numpy()
    # a smooth picture with detail at several scales, like a decoded image
    return Image.fromarray(coarse).resize((width, height), Image.BILINEAR)


def _pil_processor_class():
    """The PIL-based CLIPImageProcessor: its own class in transformers 5, the default in 4.x."""
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        return CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor
        return CLIPImageProcessor


def _torchvision_processor_class():
    import transformers

    return getattr(transformers, "CLIPImageProcessorFast", None) if not hasattr(
        transformers, "CLIPImageProcessorPil") else transformers.CLIPImageProcessor


def _as_tensor(pil):
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float() / 255.0


def _assert_matches(ours, reference):
    assert ours.shape == reference.shape
    diff = (ours - reference).abs()
    assert diff.mean() < 1e-3
    assert (diff > 1e-3).float().mean() < 0.02
    assert diff.max() <= 2 * ONE_LEVEL + 1e-5


def _assert_differentiable(config, pil):
    images = _as_tensor(pil).requires_grad_()
    preprocess_images(images, config).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def rewards(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pre"))
    clip_path, _ = fx.save_open_clip_file(d)
    hps_path, _ = fx.save_hps_file(d)
    folder, _ = fx.save_hf_clip_folder(d)
    _pil_processor_class()(size={"shortest_edge": fx.TINY_IMAGE},
                          crop_size={"height": fx.TINY_IMAGE, "width": fx.TINY_IMAGE}).save_pretrained(folder)
    return {
        "clip_score": load_clip_score_reward(clip_path),
        "hps": load_hps_reward(hps_path),
        "pickscore": load_pickscore_reward(folder),
        "pick_folder": folder,
    }


@pytest.mark.parametrize("shape", SHAPES)
def test_clip_score_preprocess_equals_open_clip(rewards, shape):
    import open_clip

    config = rewards["clip_score"].clip.preprocess
    pil = _pil_image(*shape)
    reference = open_clip.image_transform(fx.TINY_IMAGE, is_train=False)(pil)[None]
    _assert_matches(config(_as_tensor(pil)), reference)
    _assert_differentiable(config, pil)


@pytest.mark.parametrize("shape", SHAPES)
def test_hps_preprocess_equals_hpsv2_longest_side_transform(rewards, shape):
    """HPSv2 evaluates with open_clip's transform at ``resize_longest_max=True``: fit and pad."""
    import open_clip

    config = rewards["hps"].clip.preprocess
    pil = _pil_image(*shape, seed=1)
    reference = open_clip.image_transform(fx.TINY_IMAGE, is_train=False, resize_mode="longest")(pil)[None]
    _assert_matches(config(_as_tensor(pil)), reference)
    _assert_differentiable(config, pil)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", ["pil", "torchvision"])
def test_pickscore_preprocess_equals_clip_image_processor(rewards, shape, backend):
    cls = _pil_processor_class() if backend == "pil" else _torchvision_processor_class()
    if cls is None:
        pytest.skip("this transformers has no torchvision CLIP image processor")
    processor = cls.from_pretrained(rewards["pick_folder"], local_files_only=True)
    config = rewards["pickscore"].clip.preprocess
    pil = _pil_image(*shape, seed=2)
    reference = processor(images=pil, return_tensors="pt")["pixel_values"]
    _assert_matches(config(_as_tensor(pil)), reference)
    _assert_differentiable(config, pil)


def test_smooth_resize_is_within_one_grey_level():
    import open_clip

    pil = _pil_image(48, 48)
    config = ClipPreprocess(size=32, pil_rounding=False)
    reference = open_clip.image_transform(32, is_train=False)(pil)[None]
    diff = (config(_as_tensor(pil)) - reference).abs()
    assert diff.max() <= ONE_LEVEL * 1.05


def test_pil_rounding_passes_the_smooth_gradient():
    images = _as_tensor(_pil_image(48, 40, seed=3)) * 0.8 + 0.1  # no clamping at 0 or 1
    weights = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    grads = []
    for pil_rounding in (True, False):
        x = images.clone().requires_grad_()
        (preprocess_images(x, ClipPreprocess(size=32, pil_rounding=pil_rounding)) * weights).sum().backward()
        grads.append(x.grad)
    # straight-through rounding: the gradient is the smooth resize's gradient
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_bad_image_shapes_are_rejected_clearly():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        preprocess_images(torch.rand(1, 32, 32, 3), ClipPreprocess(size=32))
