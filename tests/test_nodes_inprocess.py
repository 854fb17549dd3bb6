"""DNO nodes on ComfyUI's own objects, in-process: the host is the oracle."""
from __future__ import annotations

import json

import pytest
import torch

from comfy_host import import_comfy
from node_pack import load_node_pack
from tiny_checkpoints import sd3_checkpoint, sd15_checkpoint, sd15_controlnet
from toy_models import Brightness, Float64Head, NaNAfter, OutOfMemoryAfter

PROMPT = "a red apple on a wooden table"


@pytest.fixture(scope="module")
def comfy():
    return import_comfy()


@pytest.fixture(scope="module")
def pack(comfy):
    return load_node_pack()


def load(comfy, path):
    import comfy.sd
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
        pos = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    return model, vae, pos, neg


@pytest.fixture(scope="module")
def sd15(comfy):
    return load(comfy, sd15_checkpoint(vae="taesd"))


@pytest.fixture(scope="module")
def sd3(comfy):
    return load(comfy, sd3_checkpoint(vae="taesd"))


def host_sample(model, pos, neg, latent, sampler_name, seed, steps=4, cfg=3.0, denoise=1.0):
    import comfy.sample
    with torch.inference_mode():
        noise = comfy.sample.prepare_noise(latent, seed)
        return comfy.sample.sample(model, noise, steps, cfg, sampler_name, "normal", pos, neg, latent,
                                   denoise=denoise, seed=seed, disable_pbar=True)


def dno_sample(pack, model, vae, pos, neg, latent, mode, seed, opt_steps=0, steps=4, cfg=3.0,
               denoise=1.0, reward=None, **extra):
    """``latent`` is a LATENT dict or just its samples."""
    node = pack.nodes.sampler.DNOKSampler()
    modes = list(pack.nodes.sampler.MODES)
    with torch.inference_mode():
        out, noise, history = node.sample(
            model, pos, neg, latent if isinstance(latent, dict) else {"samples": latent}, seed, steps, cfg, "normal", denoise,
            vae=vae, reward=reward or Brightness(), sampler_mode=modes[0 if mode == "sde" else 1],
            opt_steps=opt_steps, lr=0.05, method="auto", precision="fp32", time_budget=0.0,
            reward_prompt="", **extra)
    return out["samples"], noise, json.loads(history)


@pytest.mark.parametrize("mode,host_sampler", [("sde", "euler_ancestral"), ("ode", "euler"), ("ode", "ddim")])
def test_zero_steps_reproduce_host_sampler(pack, sd15, mode, host_sampler):
    model, vae, pos, neg = sd15
    latent = torch.zeros(1, 4, 8, 8)
    ref = host_sample(model, pos, neg, latent, host_sampler, seed=7)
    ours, _, history = dno_sample(pack, model, vae, pos, neg, latent, mode, seed=7)
    assert len(history["steps"]) == 1
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_zero_steps_reproduce_host_img2img(pack, sd15):
    model, vae, pos, neg = sd15
    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = host_sample(model, pos, neg, start, "euler", seed=3, denoise=0.6)
    ours, _, _ = dno_sample(pack, model, vae, pos, neg, start, "ode", seed=3, denoise=0.6)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode,host_sampler", [("ode", "euler"), ("sde", "euler_ancestral")])
def test_flow_model_reproduces_host_sampler(pack, sd3, mode, host_sampler):
    """On a CONST model ComfyUI's euler_ancestral is euler_ancestral_RF: the SDE mode matches it."""
    model, vae, pos, neg = sd3
    latent = torch.zeros(1, 16, 8, 8)
    ref = host_sample(model, pos, neg, latent, host_sampler, seed=2)
    ours, _, _ = dno_sample(pack, model, vae, pos, neg, latent, mode, seed=2)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_optimisation_raises_reward_and_leaves_host_model_intact(pack, sd15):
    model, vae, pos, neg = sd15
    latent = torch.zeros(1, 4, 8, 8)
    before = host_sample(model, pos, neg, latent, "euler_ancestral", seed=11)
    plain, _, _ = dno_sample(pack, model, vae, pos, neg, latent, "sde", seed=11)
    ours, noise, history = dno_sample(pack, model, vae, pos, neg, latent, "sde", seed=11, opt_steps=4)
    rewards = [s["reward"][0] for s in history["steps"]]
    print("DNO rewards per step:", rewards)
    assert max(history["best_reward"]) > rewards[0]
    assert not torch.allclose(ours, plain)
    after = host_sample(model, pos, neg, latent, "euler_ancestral", seed=11)
    assert torch.equal(before, after)
    assert noise.generate_noise({"samples": latent}).shape == latent.shape


