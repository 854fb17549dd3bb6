"""Acceptance for issue 6: the paper's central claims, measured on our own small diffusion model.

On the committed shapes model (demo/weights), over several seeds that were *not* used to tune
the settings (tuning used seeds 0..5):

* DNO raises the reward substantially within a fixed step budget;
* with gamma = 0 (no probability regulariser) the in-distribution measure collapses:
  the reward is hacked out of distribution;
* with the regulariser on, the in-distribution measure stays within a stated margin of the
  unoptimised samples while the reward still rises;
* DNO beats best-of-N sampling given the same number of denoiser (forward) evaluations.

Once for a differentiable reward (brightness, exact autograd) and once for a
non-differentiable one (JPEG file size, the hybrid estimator). Run with ``-s`` to see the
tables; they are also written to outputs/demo/alignment_results.txt.

In-distribution measures (demo/realism.py): ``realism`` is the probability, from a classifier
trained to tell dataset images from corrupted ones, that an image is an uncorrupted dataset
image (dataset ~0.78); ``denoise err`` is the model's own x0 error on the image.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from demo.experiment import best_of_n, dno_run, make_reward
from demo.model import load_denoiser
from demo.realism import load_classifier
from demo.run_dno import DEFAULTS

SEEDS = [10, 11, 12, 13, 14, 15]
SAMPLING_STEPS = 10
RESULTS = Path(__file__).resolve().parents[1] / "outputs" / "demo" / "alignment_results.txt"


@pytest.fixture(scope="module")
def models():
    # The JPEG reward is discontinuous, so runs amplify float differences from the CPU's
    # reduction order: pin the intra-op thread count so the numbers do not depend on which
    # tests ran before (results per seed still vary with thread count; the claims must not).
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield load_denoiser(), load_classifier()
    torch.set_num_threads(threads)


def _m(t: torch.Tensor) -> float:
    return float(t.float().mean())


def _table(title: str, rows) -> str:
    lines = [title,
             f"{'method':34s} {'evals/img':>9s} {'reward before':>13s} {'reward after':>12s} "
             f"{'realism before':>14s} {'realism after':>13s} {'denoise err before':>18s} {'after':>7s}"]
    for name, r in rows:
        lines.append(f"{name:34s} {r.denoiser_evaluations_per_image:9.0f} {_m(r.reward_before):13.3f} "
                     f"{_m(r.reward_after):12.3f} {_m(r.realism_before):14.3f} {_m(r.realism_after):13.3f} "
                     f"{_m(r.denoise_err_before):18.4f} {_m(r.denoise_err_after):7.4f}")
    for name, r in rows:
        per_seed = ", ".join(f"{a:.3f}->{b:.3f}" for a, b in zip(r.reward_before.tolist(), r.reward_after.tolist()))
        real = ", ".join(f"{b:.2f}" for b in r.realism_after.tolist())
        lines.append(f"  {name}: reward per seed {per_seed}; realism after per seed {real}")
    lines.append("(evals/img counts denoiser forward passes per image, DNO's perturbed renders included; "
                 "DNO's backward passes come on top)")
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(text + "\n\n")
    return text


def _runs(models, reward_name: str):
    denoiser, classifier = models
    settings = DEFAULTS[reward_name]
    reward = make_reward(reward_name)
    common = dict(steps=settings["steps"], lr=settings["lr"], sampling_steps=SAMPLING_STEPS,
                  q=settings["q"], mu=settings["mu"], permutations=8)
    hacked = dno_run(denoiser, classifier, reward, SEEDS, gamma=0.0, **common)
    regular = dno_run(denoiser, classifier, reward, SEEDS, gamma=settings["gamma"], **common)
    n = round(regular.denoiser_evaluations_per_image / SAMPLING_STEPS)
    baseline = best_of_n(denoiser, classifier, reward, SEEDS, n, sampling_steps=SAMPLING_STEPS)
    assert baseline.denoiser_evaluations_per_image == pytest.approx(regular.denoiser_evaluations_per_image)
    _table(f"== {reward_name}: {len(SEEDS)} seeds, {settings['steps']} DNO steps, lr {settings['lr']}, "
           f"{SAMPLING_STEPS} sampling steps ==",
           [("DNO gamma=0 (no regulariser)", hacked),
            (f"DNO gamma={settings['gamma']} (regularised)", regular),
            (f"best-of-{n} (equal evaluations)", baseline)])
    return hacked, regular, baseline


def test_brightness_dno_hacks_without_regulariser_and_stays_in_distribution_with_it(models):
    hacked, regular, baseline = _runs(models, "brightness")
    before_reward, before_realism = _m(regular.reward_before), _m(regular.realism_before)

    # The reward rises substantially in 20 steps (dataset brightness: mean 0.34, sd 0.10).
    assert _m(regular.reward_after) - before_reward >= 0.10, "regularised DNO should raise brightness by >= 0.10"
    assert _m(hacked.reward_after) - before_reward >= 0.30, "unregularised DNO should raise brightness by >= 0.30"
    # Reward hacking: without the regulariser the samples leave the distribution, by both measures.
    assert _m(hacked.realism_after) <= 0.1, "gamma=0 should collapse realism (reward hacking) to <= 0.1"
    assert _m(hacked.denoise_err_after) >= 2 * _m(hacked.denoise_err_before)
    # With it, realism stays within 0.15 of the unoptimised samples, on average and for every seed.
    assert _m(regular.realism_after) >= before_realism - 0.15, "regularised DNO left the distribution"
    assert bool((regular.realism_after >= 0.25).all()), "a regularised sample left the distribution"
    assert _m(regular.denoise_err_after) <= 1.5 * _m(regular.denoise_err_before)
    # Better than best-of-N at equal denoiser evaluations.
    assert _m(regular.reward_after) > _m(baseline.reward_after)


def test_jpeg_size_hybrid_dno_hacks_without_regulariser_and_stays_in_distribution_with_it(models):
    hacked, regular, baseline = _runs(models, "jpeg_incompressibility")
    before_reward, before_realism = _m(regular.reward_before), _m(regular.realism_before)

    # Non-differentiable reward: the hybrid estimator was used (the perturbed renders are counted).
    assert regular.denoiser_evaluations_per_image > (DEFAULTS["jpeg_incompressibility"]["steps"] + 1) * SAMPLING_STEPS
    # JPEG size (kB at quality 95) rises substantially in 12 steps (samples are ~1.0 kB).
    assert _m(regular.reward_after) - before_reward >= 0.05, "regularised DNO should add >= 50 bytes"
    assert _m(hacked.reward_after) - before_reward >= 0.08, "unregularised DNO should add >= 80 bytes"
    # Reward hacking (high-frequency noise): realism collapses to under half of the unoptimised in
    # the typical seed (the median over seeds: in 12 steps one or two seeds may not hack yet).
    assert float(hacked.realism_after.median()) <= 0.5 * before_realism, \
        "gamma=0 should collapse realism (reward hacking)"
    # With the regulariser, realism stays within 0.25 of the unoptimised samples and far above gamma=0.
    assert _m(regular.realism_after) >= before_realism - 0.25, "regularised DNO left the distribution"
    assert _m(regular.realism_after) >= _m(hacked.realism_after) + 0.2
    assert _m(regular.denoise_err_after) < _m(hacked.denoise_err_after)
    # Better than best-of-N at equal denoiser evaluations.
    assert _m(regular.reward_after) > _m(baseline.reward_after)
