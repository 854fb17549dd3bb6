"""The real-ComfyUI harness works: tiny checkpoints load in-process and through the server."""

from __future__ import annotations

import functools
import time

import torch

from comfy_host import ComfyServer, import_comfy
from tiny_checkpoints import (build_state_dict, sd3_checkpoint, sd15_checkpoint,
                              sd15_unet_layout)

import pytest

PROMPT = "a red apple on a wooden table"


@pytest.fixture(scope="module")
def comfy():
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


# family -> (checkpoint maker, ComfyUI model config, model type, latent channels)
FAMILIES = {
    "sd15": (sd15_checkpoint, "SD15", "EPS", 4),
    "sd3": (sd3_checkpoint, "SD3", "FLOW", 16),
}


def sample_and_decode(model, clip, vae_model, channels, seed=0):
    import comfy.sample

    cond_pos = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
    cond_neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    assert not torch.equal(cond_pos[0][0], cond_neg[0][0])  # the text encoder reads the prompt
    latent = torch.zeros(1, channels, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed=seed)
    out = comfy.sample.sample(model, noise, 3, 5.0, "euler", "normal", cond_pos, cond_neg,
                              latent, denoise=1.0, seed=seed, disable_pbar=True)
    assert out.shape == latent.shape
    assert torch.isfinite(out).all()
    assert 0 < out.std() < 100
    image = vae_model.decode(out)
    assert image.shape == (1, 64, 64, 3)
    assert torch.isfinite(image).all()
    return out, image


@pytest.mark.parametrize("family,vae", [("sd15", "kl"), ("sd15", "taesd"), ("sd3", "taesd")])
def test_checkpoint_is_detected_and_samples_in_process(comfy, family, vae):
    import comfy.model_base
    import comfy.sd

    make, config_name, model_type, channels = FAMILIES[family]
    path = make(vae=vae)
    model, clip, vae_model, _ = comfy.sd.load_checkpoint_guess_config(
        str(path), output_vae=True, output_clip=True)

    # Detected as the intended family (not a fallback BASE config), with its objective.
    base = model.model
    assert type(base.model_config).__name__ == config_name
    assert base.model_type == getattr(comfy.model_base.ModelType, model_type)
    assert vae_model.downscale_ratio == 8 and vae_model.latent_channels == channels

    _, image = sample_and_decode(model, clip, vae_model, channels)
    # Not saturated: a differentiable decode of this VAE has a usable gradient.
    inside = ((image > 0.01) & (image < 0.99)).float().mean()
    assert inside > 0.5, f"only {inside:.0%} of pixels are off the clamp"


def test_v_prediction_by_the_hosts_model_sampling_node(comfy):
    """No small v-prediction checkpoint is detectable (see notes); the host's own
    ModelSamplingDiscrete node turns the tiny SD1.5 model into one, as users do."""
    import comfy.model_base
    import comfy.sd
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    model, clip, vae_model, _ = comfy.sd.load_checkpoint_guess_config(
        str(sd15_checkpoint(vae="taesd")), output_vae=True, output_clip=True)
    patched = ModelSamplingDiscrete().patch(model, "v_prediction", False)[0]
    sampling = patched.get_model_object("model_sampling")
    assert isinstance(sampling, comfy.model_sampling.V_PREDICTION)
    assert not isinstance(model.get_model_object("model_sampling"),
                          comfy.model_sampling.V_PREDICTION)  # the original is untouched
    eps_latent, _ = sample_and_decode(model, clip, vae_model, 4)
    v_latent, _ = sample_and_decode(patched, clip, vae_model, 4)
    assert not torch.allclose(eps_latent, v_latent)


class _CloneInferenceTensors:
    """Swap a module's inference-mode parameters/buffers for clones; put the originals back."""

    def __init__(self, module):
        self.module, self.saved = module, []

    def __enter__(self):
        for m in self.module.modules():
            for store in (m._parameters, m._buffers):
                for name, t in list(store.items()):
                    if t is not None and t.is_inference():
                        self.saved.append((store, name, t))
                        c = t.clone()
                        store[name] = (torch.nn.Parameter(c, requires_grad=False)
                                       if isinstance(t, torch.nn.Parameter) else c)

    def __exit__(self, *exc):
        for store, name, t in reversed(self.saved):
            store[name] = t
        self.saved.clear()


