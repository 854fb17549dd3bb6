"""The diffusers adapter (dno.diffusers_host) on tiny random pipelines of every family.

The pipeline is the oracle: with 0 optimisation steps ``optimize_pipeline`` must give the
pipeline's own latents and image for the same generator and scheduler.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from dno import DNOError, StopOptimization  # noqa: E402
from dno.diffusers_host import build_parts, optimize_pipeline  # noqa: E402
from dno.rewards import BuiltinReward  # noqa: E402
from dno.rewards.base import Reward  # noqa: E402
from tiny_pipelines import BUILDERS, SIZE, sd_scheduler, tiny_flux, tiny_sd  # noqa: E402

PROMPT = "a red apple on a wooden table"
STEPS, CFG = 4, 3.0
SHORT_TEXT = {"max_sequence_length": 32}      # SD3 / Flux: a short T5 sequence keeps them tiny


def pipeline_output(pipe, family, prompt=PROMPT, seed=5, output_type="latent", **kwargs):
    """The pipeline's own result; Flux's packed latents unpacked as its decode does."""
    if family in ("sd3", "flux"):
        kwargs.update(SHORT_TEXT)
    generator = ([torch.Generator().manual_seed(s) for s in seed] if isinstance(seed, list)
                 else torch.Generator().manual_seed(seed))
    out = pipe(prompt, num_inference_steps=STEPS, guidance_scale=CFG, height=SIZE, width=SIZE,
               generator=generator, output_type=output_type, **kwargs).images
    if family == "flux" and output_type == "latent":
        out = type(pipe)._unpack_latents(out, SIZE, SIZE, pipe.vae_scale_factor)
    return out


def adapter(pipe, family, reward=None, prompt=PROMPT, seed=5, opt_steps=0, **kwargs):
    if family in ("sd3", "flux"):
        kwargs = {**SHORT_TEXT, **kwargs}
    return optimize_pipeline(pipe, prompt, reward or BuiltinReward("brightness"), opt_steps=opt_steps, steps=STEPS,
                             guidance_scale=CFG, height=SIZE, width=SIZE, seed=seed, **kwargs)


REPRODUCED = [
    # family, scheduler, eta: the samplers DDIM(eta) in sigma space is
    ("sd", "euler_ancestral", 1.0),
    ("sd", "ddim", 1.0),
    ("sd", "euler", 0.0),
    ("sd", "ddim", 0.0),
    ("sdxl", "euler", 0.0),
    ("sdxl", "euler_ancestral", 1.0),
    ("sd3", None, 0.0),
    ("flux", None, 0.0),
]


@pytest.mark.parametrize("family,scheduler,eta", REPRODUCED)
def test_zero_steps_reproduce_the_pipeline(family, scheduler, eta):
    pipe = BUILDERS[family](scheduler) if scheduler else BUILDERS[family]()
    extra = {"eta": eta} if scheduler == "ddim" else {}
    latents = pipeline_output(pipe, family, **extra)
    images = pipeline_output(pipe, family, output_type="pt", **extra)
    out = adapter(pipe, family, eta=eta)
    assert len(out.history) == 1 and out.stop_reason == "completed"
    assert latents.abs().max() > 1.0          # a real sample, not zeros
    torch.testing.assert_close(out.latents, latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.image, images, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.initial_image, images, rtol=1e-4, atol=1e-4)


def test_v_prediction_and_a_batch_with_a_generator_per_image():
    pipe = tiny_sd("euler", prediction_type="v_prediction")
    prompts, seeds = [PROMPT, "a blue car"], [3, 11]
    latents = pipeline_output(pipe, "sd", prompt=prompts, seed=seeds)
    out = adapter(pipe, "sd", prompt=prompts, seed=seeds, eta=0.0)
    torch.testing.assert_close(out.latents, latents, rtol=1e-4, atol=1e-4)
    assert len(out.images) == 2 and out.images[0].size == (SIZE, SIZE)
    assert not torch.allclose(out.latents[0], out.latents[1])


def test_other_schedulers_sample_as_euler_ancestral_from_their_config():
    """SD1.5's default PNDM is another sampler: DNO samples Euler ancestral on its config's betas."""
    from diffusers import EulerAncestralDiscreteScheduler
    pipe = tiny_sd("pndm")
    pndm = pipe.scheduler
    out = adapter(pipe, "sd", eta=1.0)
    assert pipe.scheduler is pndm                      # the pipeline is left as it was
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pndm.config)
    torch.testing.assert_close(out.latents, pipeline_output(pipe, "sd"), rtol=1e-4, atol=1e-4)


def test_optimisation_raises_the_reward_and_leaves_the_pipeline_intact():
    pipe = tiny_sd("euler_ancestral")
    before = pipeline_output(pipe, "sd")
    out = adapter(pipe, "sd", opt_steps=4, lr=0.1)
    rewards = [h.reward[0] for h in out.history]
    assert len(rewards) == 5
    assert float(out.best_reward) > rewards[0]
    # the returned image is the best one, and it is what its latents decode to
    assert float(out.best_reward) == pytest.approx(max(rewards))
    torch.testing.assert_close(BuiltinReward("brightness")(out.image), out.best_reward, rtol=1e-5, atol=1e-6)
    parts = build_parts(pipe, [PROMPT], None, STEPS, 1.0, CFG, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(parts.decode(out.latents), out.image, rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in pipe.unet.parameters())      # frozen for the run only
    torch.testing.assert_close(pipeline_output(pipe, "sd"), before, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_memory_modes_follow_the_same_trajectory(family):
    """Recompute every step, also checkpoint the blocks, or store all: the same gradients."""
    pipe = BUILDERS[family]()
    runs = {mode: adapter(pipe, family, opt_steps=2, lr=0.1, eta=1.0, memory_mode=mode)
            for mode in ("low", "lowest", "fastest")}
    parts = build_parts(pipe, [PROMPT], None, STEPS, 1.0, CFG, SIZE, SIZE, SHORT_TEXT if family == "flux" else None)
    assert parts.denoiser.checkpoint_segments() and parts.decode.checkpoint_segments()
    reference = torch.tensor([h.reward for h in runs["low"].history])
    assert reference[-1, 0] != reference[0, 0]
    for mode in ("lowest", "fastest"):
        torch.testing.assert_close(torch.tensor([h.reward for h in runs[mode].history]), reference,
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(runs[mode].latents, runs["low"].latents, rtol=1e-4, atol=1e-4)


def test_hybrid_estimator_runs_for_a_reward_without_gradient():
    class NoGradBrightness(Reward):
        name = "brightness (no gradient)"
        differentiable = False

        def score(self, images, prompts=None):
            return images.detach().float().mean(dim=(1, 2, 3))

    pipe = tiny_sd("euler_ancestral")
    out = adapter(pipe, "sd", reward=NoGradBrightness(), opt_steps=3, lr=0.1, grad_samples=8, perturbation=0.05)
    assert out.result.rendered == 1 + 3 * (1 + 8)       # the samples and every perturbed render
    assert float(out.best_reward) > out.history[0].reward[0]


def test_stopping_rules_target_time_budget_and_callback():
    pipe = tiny_sd("euler_ancestral")
    first = adapter(pipe, "sd").history[0].reward[0]
    out = adapter(pipe, "sd", opt_steps=20, lr=0.1, target_reward=first + 1e-4)
    assert out.stop_reason.startswith("target reward") and len(out.history) < 21
    out = adapter(pipe, "sd", opt_steps=20, lr=0.1, time_budget=0.01)
    assert out.stop_reason.startswith("time budget") and len(out.history) == 1

    def stop_at_two(info):
        if info.step == 2:
            raise StopOptimization("enough")
    out = adapter(pipe, "sd", opt_steps=20, lr=0.1, callback=stop_at_two)
    assert len(out.history) == 3 and "enough" in out.stop_reason


def test_a_text_reward_gets_each_image_s_prompt():
    seen = []

    class Recording(Reward):
        name = "recording"
        needs_prompt = True

        def score(self, images, prompts=None):
            seen.append(list(prompts))
            return images.float().mean(dim=(1, 2, 3))

    pipe = tiny_sd("euler_ancestral")
    adapter(pipe, "sd", reward=Recording(), prompt=["one", "two"], num_images_per_prompt=2, seed=[1, 2, 3, 4])
    assert seen == [["one", "one", "two", "two"]]
    adapter(pipe, "sd", reward=Recording(), prompt="one", reward_prompt="something else")
    assert seen[-1] == ["something else"]


def test_comfyui_noise_is_the_node_s_noise():
    from dno.diffusers_host import comfyui_noise
    parts = build_parts(tiny_sd("euler_ancestral"), [PROMPT], None, STEPS, 1.0, CFG, SIZE, SIZE)
    noise = comfyui_noise(parts.shape, 9, parts.plan.sigmas, True, torch.device("cpu"))
    torch.testing.assert_close(noise.x_T, torch.randn(parts.shape, generator=torch.manual_seed(9)))
    gen = torch.Generator().manual_seed(9)
    draws = [torch.randn(parts.shape, generator=gen) for _ in range(STEPS - 1)]
    torch.testing.assert_close(noise.steps[:-1], torch.stack(draws))
    assert torch.equal(noise.steps[-1], torch.zeros(parts.shape))      # the last step ends at sigma 0


def test_bad_input_names_the_input_and_the_fix():
    pipe = tiny_sd("euler_ancestral")
    with pytest.raises(DNOError, match="FluxPipeline; got object"):
        optimize_pipeline(object(), PROMPT, BuiltinReward("brightness"))
    with pytest.raises(DNOError, match="options .*got \\['max_sequence_length'\\]"):
        adapter(pipe, "sd", max_sequence_length=32)
    with pytest.raises(DNOError, match="memory_mode must be one of"):
        adapter(pipe, "sd", memory_mode="tiny")
    with pytest.raises(DNOError, match="noise must be one of"):
        adapter(pipe, "sd", noise="numpy")
    with pytest.raises(DNOError, match="leave generator and latents unset"):
        adapter(pipe, "sd", noise="comfyui", generator=torch.Generator())
    with pytest.raises(DNOError, match="2 seeds for 1 images"):
        adapter(pipe, "sd", seed=[1, 2])
    with pytest.raises(DNOError, match="latents has shape"):
        adapter(pipe, "sd", latents=torch.zeros(1, 4, 3, 3))
    pipe.scheduler = sd_scheduler("ddim", clip_sample=True)
    with pytest.raises(DNOError, match="clip_sample=False"):
        adapter(pipe, "sd", eta=1.0)
    pipe.scheduler = sd_scheduler("ddim", timestep_spacing="linspace", steps_offset=0)
    with pytest.raises(DNOError, match="timestep_spacing='leading'"):
        adapter(pipe, "sd", eta=1.0)


def test_flux_true_cfg_and_distilled_guidance():
    """Flux's true CFG (a negative prompt and true_cfg_scale > 1) as the pipeline runs it."""
    pipe = tiny_flux()
    latents = pipeline_output(pipe, "flux", negative_prompt="blurry", true_cfg_scale=2.0)
    out = adapter(pipe, "flux", negative_prompt="blurry", true_cfg_scale=2.0, eta=0.0)
    torch.testing.assert_close(out.latents, latents, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(latents, pipeline_output(pipe, "flux"), atol=1e-3)


@pytest.mark.gpu
def test_on_cuda_fp16_reproduces_the_pipeline_and_replays_the_render_as_cuda_graphs():
    pipe = tiny_sd("euler_ancestral").to("cuda", torch.float16)
    latents = pipeline_output(pipe, "sd")
    out = adapter(pipe, "sd")
    torch.testing.assert_close(out.latents.float(), latents.float(), rtol=2e-2, atol=2e-2)
    out = adapter(pipe, "sd", opt_steps=3, lr=0.1)
    info = out.result.render_info
    assert info.get("cuda_graphs") is True, info            # the diffusers UNet and VAE capture as graphs
    assert float(out.best_reward) > out.history[0].reward[0]
