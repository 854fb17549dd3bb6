import math

import pytest
import torch

from dno import DNOError, DNONoise, FLOW, FLOW_RF, VP, ddim_coefficients, ddim_step, sample
from tests.toy_models import ToyDenoiser, flow_sigmas, vp_sigmas

KINDS = [("eps", VP), ("v", VP), ("flow", FLOW)]


def sigmas_for(kind, n):
    return flow_sigmas(n) if kind == "flow" else vp_sigmas(n)


def plain_ddim(den, noise, sigmas, schedule, eta):
    """A plain no-graph DDIM(eta) loop over the core's step function."""
    s = sigmas.tolist()
    with torch.no_grad():
        x = schedule.start(s[0], noise.x_T, None, True)
        for i in range(len(s) - 1):
            x0 = den(x, x.new_full((x.shape[0],), s[i]))
            x = ddim_step(x, x0, s[i], s[i + 1], None if noise.steps is None else noise.steps[i], eta, schedule)
    return x


@pytest.mark.parametrize("kind,schedule", KINDS)
@pytest.mark.parametrize("checkpoint", [True, False, 2])
def test_sde_sampler_equals_plain_ddim_bit_for_bit(kind, schedule, checkpoint):
    den = ToyDenoiser(kind)
    sig = sigmas_for(kind, 6)
    noise = DNONoise.from_seed((2, 4, 8, 8), 6, seed=3, sde=True)
    ref = plain_ddim(den, noise, sig, schedule, 1.0)
    x_T = noise.x_T.clone().requires_grad_(True)
    steps = noise.steps.clone().requires_grad_(True)
    out = sample(den, DNONoise(x_T, steps), sig, schedule, eta=1.0, checkpoint=checkpoint)
    assert torch.equal(out.detach(), ref)
    for window in (1, 3):
        assert torch.equal(sample(den, noise, sig, schedule, 1.0, window=window).detach(), ref)


def test_vp_sde_matches_euler_ancestral_reference():
    """Independent math: k-diffusion's Euler-ancestral (eta=1) is DDIM(1) for VP models."""
    den = ToyDenoiser("eps")
    sig = vp_sigmas(8)
    noise = DNONoise.from_seed((1, 4, 8, 8), 8, seed=1)
    s = sig.tolist()
    x = noise.x_T * math.sqrt(1 + s[0] ** 2)
    with torch.no_grad():
        for i in range(8):
            den_x = den(x, x.new_full((1,), s[i]))
            up = min(s[i + 1], math.sqrt(s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2))
            down = math.sqrt(s[i + 1] ** 2 - up ** 2)
            x = x + (x - den_x) / s[i] * (down - s[i])
            if s[i + 1] > 0:
                x = x + noise.steps[i] * up
    out = sample(den, noise, sig, VP, eta=1.0)
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


