"""The real-ComfyUI harness works: tiny checkpoints load in-process and through the server."""

from __future__ import annotations

import torch

from comfy_host import ComfyServer, import_comfy
from tiny_checkpoints import (TINY_SD15_UNET, build_state_dict, sd15_checkpoint,
                              sd15_unet_layout)

import pytest

PROMPT = "a red apple on a wooden table"


@pytest.fixture(scope="module")
def comfy():
    torch.set_num_threads(1)
    return import_comfy()


def test_tiny_weights_are_seeded_and_finite(comfy):
    layout = sd15_unet_layout()
    a = build_state_dict(layout, seed=0)
    b = build_state_dict(layout, seed=0)
    c = build_state_dict(layout, seed=1)
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert torch.equal(a[key], b[key])
    assert not torch.equal(a[key], c[key])
    assert all(torch.isfinite(t).all() for t in a.values())


@pytest.mark.parametrize("vae", ["kl", "taesd"])
def test_checkpoint_is_detected_and_samples_in_process(comfy, vae):
    import comfy.latent_formats
    import comfy.model_base
    import comfy.sample
    import comfy.sd

    path = sd15_checkpoint(vae=vae)
    model, clip, vae_model, _ = comfy.sd.load_checkpoint_guess_config(
        str(path), output_vae=True, output_clip=True)

    # Detected as SD1.5 (not a fallback BASE config), with our UNet layout and an EPS objective.
    base = model.model
    assert type(base.model_config).__name__ == "SD15"
    assert base.model_type == comfy.model_base.ModelType.EPS
    assert isinstance(base.latent_format, comfy.latent_formats.SD15)
    assert base.model_config.unet_config["channel_mult"] == TINY_SD15_UNET["channel_mult"]
    assert vae_model.downscale_ratio == 8

    cond_pos = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
    cond_neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    assert cond_pos[0][0].shape == (1, 77, 768)
    assert not torch.equal(cond_pos[0][0], cond_neg[0][0])  # the text encoder reads the prompt

    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed=0)
    out = comfy.sample.sample(model, noise, 3, 5.0, "euler", "normal", cond_pos, cond_neg,
                              latent, denoise=1.0, seed=0, disable_pbar=True)
    assert out.shape == latent.shape
    assert torch.isfinite(out).all()
    assert 0 < out.std() < 100

    image = vae_model.decode(out)
    assert image.shape == (1, 64, 64, 3)
    assert torch.isfinite(image).all()
    # Not saturated: a differentiable decode of this VAE has a usable gradient.
    inside = ((image > 0.01) & (image < 0.99)).float().mean()
    assert inside > 0.5, f"only {inside:.0%} of pixels are off the clamp"


def txt2img_prompt(ckpt_name: str, seed: int = 0, steps: int = 3) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage",
              "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler",
              "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                         "latent_image": ["4", 0], "seed": seed, "steps": steps, "cfg": 5.0,
                         "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0],
                                                    "filename_prefix": "dno_host_test"}},
    }


def test_server_runs_txt2img_and_stops():
    from PIL import Image

    ckpt = sd15_checkpoint(vae="taesd")
    with ComfyServer(models={"checkpoints": [ckpt]}) as server:
        proc = server.proc
        names = server.object_info("CheckpointLoaderSimple")["CheckpointLoaderSimple"][
            "input"]["required"]["ckpt_name"][0]
        assert ckpt.name in names
        entry = server.wait(server.queue(txt2img_prompt(ckpt.name)), timeout=120)
        assert entry["status"]["status_str"] == "success", entry["status"]
        files = server.output_files(entry)
        assert len(files) == 1 and files[0].is_file()
        with Image.open(files[0]) as img:
            assert img.size == (64, 64)
        assert "Prompt executed" in server.log()
    assert proc.poll() is not None  # the server process is gone
    assert not server.base_dir.exists()  # and its throwaway folders too
