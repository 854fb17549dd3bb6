"""``optimize_pipeline``: DNO on a loaded diffusers pipeline, in one call.

The pipeline becomes the core's denoiser, sigmas and decode (``pipelines.py``),
the noise is drawn as the pipeline draws it (``noise.py``), and the core's
``optimize`` runs with the same rewards, estimators, memory modes and stopping
rules as the ComfyUI nodes.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch

from ..errors import DNOError
from ..gradients import EstimatorShare
from ..optimize import DNOConfig, DNOResult, StepInfo, optimize
from ..precision import AUTO, resolve_precision
from ..regularizer import ProbabilityRegularizer
from .noise import SOURCES, comfyui_noise, diffusers_noise, generators_for
from .pipelines import PipelineParts, build_parts, call_default, pipeline_family

log = logging.getLogger("DNO")

# memory_mode -> DNOConfig.checkpoint; the nodes' labels are accepted too
MEMORY_MODES = {"auto": "auto", "low": True, "lowest": "blocks", "fastest": False}
_MEMORY_ALIASES = {"low memory": "low", "lowest memory": "lowest",
                   "low memory (recompute every step)": "low", "lowest memory (recompute blocks)": "lowest",
                   "fastest (store every step)": "fastest"}


@dataclass
class PipelineResult:
    images: list                    # the best image of each sample, as PIL images
    image: torch.Tensor             # the same, (B, 3, H, W) in [0, 1], on the CPU
    latents: torch.Tensor           # their final latents, the pipeline's output_type="latent" (Flux: unpacked)
    initial_image: torch.Tensor     # the unoptimised sample (step 0), (B, 3, H, W) in [0, 1]
    result: DNOResult               # the core's result: noise, rewards, history, stop reason
    prompts: List[str]

    @property
    def history(self):
        return self.result.history

    @property
    def best_reward(self) -> torch.Tensor:
        return self.result.best_reward

    @property
    def initial_reward(self) -> torch.Tensor:
        return self.result.initial_reward

    @property
    def stop_reason(self) -> str:
        return self.result.stop_reason


def memory_checkpoint(memory_mode: str):
    """DNOConfig.checkpoint for a memory_mode name (``auto``, ``low``, ``lowest``, ``fastest``)."""
    key = _MEMORY_ALIASES.get(memory_mode, memory_mode)
    if key not in MEMORY_MODES:
        raise DNOError(f"memory_mode must be one of {list(MEMORY_MODES)} (or a DNO node's label), "
                       f"got {memory_mode!r}")
    return MEMORY_MODES[key]


def as_regularizer(regularizer) -> Optional[ProbabilityRegularizer]:
    """A ProbabilityRegularizer, a gamma (the paper's defaults otherwise), or None / 0 for none."""
    if regularizer is None or isinstance(regularizer, ProbabilityRegularizer):
        return regularizer
    if isinstance(regularizer, (int, float)) and not isinstance(regularizer, bool):
        return ProbabilityRegularizer(gamma=float(regularizer)) if regularizer > 0 else None
    raise DNOError(f"regularizer must be a dno.ProbabilityRegularizer, a gamma (float) or None, "
                   f"got {type(regularizer).__name__}")


def _as_list(value: Union[str, Sequence[str], None], name: str) -> Optional[List[str]]:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    value = list(value)
    if not all(isinstance(v, str) for v in value):
        raise DNOError(f"{name} must be a string or a list of strings")
    return value


def _prepare_reward(reward, device) -> None:
    prepare = getattr(reward, "prepare", None)
    if callable(prepare):
        prepare(device)
    elif isinstance(reward, torch.nn.Module):
        reward.to(device)


@contextlib.contextmanager
def _vae_in_fp32(parts: PipelineParts):
    """SDXL's fp16 VAE overflows: the pipeline decodes in fp32 (force_upcast), so does DNO, for the run."""
    vae = parts.decode.vae
    if not parts.decode.full_precision:
        yield
        return
    vae.to(torch.float32)
    try:
        yield
    finally:
        vae.to(torch.float16)


def optimize_pipeline(pipe, prompt: Union[str, Sequence[str]], reward, *, opt_steps: int = 20,
                      steps: Optional[int] = None, negative_prompt: Union[str, Sequence[str], None] = None,
                      guidance_scale: Optional[float] = None, height: Optional[int] = None,
                      width: Optional[int] = None, num_images_per_prompt: int = 1,
                      seed: Union[int, Sequence[int], None] = 0, generator=None,
                      latents: Optional[torch.Tensor] = None, noise: str = "diffusers", eta: float = 1.0,
                      lr: float = 0.01, method: str = "auto", precision: str = AUTO,
                      regularizer=None, memory_mode: str = "auto", memory_budget_gb: Optional[float] = None,
                      time_budget: Optional[float] = None, target_reward: Optional[float] = None,
                      opt_window: int = 0, grad_samples: int = 16, perturbation: float = 0.01,
                      estimator_batch: int = 4, estimator_seed: int = 0,
                      reward_prompt: Union[str, Sequence[str], None] = None,
                      callback: Optional[Callable[[StepInfo], None]] = None,
                      estimator_share: Optional[EstimatorShare] = None, cuda_graphs: bool = True,
                      **pipeline_options) -> PipelineResult:
    """Direct Noise Optimization on a diffusers text-to-image pipeline.

    ``pipe``: a loaded StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline
    or FluxPipeline (its scheduler's sigmas are used: DDIM, Euler, Euler ancestral and FlowMatch
    Euler as they are, any other as Euler (ancestral) from its config). ``reward``: a DNO reward
    (``dno.rewards``) or any ``reward(images, prompts) -> (B,)`` with a ``differentiable`` flag.

    Sampling: ``steps`` (default the pipeline's), ``eta`` 1 = SDE (the paper's default: x_T and every
    step's noise are optimised; Euler ancestral / DDIM(1)), 0 = ODE (x_T only; Euler / DDIM(0) /
    FlowMatch Euler), ``guidance_scale`` (default the pipeline's), ``height``, ``width``,
    ``negative_prompt`` and the family's ``pipeline_options`` (``guidance_rescale``, ``clip_skip``,
    ``max_sequence_length``, ``true_cfg_scale``, SDXL's size conditioning).

    Noise: ``seed`` (an int: one generator for the batch, as ``pipe(generator=torch.Generator().
    manual_seed(seed))``; a list: one per image) or ``generator``; ``latents`` gives x_T
    directly. ``noise="comfyui"`` draws it as ComfyUI's KSampler does from the same seed.

    DNO: ``opt_steps`` updates (0 = plain sampling), ``lr``, ``method`` (auto | autograd | hybrid |
    zeroth_order), ``precision`` (auto | fp32 | bf16 | fp16), ``regularizer`` (a
    ProbabilityRegularizer or a gamma), ``memory_mode`` (auto | low | lowest | fastest),
    ``memory_budget_gb``, ``time_budget`` (s), ``target_reward``, ``opt_window`` (the paper's
    opt_time, 0 = all), ``grad_samples`` / ``perturbation`` / ``estimator_batch`` (q, mu and chunk
    of the hybrid estimator), ``callback(StepInfo)`` per scored sample (raise
    ``dno.StopOptimization`` to stop). ``estimator_share``: this process's part of the
    estimator's renders (``dno.distributed``).

    Returns a :class:`PipelineResult`: the best image per sample, its latents, the unoptimised
    image and the core's result (noise, rewards, history, stop reason).
    """
    pipeline_family(pipe)       # a clear error for anything but the four pipeline classes
    prompts = _as_list(prompt, "prompt")
    if not prompts:
        raise DNOError("prompt is empty: give the text to generate (a string or a list of strings)")
    if int(num_images_per_prompt) < 1:
        raise DNOError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
    images_prompts = [p for p in prompts for _ in range(int(num_images_per_prompt))]
    negatives = _as_list(negative_prompt, "negative_prompt")
    if negatives is not None:
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise DNOError(f"negative_prompt: {len(negatives)} for {len(prompts)} prompts; give one or one per prompt")
        negatives = [n for n in negatives for _ in range(int(num_images_per_prompt))]
    if noise not in SOURCES:
        raise DNOError(f"noise must be one of {SOURCES}, got {noise!r}")
    if eta < 0:
        raise DNOError(f"eta must be >= 0 (1 = SDE, 0 = ODE), got {eta}")
    steps = int(steps if steps is not None else call_default(pipe, "num_inference_steps"))
    parts = build_parts(pipe, images_prompts, negatives, steps, eta, guidance_scale, height, width,
                        pipeline_options)
    batch = parts.shape[0]
    device = parts.device
    model_dtype = parts.denoiser.dtype
    sde = eta > 0
    if noise == "comfyui":
        if generator is not None or latents is not None:
            raise DNOError("noise='comfyui' draws from seed alone; leave generator and latents unset")
        start = comfyui_noise(parts.shape, seed, parts.plan.sigmas, sde, device)
    else:
        gen = generator if generator is not None else generators_for(seed, batch)
        start = diffusers_noise(parts.shape, parts.plan.steps, sde, gen, device, parts.embeds_dtype,
                                model_dtype, latents)

    resolved = resolve_precision(precision, device, model_dtype)
    wanted = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolved)
    config = DNOConfig(steps=int(opt_steps), lr=lr, method=method, precision=resolved,
                       time_budget=time_budget or None, target_reward=target_reward,
                       window=opt_window or None, checkpoint=memory_checkpoint(memory_mode),
                       memory_budget_gb=memory_budget_gb or None, q=int(grad_samples), mu=float(perturbation),
                       estimator_batch=int(estimator_batch), seed=int(estimator_seed),
                       # a model already computing in the requested dtype runs as in plain sampling
                       autocast_sampler=not (wanted is not None and model_dtype == wanted),
                       cuda_graphs=cuda_graphs)
    config.validate()
    reward_prompts = _as_list(reward_prompt, "reward_prompt")
    if reward_prompts is None:
        reward_prompts = images_prompts
    elif len(reward_prompts) == len(prompts) and len(prompts) != batch:
        reward_prompts = [p for p in reward_prompts for _ in range(int(num_images_per_prompt))]
    _prepare_reward(reward, device)

    seen = {}

    def on_step(info: StepInfo) -> None:
        if info.step == 0:
            seen["initial"] = info.image.detach().float().cpu()
        if callback is not None:
            callback(info)

    with _vae_in_fp32(parts):
        result = optimize(parts.denoiser, parts.plan.sigmas, reward, parts.decode, start, parts.plan.schedule,
                          eta=eta, prompts=reward_prompts, config=config, regularizer=as_regularizer(regularizer),
                          callback=on_step, estimator_share=estimator_share)
    image = result.image.detach().float().clamp(0, 1).cpu()
    return PipelineResult(images=to_pil(image), image=image, latents=result.latent.detach(),
                          initial_image=seen.get("initial", image), result=result, prompts=images_prompts)


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [0, 1] -> PIL images, rounded as diffusers' image processor rounds."""
    from diffusers.image_processor import VaeImageProcessor
    array = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return VaeImageProcessor.numpy_to_pil(array)

