"""A loaded diffusers pipeline as the core's callables: denoiser, decode, sigmas, latent shape.

One function per pipeline family reads what the pipeline's own ``__call__``
computes before its denoising loop (the prompt encoding with the pipeline's
``encode_prompt``, SDXL's micro-conditioning, Flux's packing and position
ids, the sigmas its scheduler gives) and wraps the network into
``denoiser(x, sigma) -> x0`` with the pipeline's guidance, so that sampling
these callables with the core is the pipeline's loop with the noise made an
explicit input. Nothing of the pipeline is changed.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import DNOError
from .schedulers import SamplingPlan, TimestepTable, model_input, plan_sampling, x0_from_prediction

FAMILIES = ("sd", "sdxl", "sd3", "flux")
# per family, the pipeline options DNO passes on, with what they mean in the pipeline's __call__
OPTIONS = {
    "sd": ("guidance_rescale", "clip_skip"),
    "sdxl": ("guidance_rescale", "clip_skip", "original_size", "crops_coords_top_left", "target_size"),
    "sd3": ("clip_skip", "max_sequence_length"),
    "flux": ("max_sequence_length", "true_cfg_scale"),
}


def pipeline_family(pipe) -> str:
    """"sd", "sdxl", "sd3" or "flux"; a DNOError naming the supported classes otherwise."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
    for family, cls in (("flux", FluxPipeline), ("sd3", StableDiffusion3Pipeline),
                        ("sdxl", StableDiffusionXLPipeline), ("sd", StableDiffusionPipeline)):
        if isinstance(pipe, cls):
            return family
    raise DNOError(f"DNO runs StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline and "
                   f"FluxPipeline; got {type(pipe).__name__}. Load one of those (text-to-image) pipelines")


def call_default(pipe, name: str):
    """The default of ``name`` in the pipeline's own ``__call__`` (guidance_scale, steps, ...)."""
    parameter = inspect.signature(type(pipe).__call__).parameters.get(name)
    return None if parameter is None else parameter.default


def _tiled(value: torch.Tensor, times: int) -> torch.Tensor:
    # the core tiles its batch as b0, b1, ..., b0, b1, ... (DNONoise.repeat); so does the conditioning
    return value if times == 1 else value.repeat(times, *([1] * (value.dim() - 1)))


