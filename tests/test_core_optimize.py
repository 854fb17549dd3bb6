import time

import pytest
import torch

from dno import (DNOConfig, DNOError, DNONoise, ProbabilityRegularizer, StopOptimization, TrainableNoise,
                 VP, hybrid_gradient, optimize, sample)
from dno.rewards.base import Reward
from tests.toy_models import (Brightness, Float64Head, NaNAfter, OutOfMemoryAfter, ToyDenoiser, to_image,
                               vp_sigmas)

SIG = vp_sigmas(6)


def run(config, reward=None, seed=0, batch=2, callback=None, regularizer=None, den=None, eta=1.0):
    den = den or ToyDenoiser("eps")
    noise = DNONoise.from_seed((batch, 4, 8, 8), 6, seed=seed, sde=eta > 0)
    return optimize(den, SIG, reward or Brightness(), to_image, noise, VP, eta=eta, config=config,
                    regularizer=regularizer, callback=callback)


def test_brightness_increases_and_best_is_returned():
    res = run(DNOConfig(steps=15, lr=0.05))
    assert len(res.history) == 16
    assert (res.best_reward > res.initial_reward + 0.05).all(), (res.initial_reward, res.best_reward)
    # the returned latent is the best one, not the last one
    best = torch.tensor([max(h.reward[b] for h in res.history) for b in range(2)])
    torch.testing.assert_close(res.best_reward, best)
    torch.testing.assert_close(Brightness()(to_image(res.latent)), res.best_reward, rtol=1e-5, atol=1e-6)
    again = sample(ToyDenoiser("eps"), res.noise, SIG, VP, 1.0)
    torch.testing.assert_close(again, res.latent, rtol=1e-5, atol=1e-5)


def test_ode_and_window_and_regularizer_run():
    reg = ProbabilityRegularizer(gamma=1.0, k=1, permutations=2)
    res = run(DNOConfig(steps=5, lr=0.05), eta=0.0, regularizer=reg)
    assert res.best_reward.min() > res.initial_reward.min()
    assert res.history[0].probability is not None
    res = run(DNOConfig(steps=5, lr=0.05, window=3), regularizer=reg)
    assert torch.equal(res.noise.x_T, DNONoise.from_seed((2, 4, 8, 8), 6, seed=0).x_T)
    assert (res.best_reward > res.initial_reward).all()


@pytest.mark.parametrize("window", [1, 2, 5, 6])
def test_opt_window_optimises_the_noises_of_the_official_opt_time(window):
    # The official --opt_time K (t counts down; noise t = 0 feeds the last step, which injects
    # none; noise t = n is x_T) optimises noises t = 1..K: K noises, x_T only when K = n.
    n = len(SIG) - 1
    official = {"x_T" if t == n else n - 1 - t for t in range(1, window + 1)}
    seen = {}
    run(DNOConfig(steps=1, lr=0.05, window=window), callback=lambda info: seen.update({info.step: info.noise.clone()}))
    start, moved = seen[0], seen[1]
    changed = {i for i in range(n) if not torch.equal(start.steps[i], moved.steps[i])}
    if not torch.equal(start.x_T, moved.x_T):
        changed.add("x_T")
    assert changed == official


def test_opt_window_that_optimises_nothing_names_the_node_inputs():
    with pytest.raises(DNOError, match="opt_window=1 with sampler_mode ODE .* optimises nothing"):
        run(DNOConfig(steps=1, window=1), eta=0.0)
    res = run(DNOConfig(steps=2, lr=0.05, window=6), eta=0.0)   # every step: x_T
    assert not torch.equal(res.noise.x_T, DNONoise.from_seed((2, 4, 8, 8), 6, seed=0).x_T)


def test_deterministic_for_fixed_seed():
    a = run(DNOConfig(steps=4, lr=0.05, method="hybrid", q=4))
    b = run(DNOConfig(steps=4, lr=0.05, method="hybrid", q=4))
    assert [h.reward for h in a.history] == [h.reward for h in b.history]
    assert torch.equal(a.latent, b.latent)


