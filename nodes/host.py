"""Plumbing between ComfyUI's objects and the host-agnostic DNO core.

Nothing here is an algorithm: it turns the host's guider, model sampling,
VAE and progress bar into the callables ``dno.optimize`` expects, and makes
the host's weights usable by autograd without damaging the host model.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.utils.checkpoint

import comfy.model_management
import comfy.model_sampling
import comfy.ops
import comfy.sampler_helpers
import comfy.samplers
from comfy.k_diffusion.sampling import default_noise_sampler

from ..dno import DNOError, StopOptimization
from ..dno.precision import autocast
from ..dno.recast_linear import RecastLinear
from ..dno.schedule import FLOW_RF, VP, NoiseSchedule, WrappedSchedule


def make_autograd_ready(module: torch.nn.Module) -> int:
    """Replace the module's inference tensors by ordinary tensors with the same values.

    ComfyUI runs nodes under ``torch.inference_mode()``, so weights loaded
    there are inference tensors, which autograd refuses to save for backward.
    Each one is swapped in place for a clone, one tensor at a time (peak memory
    grows by one tensor, not by a model). The values are identical and the
    tensors still work in inference mode, so later nodes, ModelPatcher's weight
    backups (which hold the *original* weights of patched keys) and LoRA
    patching behave exactly as before. Returns how many tensors were replaced.
    """
    replaced = 0
    with torch.inference_mode(False):
        for mod in module.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None and p.is_inference():
                    mod._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
                    replaced += 1
            for name, b in list(mod._buffers.items()):
                if b is not None and b.is_inference():
                    mod._buffers[name] = b.clone()
                    replaced += 1
    return replaced


def clone_inference_tensors(obj: Any, device: Optional[torch.device] = None) -> Any:
    """Clone inference tensors inside (nested) conditioning dicts/lists in place, and move them to
    ``device`` when given.

    ComfyUI keeps CONDITIONING on its intermediate device (the CPU) and copies the text
    embeddings to the GPU in every model call; on the device already, the call copies nothing,
    which a CUDA graph of the render needs (a copy from pageable host memory cannot be captured).
    """
    def ready(t: torch.Tensor) -> torch.Tensor:
        t = t.clone() if t.is_inference() else t
        return t if device is None or t.device == device else t.to(device)

    if isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = clone_inference_tensors(v, device)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            obj[i] = clone_inference_tensors(v, device)
    elif torch.is_tensor(obj):
        return ready(obj)
    elif hasattr(obj, "cond"):
        cond = getattr(obj, "cond")
        if torch.is_tensor(cond):
            obj.cond = ready(cond)
        elif isinstance(cond, list) and all(torch.is_tensor(c) for c in cond):
            obj.cond = [ready(c) for c in cond]
    return obj


def control_modules(conds: dict) -> list:
    """The torch modules of every ControlNet / T2I adapter the conditioning carries, chained
    ones (``previous_controlnet``) included: they run inside each model call, so autograd
    goes through them as through the UNet."""
    modules = {}
    for cond_list in (conds or {}).values():
        for control in comfy.sampler_helpers.get_models_from_cond(cond_list, "control"):
            while control is not None:
                for value in vars(control).values():
                    if isinstance(value, torch.nn.Module):
                        modules[id(value)] = value
                control = getattr(control, "previous_controlnet", None)
    return list(modules.values())


def schedule_for(model_sampling) -> NoiseSchedule:
    """The core schedule matching the host model's parameterisation."""
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        base = FLOW_RF      # ComfyUI's euler_ancestral on CONST models is euler_ancestral_RF
    elif isinstance(model_sampling, comfy.model_sampling.EPS) and not isinstance(
            model_sampling, getattr(comfy.model_sampling, "IMG_TO_IMG", ())):
        base = VP
    else:
        raise DNOError(f"DNO supports EPS, V-prediction and flow (CONST) models; this model samples "
                       f"with {type(model_sampling).__name__}, which is not supported")
    return HostSchedule(name=base.name, base=base, model_sampling=model_sampling)