def _device_of(module: torch.nn.Module) -> torch.device:
    first = next(iter(module.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


class PipelineDenoiser(torch.nn.Module):
    """``denoiser(x, sigma) -> x0`` over a pipeline's network with its classifier-free guidance.

    ``positive`` / ``negative`` hold the conditioning of the B images (batch first); the core may
    call with the batch tiled (the estimator's perturbed copies), and the conditioning is tiled
    alike. ``negative`` None: no guidance pass.
    """

    def __init__(self, network: torch.nn.Module, plan: SamplingPlan, positive: Dict[str, torch.Tensor],
                 negative: Optional[Dict[str, torch.Tensor]], guidance_scale: float, batch: int):
        super().__init__()
        self.network = network
        # on the network's device from the start: a copy from the CPU inside a render would stop
        # the render's capture as a CUDA graph (unpinned host memory)
        self.table = TimestepTable(plan).to(_device_of(network))
        self.prediction = plan.prediction
        self.positive, self.negative = positive, negative
        self.guidance_scale = float(guidance_scale)
        self.batch = int(batch)

    @property
    def dtype(self) -> torch.dtype:
        return self.network.dtype

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def predict_guided(self, x, t, negative, positive) -> Tuple[torch.Tensor, torch.Tensor]:
        """(unconditional, conditional) output in one batched call, as the pipelines make it."""
        both = {k: torch.cat([negative[k], positive[k]]) for k in positive}
        return self.predict(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)

    def guide(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return uncond + self.guidance_scale * (cond - uncond)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        times = x.shape[0] // self.batch
        inp = model_input(self.prediction, x, sigma).to(self.dtype)
        t = self.table(sigma)
        positive = {k: _tiled(v, times) for k, v in self.positive.items()}
        if self.negative is None:
            out = self.predict(inp, t, positive)
        else:
            negative = {k: _tiled(v, times) for k, v in self.negative.items()}
            out = self.guide(*self.predict_guided(inp, t, negative, positive))
        return x0_from_prediction(self.prediction, out.float(), x, sigma)

    def checkpoint_segments(self) -> List[torch.nn.Module]:
        return network_blocks(self.network)


class UNetDenoiser(PipelineDenoiser):
    """SD / SDXL: the UNet on the variance-preserving sample, guidance (and its rescale) on its output."""

    def __init__(self, *args, guidance_rescale: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.guidance_rescale = float(guidance_rescale or 0.0)

    def predict(self, x, t, cond):
        added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
        return self.network(x, t, encoder_hidden_states=cond["encoder_hidden_states"],
                            timestep_cond=cond.get("timestep_cond"), added_cond_kwargs=added or None,
                            return_dict=False)[0]

    def guide(self, uncond, cond):
        out = super().guide(uncond, cond)
        if self.guidance_rescale > 0:
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
            out = rescale_noise_cfg(out, cond, guidance_rescale=self.guidance_rescale)
        return out


class SD3Denoiser(PipelineDenoiser):
    """SD3's MMDiT: velocity at timestep 1000 sigma."""

    def predict(self, x, t, cond):
        return self.network(hidden_states=x, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                            pooled_projections=cond["pooled_projections"], return_dict=False)[0]


class FluxDenoiser(PipelineDenoiser):
    """Flux: packed 2x2 patches, the distilled guidance as an input, true CFG as a second call."""

    def __init__(self, *args, pack, unpack, image_ids, text_ids, negative_text_ids=None,
                 guidance: Optional[float] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.pack, self.unpack = pack, unpack
        self.image_ids, self.text_ids, self.negative_text_ids = image_ids, text_ids, negative_text_ids
        self.distilled_guidance = guidance

    def call(self, x, t, cond, text_ids):
        guidance = None
        if self.distilled_guidance is not None:
            guidance = torch.full((x.shape[0],), self.distilled_guidance, device=x.device, dtype=torch.float32)
        out = self.network(hidden_states=self.pack(x), timestep=t.to(x.dtype) / 1000, guidance=guidance,
                           pooled_projections=cond["pooled_projections"],
                           encoder_hidden_states=cond["encoder_hidden_states"], txt_ids=text_ids,
                           img_ids=self.image_ids, return_dict=False)[0]
        return self.unpack(out, x.shape)

    def predict(self, x, t, cond):
        return self.call(x, t, cond, self.text_ids)

    def predict_guided(self, x, t, negative, positive):
        # the pipeline's true CFG: two calls, each with its own text ids
        return self.call(x, t, negative, self.negative_text_ids), self.call(x, t, positive, self.text_ids)


class PipelineDecoder(torch.nn.Module):
    """Differentiable ``latent -> image in [0, 1]`` as the pipeline decodes (scaling, shift,
    SDXL's latent mean / std), then the image processor's denormalisation."""

    def __init__(self, vae: torch.nn.Module, shift: Optional[float] = None, mean=None, std=None,
                 full_precision: bool = False):
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)
        self.shift = shift
        # made once on the VAE's device (a host-to-device copy per render would stop graph capture)
        self.mean, self.std = (None, None) if mean is None or std is None else (
            torch.as_tensor(mean, dtype=torch.float32, device=_device_of(vae)),
            torch.as_tensor(std, dtype=torch.float32, device=_device_of(vae)))
        self.full_precision = full_precision   # SDXL's fp16 VAE overflows: decode in fp32 (force_upcast)

    def latents_for_vae(self, latent: torch.Tensor) -> torch.Tensor:
        if self.mean is not None and self.std is not None:
            view = (1, -1) + (1,) * (latent.dim() - 2)
            mean = self.mean.to(latent.device, latent.dtype).view(view)
            std = self.std.to(latent.device, latent.dtype).view(view)
            return latent * std / self.scale + mean
        z = latent / self.scale
        return z if self.shift is None else z + self.shift

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        z = self.latents_for_vae(latent)
        if self.full_precision:
            with torch.autocast(latent.device.type, enabled=False):
                image = self.vae.decode(z.float(), return_dict=False)[0]
        else:
            image = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def checkpoint_segments(self) -> List[torch.nn.Module]:
        decoder = getattr(self.vae, "decoder", None)
        if decoder is None:
            return []
        blocks = []
        if getattr(decoder, "mid_block", None) is not None:
            blocks.append(decoder.mid_block)
        blocks.extend(getattr(decoder, "up_blocks", None) or [])
        if not blocks and isinstance(getattr(decoder, "layers", None), torch.nn.Sequential):
            blocks.extend(decoder.layers.children())        # AutoencoderTiny
        return blocks


def network_blocks(network: torch.nn.Module) -> List[torch.nn.Module]:
    """The blocks block checkpointing wraps (the lowest-memory mode): a UNet's resnets and
    transformers, a DiT's transformer blocks."""
    blocks = []
    for name in ("transformer_blocks", "single_transformer_blocks"):
        blocks.extend(getattr(network, name, None) or [])
    for level in list(getattr(network, "down_blocks", None) or []) + list(getattr(network, "up_blocks", None) or []):
        blocks.extend(getattr(level, "resnets", None) or [])
        blocks.extend(getattr(level, "attentions", None) or [])
    if getattr(network, "mid_block", None) is not None:
        blocks.append(network.mid_block)
    return blocks


@dataclass
class PipelineParts:
    """What the core needs, read from a pipeline for one batch of images."""
    family: str
    denoiser: PipelineDenoiser
    decode: PipelineDecoder
    plan: SamplingPlan
    shape: Tuple[int, ...]              # (B, C, h, w) of x_T (Flux: unpacked)
    device: torch.device
    embeds_dtype: torch.dtype           # the dtype the pipeline draws x_T in
    prompts: List[str] = field(default_factory=list)


def build_parts(pipe, prompts: Sequence[str], negative_prompts: Optional[Sequence[str]], steps: int, eta: float,
                guidance_scale: Optional[float] = None, height: Optional[int] = None, width: Optional[int] = None,
                options: Optional[dict] = None) -> PipelineParts:
    """The core's callables for ``prompts`` (one image each) on ``pipe``, as its ``__call__`` would set up.

    ``negative_prompts``: one per image, or None (the pipeline's default). ``options``: pipeline
    options of ``OPTIONS[family]`` (e.g. ``clip_skip``, ``max_sequence_length``).
    """
    family = pipeline_family(pipe)
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS[family]))
    if unknown:
        raise DNOError(f"{type(pipe).__name__} takes the options {list(OPTIONS[family])}; got {unknown}")
    if guidance_scale is None:
        guidance_scale = call_default(pipe, "guidance_scale")
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise DNOError(f"prompt must be a string or a non-empty list of strings, got {prompts!r}")
    if negative_prompts is not None and len(negative_prompts) != len(prompts):
        raise DNOError(f"negative_prompt: {len(negative_prompts)} for {len(prompts)} images; give one string "
                       "or one per image")
    builder = {"sd": _sd_parts, "sdxl": _sdxl_parts, "sd3": _sd3_parts, "flux": _flux_parts}[family]
    with torch.no_grad():
        parts = builder(pipe, prompts, negative_prompts, int(steps), float(eta), float(guidance_scale),
                        height, width, options)
    parts.prompts = prompts
    return parts


def _size(pipe, height, width, default_sample_size) -> Tuple[int, int]:
    height = int(height or default_sample_size * pipe.vae_scale_factor)
    width = int(width or default_sample_size * pipe.vae_scale_factor)
    return height, width


def _check_size(height: int, width: int, multiple: int) -> None:
    if height % multiple or width % multiple:
        raise DNOError(f"height and width must be multiples of {multiple} for this pipeline, got {height}x{width}")


def _sd_parts(pipe, prompts, negatives, steps, eta, guidance, height, width, options):
    unet = pipe.unet
    sample = unet.config.sample_size
    height, width = _size(pipe, height, width, sample if isinstance(sample, int) else sample[0])
    _check_size(height, width, pipe.vae_scale_factor)
    device = pipe._execution_device
    cfg = guidance > 1 and unet.config.time_cond_proj_dim is None
    positive, negative = pipe.encode_prompt(prompts, device, 1, cfg, negatives, clip_skip=options.get("clip_skip"))
    batch = len(prompts)
    pos = {"encoder_hidden_states": positive}
    neg = {"encoder_hidden_states": negative} if cfg else None
    _add_guidance_embedding(pipe, unet, guidance, batch, device, positive.dtype, pos)
    plan = plan_sampling(pipe.scheduler, steps, eta, flow=False)
    denoiser = UNetDenoiser(unet, plan, pos, neg, guidance, batch, guidance_rescale=options.get("guidance_rescale"))
    shape = (batch, unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    return PipelineParts("sd", denoiser, PipelineDecoder(pipe.vae), plan, shape, device, positive.dtype)


def _add_guidance_embedding(pipe, unet, guidance, batch, device, dtype, cond) -> None:
    """LCM-style UNets take the guidance as an embedding instead of a second pass."""
    if unet.config.time_cond_proj_dim is None:
        return
    scale = torch.tensor(guidance - 1).repeat(batch)
    cond["timestep_cond"] = pipe.get_guidance_scale_embedding(
        scale, embedding_dim=unet.config.time_cond_proj_dim).to(device=device, dtype=dtype)


def _sdxl_parts(pipe, prompts, negatives, steps, eta, guidance, height, width, options):
    unet = pipe.unet
    height, width = _size(pipe, height, width, pipe.default_sample_size)
    _check_size(height, width, pipe.vae_scale_factor)
    device = pipe._execution_device
    cfg = guidance > 1 and unet.config.time_cond_proj_dim is None
    embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=cfg,
        negative_prompt=negatives, clip_skip=options.get("clip_skip"))
    batch = len(prompts)
    projection = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                  else pipe.text_encoder_2.config.projection_dim)
    time_ids = pipe._get_add_time_ids(tuple(options.get("original_size") or (height, width)),
                                      tuple(options.get("crops_coords_top_left") or (0, 0)),
                                      tuple(options.get("target_size") or (height, width)),
                                      dtype=embeds.dtype, text_encoder_projection_dim=projection)
    time_ids = time_ids.to(device).repeat(batch, 1)
    pos = {"encoder_hidden_states": embeds.to(device), "text_embeds": pooled.to(device), "time_ids": time_ids}
    neg = None
    if cfg:
        neg = {"encoder_hidden_states": negative_embeds.to(device), "text_embeds": negative_pooled.to(device),
               "time_ids": time_ids}
    _add_guidance_embedding(pipe, unet, guidance, batch, device, embeds.dtype, pos)
    plan = plan_sampling(pipe.scheduler, steps, eta, flow=False)
    denoiser = UNetDenoiser(unet, plan, pos, neg, guidance, batch, guidance_rescale=options.get("guidance_rescale"))
    vae = pipe.vae
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    decode = PipelineDecoder(vae, mean=mean, std=std, full_precision=upcast)
    shape = (batch, unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    return PipelineParts("sdxl", denoiser, decode, plan, shape, device, embeds.dtype)


def _sd3_parts(pipe, prompts, negatives, steps, eta, guidance, height, width, options):
    transformer = pipe.transformer
    height, width = _size(pipe, height, width, pipe.default_sample_size)
    _check_size(height, width, pipe.vae_scale_factor * transformer.config.patch_size)
    device = pipe._execution_device
    cfg = guidance > 1
    max_length = options.get("max_sequence_length") or call_default(pipe, "max_sequence_length")
    embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
        do_classifier_free_guidance=cfg, negative_prompt=negatives, clip_skip=options.get("clip_skip"),
        max_sequence_length=max_length)
    batch = len(prompts)
    h, w = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
    timestep_options = {}
    if pipe.scheduler.config.get("use_dynamic_shifting", None):
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
        config = pipe.scheduler.config
        patch = transformer.config.patch_size
        timestep_options["mu"] = calculate_shift((h // patch) * (w // patch), config.get("base_image_seq_len", 256),
                                                 config.get("max_image_seq_len", 4096),
                                                 config.get("base_shift", 0.5), config.get("max_shift", 1.16))
    plan = plan_sampling(pipe.scheduler, steps, eta, flow=True, **timestep_options)
    pos = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    neg = {"encoder_hidden_states": negative_embeds, "pooled_projections": negative_pooled} if cfg else None
    denoiser = SD3Denoiser(transformer, plan, pos, neg, guidance, batch)
    decode = PipelineDecoder(pipe.vae, shift=pipe.vae.config.shift_factor)
    shape = (batch, transformer.config.in_channels, h, w)
    return PipelineParts("sd3", denoiser, decode, plan, shape, device, embeds.dtype)


def _flux_parts(pipe, prompts, negatives, steps, eta, guidance, height, width, options):
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    transformer = pipe.transformer
    height, width = _size(pipe, height, width, pipe.default_sample_size)
    _check_size(height, width, pipe.vae_scale_factor * 2)
    device = pipe._execution_device
    max_length = options.get("max_sequence_length") or call_default(pipe, "max_sequence_length")
    embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                                  num_images_per_prompt=1, max_sequence_length=max_length)
    true_cfg = float(options.get("true_cfg_scale") or 1.0)
    neg, negative_text_ids = None, None
    if true_cfg > 1 and negatives is not None:
        negative_embeds, negative_pooled, negative_text_ids = pipe.encode_prompt(
            prompt=list(negatives), prompt_2=None, device=device, num_images_per_prompt=1,
            max_sequence_length=max_length)
        neg = {"encoder_hidden_states": negative_embeds, "pooled_projections": negative_pooled}
    batch = len(prompts)
    channels = transformer.config.in_channels // 4
    h = 2 * (height // (pipe.vae_scale_factor * 2))
    w = 2 * (width // (pipe.vae_scale_factor * 2))
    image_ids = pipe._prepare_latent_image_ids(batch, h // 2, w // 2, device, embeds.dtype)
    config = pipe.scheduler.config
    sigmas = np.linspace(1.0, 1 / steps, steps)
    if getattr(config, "use_flow_sigmas", False):
        sigmas = None
    mu = calculate_shift((h // 2) * (w // 2), config.get("base_image_seq_len", 256),
                         config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                         config.get("max_shift", 1.15))
    plan = plan_sampling(pipe.scheduler, steps, eta, flow=True, sigmas=sigmas, mu=mu)
    pipeline_class = type(pipe)
    scale = pipe.vae_scale_factor

    def pack(x):
        return pipeline_class._pack_latents(x, x.shape[0], x.shape[1], x.shape[2], x.shape[3])

    def unpack(out, shape):
        return pipeline_class._unpack_latents(out, shape[2] * scale, shape[3] * scale, scale)

    pos = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    denoiser = FluxDenoiser(transformer, plan, pos, neg, true_cfg, batch, pack=pack, unpack=unpack,
                            image_ids=image_ids, text_ids=text_ids, negative_text_ids=negative_text_ids,
                            guidance=guidance if transformer.config.guidance_embeds else None)
    decode = PipelineDecoder(pipe.vae, shift=pipe.vae.config.shift_factor)
    return PipelineParts("flux", denoiser, decode, plan, (batch, channels, h, w), device, embeds.dtype)