def test_callback_interrupt_keeps_best():
    seen = []

    def cb(info):
        seen.append(info.reward.clone())
        if info.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as err:
        run(DNOConfig(steps=20, lr=0.05), callback=cb)
    res = err.value.dno_result
    assert res is not None and len(res.history) == 4
    torch.testing.assert_close(res.best_reward, torch.stack(seen).max(0).values)

    def stop(info):
        if info.step == 2:
            raise StopOptimization("enough")

    res = run(DNOConfig(steps=20, lr=0.05), callback=stop)
    assert len(res.history) == 3 and "stopped by callback" in res.stop_reason


def test_time_budget_respected():
    class Slow(ToyDenoiser):
        def forward(self, x, sigma):
            time.sleep(0.01)
            return super().forward(x, sigma)

    t0 = time.perf_counter()
    res = run(DNOConfig(steps=1000, lr=0.05, time_budget=1.5), den=Slow("eps"))
    elapsed = time.perf_counter() - t0
    assert "time budget" in res.stop_reason and len(res.history) < 1000
    # It stops before an update would cross the budget: at most one iteration over it
    # (robust to a loaded machine, where one iteration can take long).
    per_iteration = res.history[-1].elapsed / len(res.history)
    assert elapsed < 1.5 + 1.5 * per_iteration + 0.3, (elapsed, per_iteration)


def test_target_reward_stops_early():
    first = run(DNOConfig(steps=0))
    target = first.initial_reward.max().item() + 0.02
    res = run(DNOConfig(steps=50, lr=0.05, target_reward=target))
    assert "target reward" in res.stop_reason and len(res.history) < 51
    assert (res.best_reward >= target).all()


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def test_hybrid_estimate_aligns_with_exact_gradient():
    torch.manual_seed(0)
    den = ToyDenoiser("eps")
    sig = vp_sigmas(4)
    noise = DNONoise.from_seed((1, 4, 4, 4), 4, seed=4, sde=False)
    reward = Brightness()
    params = TrainableNoise(noise, [], optimize_x_T=True)

    def render(nz):
        return to_image(sample(den, nz, sig, VP, 0.0))

    image = render(params.assemble())
    r = reward(image)
    (exact,) = torch.autograd.grad(r.sum(), params.leaves, retain_graph=True)
    gen = torch.Generator().manual_seed(0)
    g_img, count = hybrid_gradient(render, reward, params, image, r.detach(), mu=0.01, q=32, chunk=8,
                                   generator=gen)
    assert count == 32
    (hybrid,) = torch.autograd.grad((g_img * image).sum(), params.leaves)
    cos = _cosine(hybrid, exact)
    print(f"hybrid vs exact cosine at q=32: {cos:.3f}")
    assert cos > 0.5


class NonDiffBrightness(Reward):
    name = "brightness (no grad)"
    differentiable = False

    def score(self, images, prompts=None):
        return images.detach().mean(dim=(1, 2, 3))


def test_non_differentiable_reward_uses_hybrid_and_improves():
    res = run(DNOConfig(steps=8, lr=0.05, q=8), reward=NonDiffBrightness())
    assert (res.best_reward > res.initial_reward + 0.02).all()
    assert res.rendered == 2 * 9 + 8 * 2 * 8
    with pytest.raises(DNOError, match="not differentiable"):
        run(DNOConfig(steps=1, method="autograd"), reward=NonDiffBrightness())
    res = run(DNOConfig(steps=8, lr=0.05, q=8, method="zeroth_order"), reward=NonDiffBrightness())
    assert (res.best_reward > res.initial_reward).all()


