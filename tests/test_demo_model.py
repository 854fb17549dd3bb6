"""The demo's own pieces: dataset, committed weights, denoiser convention, realism measure, CLI."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from demo.model import DIFFUSION_WEIGHTS, decode, load_denoiser, sampling_sigmas
from demo.realism import CLASSIFIER_WEIGHTS, corrupt, denoising_error, load_classifier, realism
from demo.shapes import PIXEL_MAX, PIXEL_MIN, make_batch


@pytest.fixture(scope="module")
def denoiser():
    return load_denoiser()


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def test_dataset_is_a_pure_function_of_the_seed_and_never_reaches_black_or_white():
    a, b, c = make_batch(3, 16), make_batch(3, 16), make_batch(4, 16)
    assert a.shape == (16, 3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= PIXEL_MIN - 1e-6 and float(a.max()) <= PIXEL_MAX + 1e-6
    with pytest.raises(ValueError, match="n must be positive"):
        make_batch(0, 0)


def test_committed_weights_are_small_and_say_how_they_were_made():
    from safetensors import safe_open

    for path in (DIFFUSION_WEIGHTS, CLASSIFIER_WEIGHTS):
        assert path.stat().st_size <= 10 * 1024 * 1024, f"{path.name} is over 10 MB"
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        assert meta["command"].startswith("python -m demo.train")
        assert float(meta["train_seconds"]) < 15 * 60


def test_missing_weights_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="demo.train"):
        load_denoiser(tmp_path / "absent.safetensors")


def test_denoiser_follows_the_k_diffusion_convention(denoiser):
    x0 = make_batch(7, 4) * 2 - 1
    tiny = denoiser(x0, torch.full((4,), 1e-3))
    assert tiny.shape == x0.shape
    assert float((tiny - x0).abs().max()) < 0.05, "at sigma ~ 0 the denoiser must return its input"
    # At a moderate noise level the model removes most of the noise it was given.
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    pred = denoiser(x0 + 0.5 * eps, torch.full((4,), 0.5))
    assert float((pred - x0).pow(2).mean()) < 0.25 * float((0.5 * eps).pow(2).mean())
    sig = sampling_sigmas(10)
    assert len(sig) == 11 and float(sig[-1]) == 0.0 and bool((sig[:-1] > sig[1:]).all())


def test_decode_clamps_forward_but_passes_gradients_through_saturation():
    x = torch.tensor([[-3.0, 0.0, 3.0]], requires_grad=True)
    y = decode(x)
    assert y.tolist() == [[0.0, 0.5, 1.0]]
    y.sum().backward()
    assert x.grad.tolist() == [[0.5, 0.5, 0.5]]


def test_realism_separates_data_and_samples_from_reward_hacks(denoiser, classifier):
    from dno import DNONoise, VP, sample

    data = make_batch(20, 64)
    noise = DNONoise.from_seed((32, 3, 32, 32), 10, seed=21, sde=True)
    with torch.no_grad():
        samples = decode(sample(denoiser, noise, sampling_sigmas(10), VP, eta=1.0)).clamp(0, 1)
    white = (data * 2 + 0.5).clamp(0, 1)
    noisy = (data + 0.2 * torch.randn(data.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    corrupted = corrupt(make_batch(22, 64), torch.Generator().manual_seed(2))
    r = {k: float(realism(v, classifier).mean()) for k, v in
         dict(data=data, samples=samples, white=white, noisy=noisy, corrupted=corrupted).items()}
    e = {k: float(denoising_error(v, denoiser).mean()) for k, v in
         dict(data=data, samples=samples, white=white, noisy=noisy).items()}
    print(f"\nrealism {r}\ndenoise err {e}")
    assert r["data"] >= 0.7 and r["samples"] >= r["data"] - 0.3
    assert r["white"] <= 0.05 and r["noisy"] <= 0.2 and r["corrupted"] <= 0.5
    assert e["white"] > 2 * e["samples"] and e["noisy"] > 2 * e["samples"]
    with pytest.raises(ValueError, match=r"\(B,3,H,W\)"):
        realism(data[:, :1], classifier)


def test_demo_command_writes_grid_and_curve(tmp_path):
    from PIL import Image

    from demo.run_dno import main

    summary = main(["--opt-steps", "3", "--samples", "2", "--out", str(tmp_path)])
    grid, curve = tmp_path / "before_after.png", tmp_path / "reward_curve.png"
    assert grid.is_file() and curve.is_file()
    assert Image.open(grid).size[0] > 2 * 32 * 4
    assert len(summary.reward_curve) == 4 and float(summary.reward_after.mean()) >= float(summary.reward_before.mean())
    with pytest.raises(SystemExit):  # a usage error naming the shapes model's rewards
        main(["--reward", "sharpness", "--out", str(tmp_path)])