def test_host_facts_autograd_through_the_loaded_model(comfy):
    """Facts the DNO adapter relies on (host_findings.md): weights loaded under the executor's
    inference_mode refuse autograd; a KSAMPLER that clones them for its pass and restores
    them gets a gradient, and a plain KSampler afterwards is bit-identical, LoRA-style
    patches included."""
    import comfy.sample
    import comfy.samplers
    import comfy.sd

    grads = []

    def grad_pass(model_k, noise, sigmas, extra_args, callback, disable, clone=True):
        base = model_k.inner_model.inner_model  # KSamplerX0Inpaint -> CFGGuider -> BaseModel
        with torch.inference_mode(False), torch.enable_grad():
            x = noise.clone().requires_grad_(True)
            sigma = sigmas.clone()[0] * x.new_ones([x.shape[0]])
            ctx = _CloneInferenceTensors(base) if clone else torch.enable_grad()
            with ctx:
                x0 = model_k(x, sigma, **extra_args)
                x0.square().mean().backward()
            grads.append(x.grad.clone())
        return x0.detach().clone()

    def ksampler(mp):
        latent = torch.zeros(1, 4, 8, 8)
        return comfy.sample.sample(mp, comfy.sample.prepare_noise(latent, 0), 3, 5.0, "euler",
                                   "normal", pos, neg, latent, seed=0, disable_pbar=True)

    with torch.inference_mode():  # as execution.py runs every node
        model, clip = comfy.sd.load_checkpoint_guess_config(
            str(sd15_checkpoint(vae="taesd")), output_vae=False)[:2]
        pos = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        lora = model.clone()
        key = "diffusion_model.input_blocks.1.0.in_layers.2.weight"
        lora.add_patches({key: (torch.randn_like(model.model.state_dict()[key]) * 0.01,)})
        assert all(p.is_inference() for p in model.model.parameters())
        for mp in (model, lora):
            before = ksampler(mp)
            latent = torch.zeros(1, 4, 8, 8)
            noise = comfy.sample.prepare_noise(latent, 0)
            sigmas = comfy.samplers.calculate_sigmas(mp.get_model_object("model_sampling"),
                                                     "normal", 3)
            guider = comfy.samplers.CFGGuider(mp)
            guider.set_conds(pos, neg)
            guider.set_cfg(5.0)
            no_clone = comfy.samplers.KSAMPLER(functools.partial(grad_pass, clone=False))
            with pytest.raises(RuntimeError, match="Inference tensors"):
                guider.sample(noise, latent, no_clone, sigmas, seed=0, disable_pbar=True)
            guider.sample(noise, latent, comfy.samplers.KSAMPLER(grad_pass), sigmas, seed=0,
                          disable_pbar=True)
            assert torch.isfinite(grads[-1]).all() and grads[-1].abs().sum() > 0
            assert torch.equal(ksampler(mp), before)
            assert all(p.is_inference() for p in mp.model.parameters())
        assert not torch.equal(ksampler(model), ksampler(lora))  # the patch is live


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


@pytest.mark.server
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
        assert not server.custom_node_import_failed() or not (
            server.custom_node / "__init__.py").exists()

        # Interrupt a long run: the host reports it as an error with an
        # execution_interrupted message, and the interrupted node's outputs are discarded.
        long_id = server.queue(txt2img_prompt(ckpt.name, seed=1, steps=10_000))
        server.wait_running(long_id)
        deadline = time.monotonic() + 60
        while not server.history(long_id) and time.monotonic() < deadline:
            server.interrupt(long_id)
            time.sleep(0.5)
        entry = server.wait(long_id, timeout=30)
        assert entry["status"]["status_str"] == "error"
        events = [name for name, _ in entry["status"]["messages"]]
        assert "execution_interrupted" in events
        assert server.output_files(entry) == []
        assert "Processing interrupted" in server.log()
    assert proc.poll() is not None  # the server process is gone
    assert not server.base_dir.exists()  # and its throwaway folders too


def test_host_requirements_come_from_the_hosts_own_file(tmp_path):
    """The install step reads the host's requirements.txt: every package but the torch family."""
    import install_host_requirements as install
    (tmp_path / "requirements.txt").write_text(
        "comfyui-frontend-package==1.32.9\ntorch\ntorchvision>=0.1\nTorchAudio\ntorchsde\n"
        "# a comment\n\neinops  # inline comment\nav>=14.2.0\n")
    assert install.host_requirements(tmp_path) == ["comfyui-frontend-package==1.32.9", "torchsde",
                                                   "einops", "av>=14.2.0"]