def test_vp_ddim_matches_classic_alphas_cumprod_formula():
    """DDIM(eta) in the original alpha-bar form (Song et al.), mapped to VE form."""
    torch.manual_seed(0)
    for eta in (0.0, 0.5, 1.0):
        sigma, sigma_next = 3.0, 1.2
        ab_t, ab_s = 1 / (1 + sigma ** 2), 1 / (1 + sigma_next ** 2)
        x0 = torch.randn(4)
        eps = torch.randn(4)
        z = torch.randn(4)
        x_vp = math.sqrt(ab_t) * x0 + math.sqrt(1 - ab_t) * eps
        std = eta * math.sqrt((1 - ab_s) / (1 - ab_t)) * math.sqrt(1 - ab_t / ab_s)
        x_next_vp = (math.sqrt(ab_s) * x0 + math.sqrt(1 - ab_s - std ** 2) * eps + std * z)
        ours = ddim_step(x_vp / math.sqrt(ab_t), x0, sigma, sigma_next, z, eta, VP)
        torch.testing.assert_close(ours, x_next_vp / math.sqrt(ab_s), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,schedule", KINDS)
def test_ode_sampler_matches_reference_euler(kind, schedule):
    den = ToyDenoiser(kind)
    sig = sigmas_for(kind, 7)
    noise = DNONoise.from_seed((2, 4, 8, 8), 7, seed=5, sde=False)
    s = sig.tolist()
    x = schedule.start(s[0], noise.x_T, None, True)
    with torch.no_grad():
        for i in range(7):
            d = (x - den(x, x.new_full((2,), s[i]))) / s[i]
            x = x + d * (s[i + 1] - s[i])
    out = sample(den, noise, sig, schedule, eta=0.0)
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


def test_flow_ddpm_posterior_variance():
    """For flow models the eta=1 noise is the DDPM posterior std in (alpha, sigma) form."""
    t, s = 0.8, 0.5
    a_t, b_t, a_s, b_s = 1 - t, t, 1 - s, s
    post_var = b_s ** 2 * (b_t ** 2 - (a_t / a_s) ** 2 * b_s ** 2) / b_t ** 2
    c_x0, c_eps, c_noise = ddim_coefficients(FLOW, t, s, 1.0)
    assert c_x0 == pytest.approx(a_s)
    assert c_noise ** 2 == pytest.approx(post_var)
    assert c_eps ** 2 + c_noise ** 2 == pytest.approx(b_s ** 2)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_flow_rf_step_is_comfyuis_euler_ancestral_rf(eta):
    """FLOW_RF's step, as k-diffusion's euler_ancestral_RF writes it: an Euler step down to
    sigma_down, the signal rescaled to 1 - sigma_next, then renoised."""
    t, s = 0.8, 0.5
    g = torch.Generator().manual_seed(0)
    x, x0, z = (torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    sigma_down = s * (1 + (s / t - 1) * eta)
    alpha_s, alpha_down = 1 - s, 1 - sigma_down
    renoise = (s ** 2 - sigma_down ** 2 * alpha_s ** 2 / alpha_down ** 2) ** 0.5
    ratio = sigma_down / t
    expected = (alpha_s / alpha_down) * (ratio * x + (1 - ratio) * x0) + renoise * z
    torch.testing.assert_close(ddim_step(x, x0, t, s, z, eta, FLOW_RF), expected, rtol=1e-12, atol=1e-12)
    # same x0 coefficient and total noise as DDIM, another share of fresh noise
    rf, ddpm = ddim_coefficients(FLOW_RF, t, s, eta), ddim_coefficients(FLOW, t, s, eta)
    assert rf[0] == ddpm[0] and rf[1] ** 2 + rf[2] ** 2 == pytest.approx(s ** 2)
    assert rf[2] != pytest.approx(ddpm[2])
    assert ddim_coefficients(FLOW_RF, t, s, 0.0) == ddim_coefficients(FLOW, t, s, 0.0)


@pytest.mark.parametrize("kind,schedule", KINDS)
def test_gradient_matches_finite_differences_fp64(kind, schedule):
    den = ToyDenoiser(kind).double()
    sig = sigmas_for(kind, 4).double()
    noise = DNONoise.from_seed((1, 4, 4, 4), 4, seed=2, dtype=torch.float64)
    direction = DNONoise.from_seed((1, 4, 4, 4), 4, seed=9, dtype=torch.float64)

    def f(nz, checkpoint=True):
        return sample(den, nz, sig, schedule, eta=1.0, checkpoint=checkpoint).pow(2).mean()

    grads = {}
    for ck in (True, False):
        x_T = noise.x_T.clone().requires_grad_(True)
        steps = noise.steps.clone().requires_grad_(True)
        f(DNONoise(x_T, steps), ck).backward()
        grads[ck] = (x_T.grad, steps.grad)
    assert torch.equal(grads[True][0], grads[False][0]) and torch.equal(grads[True][1], grads[False][1])
    analytic = (grads[True][0] * direction.x_T).sum() + (grads[True][1] * direction.steps).sum()
    h = 1e-6
    plus = DNONoise(noise.x_T + h * direction.x_T, noise.steps + h * direction.steps)
    minus = DNONoise(noise.x_T - h * direction.x_T, noise.steps - h * direction.steps)
    with torch.no_grad():
        numeric = (f(plus) - f(minus)) / (2 * h)
    assert abs(analytic - numeric) / abs(numeric) < 1e-3, (analytic.item(), numeric.item())


@pytest.mark.parametrize("checkpoint", [True, False, 1])
def test_window_k_differentiates_the_k_noises_of_the_official_opt_time(checkpoint):
    # The official code's opt_time K (t counts down, noise t = 0 unused, noise n = x_T): noises
    # t = 1..K are differentiable through every step after them, the others are fixed.
    den = ToyDenoiser("eps")
    n = 5
    sig = vp_sigmas(n)
    noise = DNONoise.from_seed((1, 4, 4, 4), n, seed=0)

    def grads(window):
        x_T = noise.x_T.clone().requires_grad_(True)
        steps = noise.steps.clone().requires_grad_(True)
        sample(den, DNONoise(x_T, steps), sig, VP, 1.0, window=window, checkpoint=checkpoint).sum().backward()
        zero = torch.zeros_like(x_T)
        return [zero if x_T.grad is None else x_T.grad] + list(steps.grad)   # index 1 + i: step i

    full = grads(None)
    for window in range(1, n + 1):
        official = {n if t == n else n - 1 - t for t in range(1, window + 1)}   # step index, n = x_T
        g = grads(window)
        for index in range(n + 1):
            ours = g[0] if index == n else g[1 + index]
            ref = full[0] if index == n else full[1 + index]
            if index in official:
                # the whole graph after the noise is there: the gradient is the full-graph one
                torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
                assert ours.abs().sum() > 0, (window, index)
            else:
                assert not ours.any(), (window, index)


def test_bad_input_is_named():
    den = ToyDenoiser("eps")
    noise = DNONoise.from_seed((1, 4, 4, 4), 5, seed=0)
    with pytest.raises(DNOError, match="per-step noise has shape"):
        sample(den, noise, vp_sigmas(3), VP, 1.0)
    with pytest.raises(DNOError, match="strictly decreasing"):
        sample(den, noise, torch.tensor([1.0, 2.0, 0.5, 0.2, 0.1, 0.0]), VP, 1.0)
    with pytest.raises(DNOError, match="needs per-step noises"):
        sample(den, DNONoise.from_seed((1, 4, 4, 4), 5, seed=0, sde=False), vp_sigmas(5), VP, 1.0)
    with pytest.raises(DNOError, match="noise shape"):
        DNONoise.from_seed((0, 4), 3, seed=0)
