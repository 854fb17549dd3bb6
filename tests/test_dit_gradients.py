"""DNO through the host's own DiT classes (Flux.1 dev / schnell / Kontext, Flux.2, Chroma, Qwen-Image,
Z-Image, SD3.5), tiny variants with at least two blocks of every block type, on the CPU.

Two blocks matter: ComfyUI's Flux blocks add residuals in place, which breaks autograd only once
one block's output feeds a tensor another op saved (a 1-block model passed while full size
crashed). Each family is checked twice:

* the noise gradient of the core's differentiable sampler through the host's guider, in float64,
  in every memory mode (every step stored, every step recomputed, blocks recomputed too), equals
  central finite differences along random directions;
* one DNO update through the node pack's KSampler path (run_ksampler: the host's guider, CFG,
  the family's VAE decoded differentiably) completes in every memory mode.
"""
from __future__ import annotations

import sys

import pytest
import torch

from comfy_host import import_comfy
from node_pack import load_node_pack

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "bench"))

FAMILIES = ("flux-dev", "flux-schnell", "flux-kontext", "flux2", "chroma", "qwen-image", "z-image",
            "sd35-medium", "sd35-large")
STEPS = 2
SIZE = 32           # pixels: a 4x4 latent for the 8x VAEs, 2x2 patches per side for the DiTs


@pytest.fixture(scope="module")
def pack():
    import_comfy()
    return load_node_pack()


def family(kind: str, precision: str):
    import dit_models
    if kind not in dit_models.available():
        pytest.skip(f"{kind}: not in this ComfyUI host's supported models")
    return dit_models.build(kind, precision, torch.device("cpu"), tiny=True, resolution=SIZE)


class GradientProbe:
    """A ComfyUI Sampler that, inside the guider, measures d<w, x_0>/d(noise) with the core's
    differentiable sampler in one memory mode, and the same by finite differences."""

    def __init__(self, pack, mode: str, directions: int = 2):
        self.pack, self.mode, self.directions = pack, mode, directions
        self.measured = None

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

            def objective(x, z, checkpoint=True):
                out = sampling.sample(denoiser, core.DNONoise(x, z), sig, schedule, eta=1.0, latent=latent,
                                      checkpoint=checkpoint)
                return (out * weight).sum()

            blocks = checkpointing.segments_of(denoiser) if self.mode == "blocks" else []
            with residuals.functional_residuals(engine.model_modules(base, [])), \
                    checkpointing.checkpointed_blocks(blocks):
                x, z = x_T.clone().requires_grad_(True), steps.clone().requires_grad_(True)
                objective(x, z, checkpoint={"store": False, "step": True, "blocks": True}[self.mode]).backward()
                analytic, numeric = [], []
                eps = 1e-4
                for _ in range(self.directions):
                    dx = torch.randn(x.shape, generator=gen, dtype=torch.float64)
                    dz = torch.randn(z.shape, generator=gen, dtype=torch.float64)
                    analytic.append(float((x.grad * dx).sum() + (z.grad * dz).sum()))
                    with torch.no_grad():
                        up = objective(x_T + eps * dx, steps + eps * dz)
                        down = objective(x_T - eps * dx, steps - eps * dz)
                    numeric.append(float((up - down) / (2 * eps)))
        self.measured = (analytic, numeric)
        return noise


def guided(bench, probe):
    import comfy.samplers
    import comfy.sample
    guider = comfy.samplers.CFGGuider(bench.model)
    guider.set_conds(bench.positive, bench.negative)
    guider.set_cfg(bench.cfg)
    latent = torch.zeros(1, bench.latent_channels, *bench.latent_size)
    sigmas = comfy.samplers.calculate_sigmas(bench.model.get_model_object("model_sampling"), "simple", STEPS)
    with torch.inference_mode():
        noise = comfy.sample.prepare_noise(latent, 0)
        sampler = type("Probe", (comfy.samplers.Sampler,), {"sample": lambda self, *a, **k: probe.sample(*a, **k)})()
        guider.sample(noise, latent, sampler, sigmas, seed=0)
    return probe.measured


@pytest.mark.parametrize("kind", FAMILIES)
def test_noise_gradients_equal_finite_differences_in_every_memory_mode(pack, kind):
    bench = family(kind, "fp64")
    for mode in ("store", "step", "blocks"):
        analytic, numeric = guided(bench, GradientProbe(pack, mode))
        # float64, eps 1e-4: the central difference is exact to ~1e-8 relative; 1e-6 leaves room
        torch.testing.assert_close(torch.tensor(analytic), torch.tensor(numeric), rtol=1e-6, atol=1e-9,
                                   msg=lambda m: f"{kind} / {mode}: {m}")


@pytest.mark.parametrize("kind", FAMILIES)
def test_one_dno_update_in_every_memory_mode(pack, kind):
    bench = family(kind, "fp32")
    engine = sys.modules[pack.__name__ + ".nodes.engine"]
    core = sys.modules[pack.__name__ + ".dno"]
    from toy_models import Brightness
    latent = {"samples": torch.zeros(1, bench.latent_channels, *bench.latent_size)}
    for checkpoint in ("auto", False, True, "blocks"):
        config = core.DNOConfig(steps=1, lr=0.01, method="autograd", precision="fp32", checkpoint=checkpoint)
        settings = engine.DNORunSettings(reward=Brightness(), vae=bench.vae, config=config, eta=1.0,
                                         regularizer=core.ProbabilityRegularizer(gamma=1.0), preview_every=0)
        with torch.inference_mode():
            out, sampler = engine.run_ksampler(bench.model, bench.positive, bench.negative, latent, settings, 0,
                                               STEPS, bench.cfg, "simple", 1.0)
        result = sampler.result
        assert len(result.history) == 2 and result.stop_reason == "completed", (kind, checkpoint)
        assert torch.isfinite(out["samples"]).all() and torch.isfinite(result.image).all()
        assert result.image.std() > 0, f"{kind}: a uniform image"
