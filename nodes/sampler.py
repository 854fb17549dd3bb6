"""DNO sampler nodes: a SAMPLER for SamplerCustomAdvanced and an all-in-one KSampler."""
from __future__ import annotations

from typing import Optional

import comfy.samplers

from ..dno import DNOConfig, DNOError
from ..dno.regularizer import DEFAULT_PERMUTATIONS
from .engine import DNOHostSampler, DNORunSettings, OptimizedNoise, run_ksampler
from .history import RunHistories, history_json
from .rewards import require_prompt

MODES = {"SDE (eta=1, paper default)": 1.0, "ODE (eta=0)": 0.0}
METHODS = ["auto", "autograd", "hybrid", "zeroth_order"]
# "auto" first: the default of new nodes; workflows saved with bf16/fp16/fp32 keep their choice.
PRECISIONS = ["auto", "bf16", "fp16", "fp32"]
MEMORY_MODES = {"auto": "auto", "low memory (recompute every step)": True,
                "lowest memory (recompute blocks)": "blocks", "fastest (store every step)": False}


def optimisation_inputs():
    """Inputs shared by both DNO nodes."""
    return {
        "vae": ("VAE", {"tooltip": "Decodes latents so the reward can score images."}),
        "reward": ("DNO_REWARD", {"tooltip": "What to maximise (from a DNO reward node)."}),
        "sampler_mode": (list(MODES), {"tooltip": "SDE optimises x_T and every per-step noise; "
                                                  "ODE optimises x_T only."}),
        "opt_steps": ("INT", {"default": 20, "min": 0, "max": 10000,
                              "tooltip": "Optimisation steps (0 = plain sampling)."}),
        "lr": ("FLOAT", {"default": 0.01, "min": 1e-5, "max": 10.0, "step": 0.001,
                         "tooltip": "Adam learning rate on the noise (the paper's range: 0.01); each image's "
                                    "gradient is clipped to norm 1."}),
        "method": (METHODS, {"tooltip": "auto = exact gradients for differentiable rewards, "
                                        "hybrid estimator otherwise."}),
        "precision": (PRECISIONS, {"tooltip": "Autocast precision of the differentiable pass. auto: fp32 on "
                                              "a CPU (bf16 there is many times slower), the model's own "
                                              "dtype on a GPU."}),
        "time_budget": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 86400.0, "step": 1.0,
                                  "tooltip": "Seconds; 0 = no limit."}),
        "reward_prompt": ("STRING", {"default": "", "multiline": True,
                                     "tooltip": "Text for text-image rewards (HPS, PickScore, CLIP)."}),
    }


def optional_inputs():
    return {
        "regularizer": ("DNO_REGULARIZER", {"tooltip": "Keeps the noise in-distribution."}),
        "target_reward": ("FLOAT", {"default": 0.0, "min": -1e9, "max": 1e9, "step": 0.01,
                                    "tooltip": "The reward at which to stop, when stop_at_target is on."}),
        "stop_at_target": ("BOOLEAN", {"default": False,
                                       "tooltip": "Stop once every image reached target_reward."}),
        "opt_window": ("INT", {"default": 0, "min": 0, "max": 10000,
                               "tooltip": "The paper's opt_time N: optimise the N noises that enter the last N "
                                          "sampling steps (x_T counts as the first step's; the last step "
                                          "injects none). Earlier steps run without a graph (cheaper). "
                                          "0 = every step and x_T. With sampler_mode ODE only 0 (or N = "
                                          "steps) optimises anything."}),
        "preview_every": ("INT", {"default": 5, "min": 0, "max": 1000,
                                  "tooltip": "Send a preview image every N optimisation steps (and at the last); "
                                             "0 = no previews. Each preview costs an image encode and transfer."}),
        "grad_samples": ("INT", {"default": 16, "min": 1, "max": 1024,
                                 "tooltip": "Perturbed samples per step for hybrid/zeroth-order."}),
        "perturbation": ("FLOAT", {"default": 0.01, "min": 1e-5, "max": 1.0, "step": 0.001,
                                   "tooltip": "Size mu of the random image perturbations of the hybrid / "
                                              "zeroth-order estimators (pixels in 0..1)."}),
        "memory_mode": (list(MEMORY_MODES), {"tooltip": "auto: keep as many sampling steps in memory as "
                                                        "the budget allows (fast on big cards, fits small "
                                                        "ones); the others force one strategy."}),
        "memory_budget_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5,
                                       "tooltip": "GPU memory DNO may use in auto mode, GiB; "
                                                  "0 = what is free on the card."}),
    }