@dataclass(frozen=True, eq=False)
class HostSchedule(WrappedSchedule):
    """The core's schedule, with the first and last latent built by the host's own code."""
    model_sampling: Any = None

    def start(self, sigma, x_T, latent, full_denoise):
        # torch.full, not torch.tensor: no host-to-device copy (the render is captured as a CUDA graph)
        s = torch.full((), float(sigma), device=x_T.device, dtype=x_T.dtype)
        latent = torch.zeros_like(x_T) if latent is None else latent
        return self.model_sampling.noise_scaling(s, x_T, latent, full_denoise)

    def finish(self, sigma, x):
        return self.model_sampling.inverse_noise_scaling(torch.full((), float(sigma), device=x.device,
                                                                    dtype=x.dtype), x)


def model_blocks(diffusion_model: torch.nn.Module) -> list:
    """The diffusion model's blocks, for block checkpointing in the lowest-memory mode: the
    layers of a UNet's input, middle and output blocks; a DiT's block lists (MMDiT, Flux, ...).

    A block is checkpointed by wrapping its ``forward``, so it must be called as a module. The
    ComfyUI UNet runs its ``TimestepEmbedSequential`` blocks through ``forward_timestep_embed``,
    which calls each layer inside but never the container's ``forward``: the layers are the
    blocks there.
    """
    blocks = []
    for name, child in diffusion_model.named_children():
        if isinstance(child, torch.nn.ModuleList):
            members = list(child)
        elif name == "middle_block":
            members = [child]
        else:
            continue
        for member in members:
            if isinstance(member, torch.nn.Sequential):
                blocks.extend(member.children())
            else:
                blocks.append(member)
    return blocks


def decoder_blocks(first_stage_model: torch.nn.Module) -> list:
    """The KL-VAE decoder's resnet/attention blocks and upsamplers (empty for other VAEs)."""
    decoder = getattr(first_stage_model, "decoder", None)
    blocks = []
    mid = getattr(decoder, "mid", None)
    if mid is not None:
        blocks.extend(mid.children())
    for level in getattr(decoder, "up", None) or []:
        blocks.extend(getattr(level, "block", []))
        blocks.extend(getattr(level, "attn", []))
        if hasattr(level, "upsample"):
            blocks.append(level.upsample)
    return blocks


class HostDenoiser:
    """``denoiser(x, sigma) -> x0`` over the host guider (CFG, patches, inpainting masks).

    It also checks the Cancel button between model calls, so a cancelled run
    stops within one model evaluation instead of one optimisation step.
    """

    def __init__(self, model_wrap, sigmas, extra_args, noise, latent_image, denoise_mask):
        diffusion_model = getattr(model_wrap.inner_model, "diffusion_model", None)
        self.checkpoint_segments = [] if diffusion_model is None else model_blocks(diffusion_model)
        self.model_k = comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)
        self.model_k.latent_image = latent_image
        self.model_k.noise = noise
        self.denoise_mask = denoise_mask
        self.model_options = extra_args.get("model_options", {})
        self.seed = extra_args.get("seed")

    def __call__(self, x, sigma):
        if comfy.model_management.processing_interrupted():
            comfy.model_management.interrupt_current_processing(False)
            raise StopOptimization("cancelled")
        return self.model_k(x, sigma, denoise_mask=self.denoise_mask, model_options=self.model_options,
                            seed=self.seed)


# The model_options key TorchCompileModel sets (comfy_api.torch_helpers.torch_compile); a copy,
# so that ComfyUI versions without comfy_api still load the node pack.
TORCH_COMPILE_KWARGS = "torch_compile_kwargs"


def uses_torch_compile(model_options: dict) -> bool:
    return TORCH_COMPILE_KWARGS in (model_options or {})


def settle_compiled_model(denoiser: HostDenoiser, x: torch.Tensor, sigma: float, precision: str) -> None:
    """One checkpointed model call, before DNO checkpoints any step, for a compiled model.

    Checkpointing recomputes a step in the backward pass and needs the same code
    to run as in its forward. While torch.compile is still compiling, it does
    not: once a function reaches dynamo's recompile limit mid-call it runs
    eagerly from then on, so a forward half compiled is recomputed eagerly and
    the saved tensors no longer match. One call made the way a checkpointed step
    makes it (grad mode, precision, checkpoint hooks) lets every function settle
    on compiled or eager for good, and keeps no activations.
    """
    with torch.enable_grad(), autocast(precision, x.device):
        torch.utils.checkpoint.checkpoint(denoiser, x, x.new_full((x.shape[0],), float(sigma)),
                                          use_reentrant=False)


