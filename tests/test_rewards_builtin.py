"""Weight-free rewards, JPEG sizes and weighted combinations."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dno.rewards import BuiltinReward, JpegReward, WeightedReward, cached_load, clear_reward_cache
from dno.rewards.cache import cached_count


def _images(seed=0, batch=3, size=24):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_builtin_values_on_known_images():
    grey = torch.full((1, 3, 8, 8), 0.25)
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1.0
    half = torch.zeros(1, 3, 8, 8)
    half[..., 4:] = 1.0  # left black, right white
    images = torch.cat([grey, red, half])
    torch.testing.assert_close(BuiltinReward("brightness")(images), torch.tensor([0.25, 1 / 3, 0.5]))
    torch.testing.assert_close(BuiltinReward("darkness")(images), -torch.tensor([0.25, 1 / 3, 0.5]))
    torch.testing.assert_close(BuiltinReward("saturation")(images), torch.tensor([0.0, 1.0, 0.0]))
    # channel sums: constant 0.75 / constant 1 / half 0 half 3 -> unbiased variance 9/4 * 64/63
    torch.testing.assert_close(BuiltinReward("contrast")(images),
                               torch.tensor([0.0, 0.0, 2.25 * 64 / 63]))


@pytest.mark.parametrize("kind", ["brightness", "darkness", "saturation", "contrast"])
def test_builtin_gradients_are_finite_and_non_zero(kind):
    images = _images().requires_grad_()
    reward = BuiltinReward(kind)
    assert reward.differentiable
    reward(images).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_unknown_builtin_is_rejected():
    with pytest.raises(ValueError, match="brightness"):
        BuiltinReward("sharpness")


def _pixels(seed=1, batch=3, size=24):
    """8-bit images as the reward should see them: uint8 (B, H, W, 3), mixed smooth and noisy."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size)[None, :, None] * np.ones((size, 1, 3))
    noise = rng.integers(0, 256, (batch, size, size, 3))
    mix = np.linspace(0.0, 1.0, batch)[:, None, None, None]       # flat ramp ... pure noise
    return np.clip(np.round((1 - mix) * ramp + mix * noise), 0, 255).astype(np.uint8)


def _ijg_luma_dc_step(quality):
    """The first luminance quantisation step libjpeg derives from ``quality`` (IJG scaling of 16)."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return max(1, (16 * scale + 50) // 100)


@pytest.mark.parametrize("quality", [95, 50])
def test_jpeg_rewards_are_the_jpeg_file_size_in_kb(quality, tmp_path):
    # The oracle: JPEG files written to disk from 8-bit pixels, their size read from the file system.
    pixels = _pixels()
    files = []
    for i, array in enumerate(pixels):
        files.append(tmp_path / f"{i}.jpg")
        Image.fromarray(array).save(files[-1], quality=quality)
        with Image.open(files[-1]) as written:               # really a JPEG at that quality
            assert written.format == "JPEG" and written.size == (array.shape[1], array.shape[0])
            assert written.quantization[0][0] == _ijg_luma_dc_step(quality)
    kilobytes = torch.tensor([f.stat().st_size / 1000.0 for f in files])
    assert (kilobytes.diff() > 0).all(), kilobytes           # the noisier, the bigger the file
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    incompress = JpegReward(quality=quality, compress=False)
    compress = JpegReward(quality=quality, compress=True)
    assert not incompress.differentiable and not compress.differentiable
    torch.testing.assert_close(incompress(images), kilobytes, rtol=0, atol=0)
    torch.testing.assert_close(compress(images), -kilobytes, rtol=0, atol=0)
    # floats are rounded to the nearest 8-bit level (not truncated) and clipped to [0, 1]
    off_level = (images - 0.3 / 255).clamp(min=0)
    torch.testing.assert_close(incompress(off_level), kilobytes, rtol=0, atol=0)
    overshoot = torch.where(images == 1, 1.5, torch.where(images == 0, -0.5, images))
    torch.testing.assert_close(incompress(overshoot), kilobytes, rtol=0, atol=0)


def test_jpeg_quality_is_the_encoders_quality():
    images = torch.from_numpy(_pixels(seed=2)).permute(0, 3, 1, 2).float() / 255
    low, high = JpegReward(quality=50, compress=False)(images), JpegReward(quality=95, compress=False)(images)
    assert (high > low).all(), (low, high)          # finer quantisation, bigger files


def test_jpeg_noise_is_bigger_than_flat():
    flat = torch.full((1, 3, 32, 32), 0.5)
    noisy = _images(size=32, batch=1)
    sizes = JpegReward(compress=False)(torch.cat([flat, noisy]))
    assert sizes[1] > 2 * sizes[0]


def test_jpeg_bad_quality():
    with pytest.raises(ValueError, match="1..100"):
        JpegReward(quality=0)


def test_weighted_sum_and_differentiability():
    images = _images(seed=2)
    bright, sat, jpeg = BuiltinReward("brightness"), BuiltinReward("saturation"), JpegReward()
    smooth = WeightedReward([(bright, 2.0), (sat, -0.5)])
    assert smooth.differentiable
    torch.testing.assert_close(smooth(images), 2.0 * bright(images) - 0.5 * sat(images))
    x = images.clone().requires_grad_()
    smooth(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

    mixed = WeightedReward([(bright, 1.0), (jpeg, 0.1)])
    assert not mixed.differentiable  # one black-box part: hybrid estimator for the whole
    torch.testing.assert_close(mixed(images), bright(images) + 0.1 * jpeg(images))
    assert "brightness" in mixed.name and "jpeg" in mixed.name


def test_weighted_sum_rejects_nothing_and_non_rewards():
    with pytest.raises(ValueError, match="at least one"):
        WeightedReward([])
    with pytest.raises(TypeError, match="Reward"):
        WeightedReward([(lambda x, p: x.mean(), 1.0)])


def test_cache_loads_once_per_file_and_reloads_changed_files(tmp_path):
    clear_reward_cache()
    calls = []

    def loader(path, scale=1.0):
        calls.append(path)
        return object()

    path = tmp_path / "w.bin"
    path.write_bytes(b"a")
    first = cached_load(loader, [str(path)], scale=2.0)
    assert cached_load(loader, [str(path)], scale=2.0) is first
    assert cached_load(loader, [str(path)], scale=3.0) is not first
    path.write_bytes(b"bb")  # size changes: a replaced file is loaded again
    assert cached_load(loader, [str(path)], scale=2.0) is not first
    # the replaced file's old model is dropped, not kept beside the new one
    assert len(calls) == 3 and cached_count() == 2
    clear_reward_cache()
    assert cached_count() == 0


def test_cache_keeps_at_most_a_few_models_and_frees_the_dropped_ones(tmp_path):
    import gc
    import weakref

    from dno.rewards import cache

    clear_reward_cache()

    class Model:
        pass

    def loader(path):
        return Model()

    paths = []
    for i in range(cache.MAX_CACHED + 2):
        paths.append(tmp_path / f"w{i}.bin")
        paths[-1].write_bytes(b"x" * (i + 1))
    refs = [weakref.ref(cached_load(loader, [str(p)])) for p in paths]
    gc.collect()
    assert cached_count() == cache.MAX_CACHED
    assert [r() is None for r in refs] == [True, True] + [False] * cache.MAX_CACHED
    # replacing a cached file frees its old model
    paths[-1].write_bytes(b"replaced")
    cached_load(loader, [str(paths[-1])])
    gc.collect()
    assert refs[-1]() is None and cached_count() == cache.MAX_CACHED
    clear_reward_cache()