def test_controlnet_in_the_conditioning_is_differentiated_and_left_intact(pack, sd15):
    """A ControlNet loaded by ComfyUI's loader under inference mode (inference-tensor weights)
    and applied with ControlNetApplyAdvanced: DNO reproduces the controlled host sample,
    optimises through the control model, and the host's controlled KSampler is unchanged."""
    import comfy.controlnet
    import nodes as comfy_nodes
    model, vae, pos, neg = sd15
    with torch.inference_mode():
        net = comfy.controlnet.load_controlnet(str(sd15_controlnet()))
        hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
        cpos, cneg = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, net, hint, 1.0, 0.0, 1.0,
                                                                            vae=vae)
    latent = torch.zeros(1, 4, 8, 8)
    uncontrolled = host_sample(model, pos, neg, latent, "euler_ancestral", seed=7)
    before = host_sample(model, cpos, cneg, latent, "euler_ancestral", seed=7)
    assert (before - uncontrolled).abs().max() > 1e-2                    # the control is live
    plain, _, _ = dno_sample(pack, model, vae, cpos, cneg, latent, "sde", seed=7)
    torch.testing.assert_close(plain, before, rtol=1e-4, atol=1e-4)
    ours, _, history = dno_sample(pack, model, vae, cpos, cneg, latent, "sde", seed=7, opt_steps=2)
    rewards = [s["reward"][0] for s in history["steps"]]
    print("DNO rewards with a ControlNet:", rewards)
    assert max(history["best_reward"]) > rewards[0]
    assert all(p.grad is None for p in net.control_model.parameters())
    assert torch.equal(host_sample(model, cpos, cneg, latent, "euler_ancestral", seed=7), before)


def test_inpainting_mask_is_respected(pack, sd15):
    """A LATENT with a noise_mask (SetLatentNoiseMask): DNO at 0 steps is the host's inpainting
    KSampler; optimised, only the masked region changes, and the mask is passed on as KSampler
    passes it on."""
    import comfy.sample
    model, vae, pos, neg = sd15
    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1.0
    with torch.inference_mode():
        noise = comfy.sample.prepare_noise(start, 9)
        host = comfy.sample.sample(model, noise, 4, 3.0, "euler_ancestral", "normal", pos, neg, start,
                                   denoise=1.0, noise_mask=mask, seed=9, disable_pbar=True)
    latent = {"samples": start, "noise_mask": mask}
    plain, _, _ = dno_sample(pack, model, vae, pos, neg, latent, "sde", seed=9)
    torch.testing.assert_close(plain, host, rtol=1e-4, atol=1e-4)
    node = pack.nodes.sampler.DNOKSampler()
    with torch.inference_mode():
        out, _, history = node.sample(model, pos, neg, latent, 9, 4, 3.0, "normal", 1.0, vae=vae,
                                      reward=Brightness(), sampler_mode=list(pack.nodes.sampler.MODES)[0],
                                      opt_steps=2, lr=0.05, method="auto", precision="fp32",
                                      time_budget=0.0, reward_prompt="")
    ours, outside = out["samples"], (1 - mask).bool().expand_as(start)
    assert torch.equal(out["noise_mask"], mask)
    torch.testing.assert_close(ours[outside], start[outside], rtol=1e-5, atol=1e-5)
    assert (ours - plain)[~outside].abs().max() > 1e-3