def settings_from(vae, reward, sampler_mode, opt_steps, lr, method, precision, time_budget, reward_prompt,
                  regularizer=None, target_reward=0.0, stop_at_target=False, opt_window=0, preview_every=5,
                  grad_samples=16, perturbation=0.01, memory_mode="auto", memory_budget_gb=0.0,
                  node_id=None) -> DNORunSettings:
    if sampler_mode not in MODES:
        raise DNOError(f"sampler_mode must be one of {list(MODES)}, got {sampler_mode!r}")
    if memory_mode not in MEMORY_MODES:
        raise DNOError(f"memory_mode must be one of {list(MEMORY_MODES)}, got {memory_mode!r}")
    config = DNOConfig(steps=opt_steps, lr=lr, method=method, precision=precision,
                       time_budget=time_budget or None,
                       target_reward=target_reward if stop_at_target else None,
                       window=opt_window or None, q=grad_samples, mu=perturbation,
                       checkpoint=MEMORY_MODES[memory_mode], memory_budget_gb=memory_budget_gb or None)
    config.validate()
    prompts = [reward_prompt] if reward_prompt.strip() else None
    require_prompt(reward, prompts, "reward_prompt", "DNO")
    return DNORunSettings(reward=reward, vae=vae, config=config, eta=MODES[sampler_mode],
                          regularizer=regularizer, prompts=prompts, preview_every=preview_every,
                          node_id=node_id)


def ode_window_problem(sampler_mode, opt_window, steps=None, steps_from_sigmas=False) -> Optional[str]:
    """Why ``sampler_mode`` ODE with this ``opt_window`` would optimise nothing, or None.

    ODE sampling injects no per-step noise, so a window of the last ``opt_window`` steps holds
    something to optimise only when it reaches x_T: ``opt_window`` 0 (all steps and x_T) or at
    least the number of sampling steps (the same thing). ``steps_from_sigmas``: the sampler gets
    its steps from a SIGMAS input (DNO Sampler), never known at validation; since a window of
    every step is what opt_window 0 already says, any opt_window > 0 is refused there.

    ``None`` where validation cannot decide: a value linked from another node (the node sees
    None), e.g. a DNO KSampler whose steps come from a primitive node; the run checks it then.
    """
    if sampler_mode is None or opt_window is None or MODES.get(sampler_mode, 1.0) > 0 or opt_window <= 0:
        return None
    if steps is None and not steps_from_sigmas:
        return None
    fix = (f"Set opt_window to 0 (optimise every step and x_T) or sampler_mode to {list(MODES)[0]!r} "
           "(SDE optimises the per-step noises in the window).")
    if steps is not None:
        if opt_window >= steps:
            return None
        return (f"sampler_mode {sampler_mode!r} with opt_window {opt_window} < steps {steps} optimises nothing: "
                f"ODE sampling has no per-step noise, and a window of the last {opt_window} steps does not "
                f"reach x_T. {fix}")
    return (f"sampler_mode {sampler_mode!r} with opt_window {opt_window} optimises nothing: ODE sampling has "
            "no per-step noise, so only a window reaching x_T (opt_window 0) has something to optimise; this "
            "sampler's steps come from SamplerCustomAdvanced's SIGMAS, which validation cannot see, and a "
            f"window of every step is opt_window 0. {fix}")


def check_inputs(node_class, **values) -> Optional[str]:
    """ComfyUI skips its own combo and min/max checks for the inputs a VALIDATE_INPUTS takes:
    the same checks for those inputs (None = linked, not checked). A message, or None."""
    types = node_class.INPUT_TYPES()
    spec = {**types.get("required", {}), **types.get("optional", {})}
    for name, value in values.items():
        if value is None:
            continue
        kind, options = spec[name][0], (spec[name][1] if len(spec[name]) > 1 else {})
        if isinstance(kind, list) and value not in kind:
            return f"{name}: {value!r} is not one of {kind}"
        if "min" in options and value < options["min"]:
            return f"{name}: {value} is smaller than the minimum {options['min']}"
        if "max" in options and value > options["max"]:
            return f"{name}: {value} is bigger than the maximum {options['max']}"
    return None