class RecordingScaledBrightness(Reward):
    """Brightness times a per-sample scale, without a gradient; records every call (images, rewards)."""
    name = "scaled brightness (no grad)"
    differentiable = False

    def __init__(self, scales):
        super().__init__()
        self.scales = torch.tensor(scales)
        self.calls = []

    def score(self, images, prompts=None):
        value = images.detach().float().mean(dim=(1, 2, 3)) * self.scales.repeat(images.shape[0] // len(self.scales))
        self.calls.append((images.detach().clone(), value.clone()))
        return value


def official_hybrid_direction(calls, batch):
    """The official estimator from the paper's code, written independently: for each sample,
    est = sum_i (L_i - L_0)(x_i - x_0) with the loss L = -reward and images x in [-1, 1], then
    est / (|est| + 1e-3). Returns it with the raw norms. ``calls[0]`` is the unperturbed batch."""
    x0, r0 = calls[0]
    est = torch.zeros_like(x0)
    for images, rewards in calls[1:]:
        m = images.shape[0] // batch
        x = (2 * images - 1).view((m, batch) + tuple(images.shape[1:]))
        dl = (-rewards.view(m, batch)) - (-r0)
        est += (dl.view(m, batch, 1, 1, 1) * (x - (2 * x0 - 1))).sum(0)
    raw = est.flatten(1).norm(dim=1)
    return est / (raw + 1e-3).view(-1, 1, 1, 1), raw


def _ode_setup(size=8, scale=1.0):
    den = ToyDenoiser("eps")
    sig = vp_sigmas(4)
    noise = DNONoise(DNONoise.from_seed((2, 4, size, size), 4, seed=4, sde=False).x_T * scale)
    return den, sig, noise


@pytest.mark.parametrize("scales,guard_matters", [
    ([2000.0, 100000.0], False),    # reward units 50x apart: unit norm in [-1, 1] pixels for both
    ([0.05, 1.0], True),            # raw norms of ~1e-4 and ~2e-3: the official 1e-3 guard shrinks them
])
def test_hybrid_estimate_is_the_official_unit_direction_per_sample(scales, guard_matters):
    den, sig, noise = _ode_setup()
    params = TrainableNoise(noise, [], optimize_x_T=True)

    def render(nz):
        return to_image(sample(den, nz, sig, VP, 0.0))

    reward = RecordingScaledBrightness(scales)
    image = render(params.assemble()).detach()
    r0 = reward(image)
    g, _ = hybrid_gradient(render, reward, params, image, r0, mu=0.01, q=8, chunk=4,
                           generator=torch.Generator().manual_seed(0))
    official, raw = official_hybrid_direction(reward.calls, 2)
    if guard_matters:
        assert (raw < 3e-3).all(), raw
    else:
        assert (raw > 1.0).all(), raw
    # the loop backpropagates -g into the [0, 1] image; the official code <est, x> with x = 2 x01 - 1.
    # Only float rounding apart (the two sum the same renders in another order and unit).
    torch.testing.assert_close(-g, 2 * official, rtol=1e-4, atol=1e-6 * float(official.abs().max()))
    # norm 2 in [0, 1] pixels (unit norm in [-1, 1]), less what the guard takes: 2 |e| / (|e| + 1e-3)
    norm = g.flatten(1).norm(dim=1)
    torch.testing.assert_close(norm, 2 * raw / (raw + 1e-3), rtol=1e-4, atol=0)
    if guard_matters:
        assert (norm < 1.5).all(), norm


def test_hybrid_update_balances_reward_and_regulariser_as_the_official_code():
    # One update with gamma > 0 from an inflated x_T (ODE: x_T is all that is optimised). The
    # official code steps AdamW on clip(J^T est + gamma grad reg, 1) with est the unit direction
    # above; Adam's first step is -lr * sign of that, whatever the clipping, so the sign of the
    # update shows the balance of the two terms.
    den, sig, noise = _ode_setup(size=32, scale=1.3)
    lr = 1e-3

    def run_once(gamma):
        reward = RecordingScaledBrightness([2000.0, 100000.0])
        seen = {}
        optimize(den, sig, reward, to_image, noise, VP, eta=0.0,
                 config=DNOConfig(steps=1, lr=lr, method="hybrid", q=8, estimator_batch=4, seed=0),
                 regularizer=ProbabilityRegularizer(gamma=gamma, permutations=0),
                 callback=lambda info: seen.update({info.step: info.noise.x_T.clone()}))
        return reward, seen[1] - seen[0]

    reward, _ = run_once(1.0)           # the perturbations do not depend on gamma
    official, raw = official_hybrid_direction(reward.calls[:3], 2)   # the base batch, then 2 chunks
    assert (raw > 1.0).all()
    x_T = noise.x_T.clone().requires_grad_(True)
    image = to_image(sample(den, DNONoise(x_T), sig, VP, 0.0))
    (pull,) = torch.autograd.grad(image, x_T, 2 * official)     # d <est, 2 x01 - 1> / d x_T
    z = noise.x_T.clone().requires_grad_(True)
    (reg,) = torch.autograd.grad(ProbabilityRegularizer(permutations=0).terms(z.flatten(1)).loss.sum(), z)
    # a gamma at which the two terms are of one size for the first sample: the balance matters
    gamma = (pull[0].norm() / reg[0].norm()).item()
    _, step = run_once(gamma)
    expected = -lr * torch.sign(pull + gamma * reg)
    agree = (torch.sign(step) == torch.sign(expected)).float().flatten(1).mean(1)
    assert (agree > 0.99).all(), agree
    torch.testing.assert_close(step.abs().flatten(1).mean(1), torch.full((2,), lr), rtol=1e-3, atol=0)


class WrongShape(Reward):
    def score(self, images, prompts=None):
        return images.mean()


class NaNReward(Reward):
    name = "nan"

    def score(self, images, prompts=None):
        return images.mean(dim=(1, 2, 3)) * float("nan")


def test_bad_rewards_are_named():
    with pytest.raises(DNOError, match=r"returned shape \(\), expected \(2,\)"):
        run(DNOConfig(steps=1), reward=WrongShape())
    with pytest.raises(DNOError, match="non-finite value"):
        run(DNOConfig(steps=1), reward=NaNReward())
    res = run(DNOConfig(steps=10, lr=0.05), reward=NaNAfter(3))
    assert "non-finite reward at step 3" in res.stop_reason
    assert len(res.history) == 3 and torch.isfinite(res.best_reward).all()


def test_out_of_memory_keeps_the_best_once_something_was_scored():
    with pytest.raises(torch.cuda.OutOfMemoryError):
        run(DNOConfig(steps=5, lr=0.05), reward=OutOfMemoryAfter(0))
    res = run(DNOConfig(steps=10, lr=0.05), reward=OutOfMemoryAfter(3))
    assert "out of GPU memory after 3 scored samples" in res.stop_reason
    assert len(res.history) == 3 and torch.isfinite(res.best_reward).all()
    assert (res.best_reward >= res.initial_reward).all()


def test_bad_config_is_named():
    with pytest.raises(DNOError, match=r"opt_window must be 0 \(every step and x_T\) or between 1 and the "
                                       r"number of sampling steps \(6\), got 7"):
        run(DNOConfig(steps=1, window=7))
    with pytest.raises(DNOError, match="precision"):
        run(DNOConfig(steps=1, precision="fp8"))
    with pytest.raises(DNOError, match="latent shape"):
        optimize(ToyDenoiser(), SIG, Brightness(), to_image, DNONoise.from_seed((1, 4, 8, 8), 6, 0),
                 latent=torch.zeros(1, 4, 4, 4))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_and_improves(precision):
    res = run(DNOConfig(steps=6, lr=0.05, precision=precision))
    assert torch.isfinite(res.best_reward).all()
    assert (res.best_reward > res.initial_reward).all()
    assert res.noise.x_T.dtype == torch.float32


def test_reward_on_wrong_dtype_is_named():
    with pytest.raises(DNOError, match=r"reward 'float64 head' failed on a \(2, 3, 8, 8\) torch.float32"):
        run(DNOConfig(steps=1), reward=Float64Head())