def test_bad_inputs_are_clear_node_errors(pack, sd15):
    from comfyui_dno.dno import DNOError
    model, vae, pos, neg = sd15
    latent = torch.zeros(1, 4, 8, 8)
    with pytest.raises(DNOError, match="connect a VAE"):
        dno_sample(pack, model, None, pos, neg, latent, "sde", seed=1, opt_steps=1)
    with pytest.raises(DNOError, match="float64 head.*Put the reward on the sampling device"):
        dno_sample(pack, model, vae, pos, neg, latent, "sde", seed=1, opt_steps=1, reward=Float64Head())
    with pytest.raises(DNOError, match="16-channel|4-channel"):
        dno_sample(pack, model, vae, pos, neg, torch.ones(1, 16, 8, 8), "sde", seed=1)
    with pytest.raises(DNOError, match="steps must be at least 1"):
        dno_sample(pack, model, vae, pos, neg, latent, "sde", seed=1, steps=0)
    # opt_window counts as the paper's opt_time: 1 optimises the noise of the last step (SDE);
    # an ODE sampler has no noise there, and the error names both node inputs
    out, _, history = dno_sample(pack, model, vae, pos, neg, latent, "sde", seed=1, opt_steps=1, opt_window=1)
    assert len(history["steps"]) == 2 and torch.isfinite(out).all()
    with pytest.raises(DNOError, match="opt_window=1 with sampler_mode ODE .*optimises nothing"):
        dno_sample(pack, model, vae, pos, neg, latent, "ode", seed=1, opt_steps=1, opt_window=1)
    # a model patch holding a weight made under inference mode (as custom nodes' adapters do)
    with torch.inference_mode():
        scale = torch.tensor(1.0)
    patched = model.clone()
    patched.set_model_attn1_output_patch(lambda n, extra_options: n * scale.to(n.dtype))
    assert torch.isfinite(host_sample(patched, pos, neg, latent, "euler_ancestral", seed=1)).all()
    with pytest.raises(DNOError, match="loaded under inference mode.*remove other model patches"):
        dno_sample(pack, patched, vae, pos, neg, latent, "sde", seed=1, opt_steps=1)
    # out of memory before anything was scored: a node error that says what to lower
    with pytest.raises(DNOError, match="ran out of GPU memory.*memory_mode"):
        dno_sample(pack, model, vae, pos, neg, latent, "sde", seed=1, opt_steps=4, reward=OutOfMemoryAfter(0))
    # out of memory in the middle of a run: the run stops and the best latent comes out
    out, _, history = dno_sample(pack, model, vae, pos, neg, latent, "sde", seed=1, opt_steps=4,
                                 reward=OutOfMemoryAfter(2))
    assert "out of GPU memory after 2 scored samples" in history["stop_reason"]
    assert len(history["steps"]) == 2 and torch.isfinite(out).all()
    # NaN in the middle of a run: the run stops, the best latent comes out
    out, _, history = dno_sample(pack, model, vae, pos, neg, latent, "sde", seed=1, opt_steps=6,
                                 reward=NaNAfter(2))
    assert "non-finite reward at step 2" in history["stop_reason"]
    assert torch.isfinite(out).all() and len(history["steps"]) == 2


def test_regularizer_node_defaults_give_the_papers_gamma(pack):
    # the core's defaults compute the official penalty (tests/test_core_regularizer.py); the node's
    # defaults must be those, and say so
    from comfyui_dno.dno import ProbabilityRegularizer
    node = pack.nodes.sampler.DNONoiseRegularizer
    inputs = node.INPUT_TYPES()["required"]
    defaults = {name: spec[1]["default"] for name, spec in inputs.items()}
    assert defaults["permutations"] == 100 and defaults["block_exponent"] == 1
    (reg,) = node().build(**defaults)
    x = torch.randn(2, 4 * 16 * 16, generator=torch.Generator().manual_seed(0)) * 1.3
    torch.testing.assert_close(reg.terms(x).loss, ProbabilityRegularizer(gamma=reg.gamma).terms(x).loss)
    assert "paper's gamma" in node.DESCRIPTION and "paper's" in inputs["permutations"][1]["tooltip"]