def host_step_noises(x_T: torch.Tensor, sigmas, seed: Optional[int]) -> torch.Tensor:
    """Per-step noises drawn exactly as ComfyUI's ancestral samplers draw them.

    With these, DNO at 0 optimisation steps reproduces ``euler_ancestral`` of
    the same seed (the host's noise sampler draws once per step that ends
    above sigma 0, from a generator on the latent's device).
    """
    draw = default_noise_sampler(x_T, seed=seed)
    values = [float(s) for s in sigmas]
    steps = []
    for i in range(len(values) - 1):
        steps.append(draw(values[i], values[i + 1]) if values[i + 1] > 0 else torch.zeros_like(x_T))
    return torch.stack(steps)


def vae_decoder(vae, process_latent_out):
    """Differentiable ``latent (sampler space) -> image in [0, 1], (B, 3, H, W)``.

    ``comfy.sd.VAE.decode`` writes into a preallocated buffer and may fall back
    to a tiled decode under inference mode; the gradient needs the first-stage
    model called directly, then the VAE's own output processing.
    """
    def decode(latent: torch.Tensor) -> torch.Tensor:
        z = process_latent_out(latent).to(vae.device, vae.vae_dtype)
        image = vae.process_output(vae.first_stage_model.decode(z).float())
        if image.dim() == 5 and image.shape[2] == 1:     # a video VAE's one frame (Qwen-Image)
            image = image[:, :, 0]
        if image.dim() != 4:
            raise DNOError(f"the VAE decoded a {image.dim()}-D tensor; DNO supports image VAEs (4-D output)")
        return image
    decode.checkpoint_segments = decoder_blocks(vae.first_stage_model)
    return decode


def _casts_for_a_call() -> bool:
    """This host's ``cast_bias_weight`` takes a dtype and device without the input, and hands
    back its offload stream (ComfyUI 0.3.6x and later)."""
    try:
        parameters = inspect.signature(comfy.ops.cast_bias_weight).parameters
    except (TypeError, ValueError):
        return False
    return {"dtype", "device", "offloadable"} <= set(parameters) and hasattr(comfy.ops, "uncast_bias_weight")


def _recasting_forward(module: torch.nn.Linear, stock):
    def forward(input, *args, **kwargs):
        if (args or kwargs or type(input) is not torch.Tensor or torch.compiler.is_compiling()
                or not (torch.is_grad_enabled() and input.requires_grad)):
            return stock(input, *args, **kwargs)
        dtype, device = input.dtype, input.device     # not the input itself: the backward keeps no input

        def cast():
            weight, bias, stream = comfy.ops.cast_bias_weight(module, dtype=dtype, device=device, bias_dtype=dtype,
                                                              offloadable=True)
            return weight, bias, lambda: comfy.ops.uncast_bias_weight(module, weight, bias, stream)
        return RecastLinear.apply(input, cast)
    return forward


@contextlib.contextmanager
def linear_weights_recast_in_backward(modules: Iterable[torch.nn.Module]) -> Iterator[int]:
    """While active, those of ``modules`` that are the host's Linear layers making their weight per
    call (fp8 storage, weights streamed by a partial load, LoRAs applied on the fly) cast it again
    in the backward pass instead of keeping the copy (dno/recast_linear.py). Restored afterwards.
    Yields the count."""
    patched = []
    try:
        if _casts_for_a_call():
            for module in modules:
                if (isinstance(module, torch.nn.Linear) and hasattr(module, "forward_comfy_cast_weights")
                        and "forward_comfy_cast_weights" not in vars(module)):
                    module.forward_comfy_cast_weights = _recasting_forward(module, module.forward_comfy_cast_weights)
                    patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward_comfy_cast_weights
