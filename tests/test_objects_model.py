"""The conditional objects model's pieces (issue 16): dataset, guidance, the learned reward, the
held-out recogniser and its feature distance, and the training script's resume."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from demo.model import GuidedDenoiser, OBJECTS_WEIGHTS, UNet, UNetConfig, decode, load_unet, sampling_sigmas
from demo.objects import NUM_CLASSES, PROMPTS, make_objects, preference
from demo.prompts import label_of
from demo.recognise import accuracy, features, kernel_distance, load_recogniser

REPO = Path(__file__).resolve().parents[1]


def test_objects_batches_are_a_pure_function_of_the_seed_and_stay_in_range():
    a, b = make_objects(3, 16), make_objects(3, 16)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, make_objects(4, 16).images)
    assert float(a.images.min()) >= 0.04 - 1e-6 and float(a.images.max()) <= 0.92 + 1e-6
    given = make_objects(5, 4, labels=[0, 5, 10, 15])
    assert given.labels.tolist() == [0, 5, 10, 15]
    with pytest.raises(ValueError, match="class indices"):
        make_objects(5, 2, labels=[0, 16])


def test_preference_rewards_the_prompted_kind_large_centred_and_saturated():
    data = make_objects(7, 256)
    own = preference(data, data.labels)
    other = preference(data, (data.labels + 5) % NUM_CLASSES)   # another kind and another colour
    assert bool((own >= 0).all() and (own <= 1).all())
    assert bool((other < own).all())
    big = data.radius > data.radius.median()
    assert float(own[big].mean()) > float(own[~big].mean())


def test_prompts_are_named_and_unknown_ones_refused():
    assert label_of("a red circle") == 0 and label_of("Blue  Cross") == 15 and PROMPTS[label_of(5)] == "a yellow square"
    with pytest.raises(ValueError, match="a red circle"):
        label_of("a purple star")


def test_guided_denoiser_tiles_its_labels_and_guidance_one_is_the_conditional_model():
    torch.manual_seed(0)
    unet = UNet(UNetConfig(channels=(16, 32), num_classes=NUM_CLASSES)).eval()
    labels = torch.tensor([1, 2])
    x, sigma = torch.randn(4, 3, 32, 32), torch.full((4,), 1.5)
    tiled = GuidedDenoiser(unet, labels, 3.0)(x, sigma)
    separately = torch.cat([GuidedDenoiser(unet, labels, 3.0)(x[:2], sigma[:2]),
                            GuidedDenoiser(unet, labels, 3.0)(x[2:], sigma[2:])])
    torch.testing.assert_close(tiled, separately, rtol=1e-4, atol=1e-5)
    one = GuidedDenoiser(unet, labels, 1.0)(x[:2], sigma[:2])
    c = 1 / torch.sqrt(1 + sigma[:2] ** 2)
    v = unet(x[:2] * c[:, None, None, None], torch.atan(sigma[:2]) * 2 / torch.pi, labels)
    torch.testing.assert_close(one, (c * c)[:, None, None, None] * x[:2] - (sigma[:2] * c)[:, None, None, None] * v,
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="3 images for 2 labels"):
        GuidedDenoiser(unet, labels)(x[:3], sigma[:3])
    with pytest.raises(ValueError, match="class-conditional"):
        GuidedDenoiser(UNet(UNetConfig(channels=(16, 32))), labels)


def test_the_committed_model_draws_recognisable_objects_of_every_prompt():
    """Issue 16: the held-out recogniser labels unoptimised samples with their prompt >= 90 % of the time
    (16 prompts x 8 seeds the experiment never uses, 10 steps): at the model's guidance (4) with
    ancestral and ODE sampling, and at the experiment's learned-reward setting (guidance 3, ODE)."""
    from dno import DNONoise, VP, sample

    torch.set_num_threads(2)
    unet, meta = load_unet(OBJECTS_WEIGHTS)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(8)
    assert float(meta["guidance"]) == 4.0
    recogniser = load_recogniser()
    noise = DNONoise.from_seed((labels.numel(), 3, 32, 32), 10, seed=4242, sde=True)
    for guidance, eta in ((4.0, 1.0), (4.0, 0.0), (3.0, 0.0)):
        den = GuidedDenoiser(unet, labels, guidance)
        with torch.no_grad():
            images = decode(sample(den, noise, sampling_sigmas(10), VP, eta=eta)).clamp(0, 1)
        assert accuracy(images, labels, recogniser) >= 0.90, f"guidance {guidance}, eta={eta}"
    # and the recogniser itself on dataset images it never saw
    data = make_objects(999_999, 256)
    assert accuracy(data.images, data.labels, recogniser) >= 0.98


def test_kernel_distance_is_small_within_the_data_and_large_for_corrupted_sets():
    recogniser = load_recogniser()
    ref = features(make_objects(1, 256).images, recogniser)
    same = kernel_distance(features(make_objects(2, 8).images, recogniser), ref)
    noisy_images = (make_objects(2, 8).images + 0.3 * torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    noisy = kernel_distance(features(noisy_images, recogniser), ref)
    assert 0 <= same < noisy and noisy > 5 * same
    with pytest.raises(ValueError, match="at least 2"):
        kernel_distance(ref[:1], ref)


def test_preference_reward_needs_a_prompt_and_scores_per_prompt():
    from demo.preference import PreferenceReward

    reward = PreferenceReward()
    data = make_objects(11, 4, labels=[0, 0, 0, 0])
    own = reward(data.images, ["a red circle"])
    wrong = reward(data.images, ["a blue square"] * 4)
    assert own.shape == (4,) and bool((own > wrong).all())
    images = data.images.clone().requires_grad_(True)
    reward(images, ["a red circle"]).sum().backward()
    assert images.grad is not None and float(images.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="pass prompts"):
        reward(data.images, None)
    with pytest.raises(ValueError, match="2 prompts for 4 images"):
        reward(data.images, ["a red circle", "a red square"])


def test_training_stops_at_its_time_limit_with_its_state_and_resumes(tmp_path):
    cmd = [sys.executable, "-m", "demo.train_objects", "--device", "cpu", "--diffusion-steps", "4", "--judge-steps", "2",
           "--batch", "8", "--out", str(tmp_path / "w"), "--work", str(tmp_path / "work"), "--eval-per-prompt", "1"]
    first = subprocess.run(cmd + ["--time-limit", "0"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 3, first.stdout + first.stderr
    assert (tmp_path / "work" / "diffusion_state.pt").is_file() and "resume" in first.stdout
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "diffusion: resumed at step 0" in second.stdout
    for name in ("diffusion", "classifier", "preference", "realism"):
        assert (tmp_path / "w" / f"objects_{name}.safetensors").is_file()
    unet, meta = load_unet(tmp_path / "w" / "objects_diffusion.safetensors")
    assert unet.config.num_classes == NUM_CLASSES and meta["steps"] == "4"
