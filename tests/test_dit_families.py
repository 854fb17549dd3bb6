"""The benchmark's DiT families (bench/dit_models.py) on the CPU.

ComfyUI's own detection turns each released file's key shapes into the family's supported-model
class at its published size; each tiny variant samples through ComfyUI's sampler and decodes with
the VAE ComfyUI detects from the random state dict.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

from comfy_host import import_comfy

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
import dit_models  # noqa: E402

# Published sizes of the diffusion models, in billions of weights.
PUBLISHED = {"flux-dev": 11.9, "flux-schnell": 11.9, "flux-kontext": 11.9, "flux2": 32.2, "chroma": 8.9,
             "qwen-image": 20.4, "z-image": 6.15, "sd35-large": 8.1, "sd35-medium": 2.5}
# VAE layout -> (class ComfyUI detects, latent channels, spatial compression)
VAES = {"kl16": ("AutoencodingEngine", 16, 8), "flux2": ("AutoencoderKL", 128, 16), "wan21": ("WanVAE", 16, 8)}
KINDS = list(dit_models.FAMILIES)


@pytest.fixture(scope="module")
def comfy():
    return import_comfy()


@pytest.fixture(scope="module")
def models(comfy):
    """bench/models.py, with one VAE per layout for the whole module (a KL VAE takes seconds)."""
    import models as bench_models
    build_vae = dit_models.build_vae
    dit_models.build_vae = functools.lru_cache(maxsize=None)(build_vae)
    yield bench_models
    dit_models.build_vae = build_vae


def require_family(kind: str) -> None:
    import comfy.supported_models
    name = dit_models.FAMILIES[kind].config_class
    if not hasattr(comfy.supported_models, name):
        pytest.skip(f"this ComfyUI has no comfy.supported_models.{name}")


@pytest.mark.parametrize("kind", KINDS)
def test_released_file_is_detected_at_its_published_size(comfy, kind):
    require_family(kind)
    config_class, _ = dit_models.detected_config(kind)
    assert config_class.__name__ == dit_models.FAMILIES[kind].config_class
    weights = dit_models.parameter_count(kind) / 1e9
    assert weights == pytest.approx(PUBLISHED[kind], rel=0.03)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_family_samples_and_decodes_through_comfyui(models, kind):
    import comfy.sample
    require_family(kind)
    family = dit_models.FAMILIES[kind]
    bench = models.build(kind, "fp32", "cpu", tiny=True)
    diffusion_model = bench.model.model.diffusion_model
    assert type(bench.model.model.model_config).__name__ == family.config_class
    # every block type twice (or more), and small
    lists = [m for m in diffusion_model.modules() if isinstance(m, torch.nn.ModuleList)]
    assert lists and all(len(m) >= 2 for m in lists)
    assert bench.params < 10_000_000
    vae_class, channels, factor = VAES[family.vae]
    assert type(bench.vae.first_stage_model).__name__ == vae_class
    assert bench.vae.latent_channels == channels == bench.model.model.latent_format.latent_channels
    assert (bench.steps, bench.cfg, bench.width) == (family.steps, family.cfg, 64)

    latent = comfy.sample.fix_empty_latent_channels(bench.model, bench.empty_latent())
    assert latent.shape[1] == channels and latent.shape[-1] == 64 // factor
    noise = comfy.sample.prepare_noise(latent, 0)
    with torch.inference_mode():
        samples = comfy.sample.sample(bench.model, noise, 2, bench.cfg, "euler_ancestral", bench.scheduler,
                                      bench.positive, bench.negative, latent, denoise=1.0, seed=0,
                                      disable_pbar=True)
        images = bench.vae.decode(samples)
    assert torch.isfinite(samples).all() and torch.isfinite(images).all()
    assert samples.std() > 1e-3 and images.std() > 1e-3
    assert not torch.allclose(samples, noise)
    assert images.shape[-3:] == (64, 64, 3)