class DNOSampler:
    """DNO as a SAMPLER: plug into SamplerCustomAdvanced with any guider and sigmas."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": optimisation_inputs(), "optional": optional_inputs(),
                "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("SAMPLER", "DNO_HISTORY")
    RETURN_NAMES = ("sampler", "history")
    OUTPUT_TOOLTIPS = ("DNO as the sampler of SamplerCustomAdvanced (any guider, sigmas and noise).",
                       "Where this sampler's runs keep their reward history: connect it, with the latent "
                       "SamplerCustomAdvanced returns, to DNO Reward History.")
    FUNCTION = "build"
    CATEGORY = "DNO"
    DESCRIPTION = ("Direct Noise Optimization as a SAMPLER for SamplerCustomAdvanced: optimises x_T (and the "
                   "per-step noises in SDE mode) to maximise the reward, and returns the best latent.")

    @classmethod
    def VALIDATE_INPUTS(cls, sampler_mode=None, opt_window=None):
        """At prompt validation, before any model loads: ODE with a window is refused (the steps
        are SamplerCustomAdvanced's, unknown here, so any opt_window > 0; see ode_window_problem)."""
        return (check_inputs(cls, sampler_mode=sampler_mode, opt_window=opt_window)
                or ode_window_problem(sampler_mode, opt_window, steps_from_sigmas=True) or True)

    def build(self, unique_id=None, **kwargs):
        history = RunHistories()
        return (DNOHostSampler(settings_from(node_id=unique_id, **kwargs), history), history)


class DNOKSampler:
    """All-in-one: KSampler inputs plus the DNO settings."""

    @classmethod
    def INPUT_TYPES(cls):
        required = {
            "model": ("MODEL", {"tooltip": "The model that denoises (LoRAs and patches included)."}),
            "positive": ("CONDITIONING", {"tooltip": "What the image should show."}),
            "negative": ("CONDITIONING", {"tooltip": "What the image should not show."}),
            "latent_image": ("LATENT", {"tooltip": "The latent to sample: an empty one for txt2img, an "
                                                   "encoded image with denoise < 1 to refine it."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                             "tooltip": "Seed of the starting noise (x_T and the per-step noises)."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000,
                              "tooltip": "Sampling steps of each render (every optimisation step renders "
                                         "the image once)."}),
            "cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance scale, as in KSampler."}),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"tooltip": "How the sigmas fall over the steps, "
                                                                          "as in KSampler."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "1 = generate from noise; below 1, refine latent_image and "
                                             "optimise only the noise of the steps that run."}),
        }
        required.update(optimisation_inputs())
        return {"required": required, "optional": optional_inputs(), "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("LATENT", "NOISE", "STRING")
    RETURN_NAMES = ("latent", "optimized_noise", "reward_history")
    OUTPUT_TOOLTIPS = ("The best latent found (per image).",
                       "The optimised x_T as a NOISE for other samplers (reproduces an ODE run exactly).",
                       "JSON: reward, regulariser and noise probability per optimisation step, and why the "
                       "run stopped. DNO Plot Reward History draws it.")
    FUNCTION = "sample"
    CATEGORY = "DNO"
    DESCRIPTION = "KSampler that optimises its noise to maximise a reward (Direct Noise Optimization)."

    @classmethod
    def VALIDATE_INPUTS(cls, sampler_mode=None, opt_window=None, steps=None):
        """At prompt validation, before any model loads: ODE with a window shorter than the
        sampling steps is refused (see ode_window_problem)."""
        return (check_inputs(cls, sampler_mode=sampler_mode, opt_window=opt_window, steps=steps)
                or ode_window_problem(sampler_mode, opt_window, steps) or True)

    def sample(self, model, positive, negative, latent_image, seed, steps, cfg, scheduler, denoise,
               unique_id=None, **kwargs):
        settings = settings_from(node_id=unique_id, **kwargs)
        latent, sampler = run_ksampler(model, positive, negative, latent_image, settings, seed, steps, cfg,
                                       scheduler, denoise)
        result = sampler.result
        return (latent, OptimizedNoise(result.noise.x_T, seed), history_json(result))


class DNONoiseRegularizer:
    """The paper's probability regulariser for the DNO nodes."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "gamma": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1000.0, "step": 0.1,
                                "tooltip": "Weight of the penalty (0 = off). With the default block_exponent "
                                           "and permutations this is the paper's gamma."}),
            "block_exponent": ("INT", {"default": 1, "min": 0, "max": 6,
                                       "tooltip": "k: blocks of 4**k numbers (the paper's code: 1)."}),
            "permutations": ("INT", {"default": DEFAULT_PERMUTATIONS, "min": 0, "max": 1000,
                                     "tooltip": "Random permutations averaged on top of the sequential split. "
                                                f"{DEFAULT_PERMUTATIONS} = the paper's code: its penalty, so gamma "
                                                "is the paper's (typical noise costs 4 log 2). 0 = sequential "
                                                "split only: about half the penalty, cheaper."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffff,
                             "tooltip": "Seed of the permutations (fixed for the whole run)."}),
        }}

    RETURN_TYPES = ("DNO_REGULARIZER",)
    OUTPUT_TOOLTIPS = ("The regulariser for the regularizer input of a DNO node.",)
    FUNCTION = "build"
    CATEGORY = "DNO"
    DESCRIPTION = ("The paper's probability regulariser: penalises noise that stops looking like N(0, I) "
                   "(block means and covariances). The defaults compute the official code's penalty, so "
                   "gamma means the paper's gamma.")

    def build(self, gamma, block_exponent, permutations, seed):
        from ..dno import ProbabilityRegularizer
        return (ProbabilityRegularizer(gamma=gamma, k=block_exponent, permutations=permutations, seed=seed),)


NODE_CLASS_MAPPINGS = {
    "DNOSampler": DNOSampler,
    "DNOKSampler": DNOKSampler,
    "DNONoiseRegularizer": DNONoiseRegularizer,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DNOSampler": "DNO Sampler",
    "DNOKSampler": "DNO KSampler",
    "DNONoiseRegularizer": "DNO Noise Regularizer",
}
