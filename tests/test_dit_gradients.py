"""DNO through the host's own DiT classes (Flux.1 dev / schnell / Kontext, Flux.2, Chroma, Qwen-Image,
Z-Image, SD3.5), tiny variants with at least two blocks of every block type, on the CPU.

Two blocks matter: ComfyUI's Flux blocks add residuals in place, which breaks autograd only once
one block's output feeds a tensor another op saved (a 1-block model passed while full size
crashed). Each family is checked twice:

* the noise gradient of the core's differentiable sampler through the host's guider, in float64,
  in every memory mode (every step stored, every step recomputed, blocks recomputed too), equals a
  float64 reference that keeps a copy of every saved tensor (and that reference agrees with
  central finite differences);
* one DNO update through the node pack's KSampler path (run_ksampler: the host's guider, CFG,
  the family's VAE decoded differentiably) completes and moves the image.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

from comfy_host import import_comfy
from node_pack import load_node_pack

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
import dit_models  # noqa: E402

FAMILIES = list(dit_models.FAMILIES)
STEPS = 2
SIZE = 32           # pixels: a 4x4 latent for the 8x VAEs (2x2 for Flux.2's 16x)


@pytest.fixture(scope="module")
def pack():
    import_comfy()
    return load_node_pack()


@pytest.fixture(scope="module", autouse=True)
def one_vae_per_layout():
    """A KL VAE takes seconds to build: one per layout and precision for the whole module."""
    build_vae = dit_models.build_vae
    dit_models.build_vae = functools.lru_cache(maxsize=None)(build_vae)
    yield
    dit_models.build_vae = build_vae


def family(kind: str, precision: str):
    import comfy.supported_models
    import models
    if not hasattr(comfy.supported_models, dit_models.FAMILIES[kind].config_class):
        pytest.skip(f"{kind}: this ComfyUI has no comfy.supported_models.{dit_models.FAMILIES[kind].config_class}")
    return models.build(kind, precision, "cpu", tiny=True, resolution=SIZE)


def empty_latent(bench) -> torch.Tensor:
    import comfy.sample
    return comfy.sample.fix_empty_latent_channels(bench.model, bench.empty_latent())


class GradientProbe:
    """A ComfyUI Sampler that, inside the guider (CFG, conditioning, model patches), measures the
    gradient of <w, x_0> with respect to x_T and every step noise with the core's differentiable
    sampler, in float64:

    * ``reference``: every step's graph kept, and every tensor autograd saves copied at the moment
      it is saved, so no in-place change can reach it (an independent way around the host's
      in-place adds, without dno/residuals.py);
    * ``modes``: what DNO runs -- dno/residuals.py active, every step stored / every step
      recomputed / blocks recomputed too;
    * ``directional``: <reference, d> and the central difference along random directions d (a check
      that the reference is the derivative at all: ComfyUI rounds each model output to float32,
      which limits finite differences to about 1e-4)."""

    def __init__(self, pack, directions: int = 2):
        self.pack, self.directions = pack, directions
        self.modes, self.reference, self.directional = {}, None, None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        host = sys.modules[self.pack.__name__ + ".nodes.host"]
        engine = sys.modules[self.pack.__name__ + ".nodes.engine"]
        core = sys.modules[self.pack.__name__ + ".dno"]
        sampling = sys.modules[self.pack.__name__ + ".dno.sampling"]
        checkpointing = sys.modules[self.pack.__name__ + ".dno.checkpointing"]
        residuals = sys.modules[self.pack.__name__ + ".dno.residuals"]
        with torch.inference_mode(False), torch.enable_grad():
            base = model_wrap.inner_model
            host.clone_inference_tensors(getattr(model_wrap, "conds", {}))
            host.make_autograd_ready(base)
            schedule = host.schedule_for(base.model_sampling)
            sig = sigmas.clone().double()
            x_T = noise.clone().double()
            latent = torch.zeros_like(x_T) if latent_image is None else latent_image.clone().double()
            gen = torch.Generator().manual_seed(1)
            steps = torch.randn((len(sig) - 1, *x_T.shape), generator=gen, dtype=torch.float64)
            weight = torch.randn(x_T.shape, generator=gen, dtype=torch.float64)
            denoiser = host.HostDenoiser(model_wrap, sig, extra_args, x_T, latent, None)

            def objective(x, z, checkpoint=False):
                out = sampling.sample(denoiser, core.DNONoise(x, z), sig, schedule, eta=1.0, latent=latent,
                                      checkpoint=checkpoint)
                return (out * weight).sum()

            def gradient(checkpoint=False):
                x, z = x_T.clone().requires_grad_(True), steps.clone().requires_grad_(True)
                objective(x, z, checkpoint).backward()
                return torch.cat([x.grad.flatten(), z.grad.flatten()])

            with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
                self.reference = gradient()
            modules = engine.model_modules(base, [])
            for mode, checkpoint in (("store", False), ("step", True), ("blocks", True)):
                blocks = checkpointing.segments_of(denoiser) if mode == "blocks" else []
                with residuals.functional_residuals(modules), checkpointing.checkpointed_blocks(blocks):
                    self.modes[mode] = gradient(checkpoint)
            analytic, numeric, eps = [], [], 1e-3
            for _ in range(self.directions):
                d = torch.randn(self.reference.shape, generator=gen, dtype=torch.float64)
                dx, dz = d[:x_T.numel()].view_as(x_T), d[x_T.numel():].view_as(steps)
                analytic.append(float(self.reference @ d))
                with torch.no_grad():
                    up = objective(x_T + eps * dx, steps + eps * dz)
                    down = objective(x_T - eps * dx, steps - eps * dz)
                numeric.append(float((up - down) / (2 * eps)))
            self.directional = (analytic, numeric)
        return noise


def guided(bench, probe):
    import comfy.samplers
    import comfy.sample
    guider = comfy.samplers.CFGGuider(bench.model)
    guider.set_conds(bench.positive, bench.negative)
    guider.set_cfg(bench.cfg)
    latent = empty_latent(bench)
    sigmas = comfy.samplers.calculate_sigmas(bench.model.get_model_object("model_sampling"), "simple", STEPS)
    with torch.inference_mode():
        noise = comfy.sample.prepare_noise(latent, 0)
        guider.sample(noise, latent, probe, sigmas, seed=0)


@pytest.mark.parametrize("kind", FAMILIES)
def test_noise_gradients_equal_the_float64_reference_in_every_memory_mode(pack, kind):
    probe = GradientProbe(pack)
    guided(family(kind, "fp64"), probe)
    analytic, numeric = probe.directional
    # the reference is the derivative: central differences agree to their float32-limited accuracy
    torch.testing.assert_close(torch.tensor(analytic), torch.tensor(numeric), rtol=1e-2, atol=1e-6)
    for mode, got in probe.modes.items():
        # the same float64 arithmetic in another order (recompute, checkpointing): equal to rounding;
        # the in-place bug this catches (a recompute from changed inputs) is ~1e-5 relative
        torch.testing.assert_close(got, probe.reference, rtol=1e-9, atol=1e-12 * float(probe.reference.abs().max()),
                                   msg=lambda m: f"{kind} / {mode}: {m}")


@pytest.mark.parametrize("kind", FAMILIES)
def test_one_dno_update_through_the_ksampler_path(pack, kind):
    """The node path end to end: the family's latent (5-D for Qwen-Image), the guider, the default
    memory plan, SDE noise and the family's VAE decoded differentiably for the reward."""
    bench = family(kind, "fp32")
    engine = sys.modules[pack.__name__ + ".nodes.engine"]
    core = sys.modules[pack.__name__ + ".dno"]
    from toy_models import Brightness
    latent = {"samples": empty_latent(bench)}
    config = core.DNOConfig(steps=1, lr=0.05, method="autograd", precision="fp32")
    settings = engine.DNORunSettings(reward=Brightness(), vae=bench.vae, config=config, eta=1.0,
                                     regularizer=core.ProbabilityRegularizer(gamma=1.0), preview_every=0)
    with torch.inference_mode():
        out, sampler = engine.run_ksampler(bench.model, bench.positive, bench.negative, latent, settings, 0,
                                           STEPS, bench.cfg, bench.scheduler, 1.0)
    result = sampler.result
    assert len(result.history) == 2 and result.stop_reason == "completed", kind
    assert out["samples"].shape == latent["samples"].shape
    assert torch.isfinite(out["samples"]).all() and torch.isfinite(result.image).all()
    assert result.image.dim() == 4 and result.image.std() > 0, f"{kind}: a uniform image"
    assert result.history[1].reward != result.history[0].reward, f"{kind}: the update changed nothing"
