"""A ComfyUI ``Sampler`` that runs DNO inside the host's guider.

``guider.sample`` hands every sampler the guider itself (CFG, model patches,
conditioning), the sigmas, the unit noise and the starting latent; this
sampler builds the core's callables from them and returns the best latent.
It works with ``SamplerCustomAdvanced`` and any GUIDER / SIGMAS, and is what
the all-in-one DNO KSampler node drives as well.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import os
from dataclasses import dataclass
from typing import List, Optional

import torch

import comfy.model_management
import comfy.samplers

from ..dno import DNOConfig, DNOError, DNONoise, DNOResult, ProbabilityRegularizer, StopOptimization, optimize
from ..dno.frozen import noise_only_backward
from ..dno.layout import CONV_SHARE_FOR_CHANNELS_LAST, channels_last_weights, conv_weight_share
from ..dno.precision import AUTO, resolve_precision
from ..dno.residuals import functional_residuals
from .history import history_json
from .host import (clone_inference_tensors, control_modules, host_step_noises, linear_weights_recast_in_backward,
                   make_autograd_ready, schedule_for, settle_compiled_model, uses_torch_compile, vae_decoder)
from .memory import (auto_budget_bytes, load_run_models, managed_rewards, plain_sampling_minimum,
                     reward_dtype, working_set_bytes)
from .progress import RunReporter, WatchedDenoiser

log = logging.getLogger("DNO")


@dataclass
class DNORunSettings:
    reward: object
    vae: object
    config: DNOConfig
    eta: float = 1.0
    regularizer: Optional[ProbabilityRegularizer] = None
    prompts: Optional[List[str]] = None
    preview_every: int = 1
    node_id: Optional[str] = None

    def validate(self) -> None:
        if self.vae is None:
            raise DNOError("DNO needs a VAE to turn latents into images for the reward: connect a VAE")
        if self.reward is None:
            raise DNOError("DNO needs a reward: connect a DNO reward node")


class OptimizedNoise:
    """The optimised x_T as a ComfyUI ``NOISE``, reusable by other samplers.

    Other samplers draw their own per-step noises, so an ODE run is reproduced
    exactly and an SDE run starts from the same x_T.
    """

    def __init__(self, x_T: torch.Tensor, seed: int):
        self.x_T = x_T.detach().cpu().float()
        self.seed = seed

    def generate_noise(self, input_latent):
        latent = input_latent["samples"]
        if tuple(latent.shape) != tuple(self.x_T.shape):
            raise DNOError(f"the optimised noise has shape {tuple(self.x_T.shape)} but the latent is "
                           f"{tuple(latent.shape)}; use a latent of the size DNO optimised")
        return self.x_T.clone().to(latent.dtype)


class DNOHostSampler(comfy.samplers.Sampler):
    """``history``: where each finished run leaves its reward history, keyed by the latent the
    guider hands back (the DNO Sampler node's DNO_HISTORY output); None for the DNO KSampler,
    which returns the history itself. ``keep_result``: keep the run's DNOResult (best latent,
    image and noise, on the device) in ``self.result`` for the caller. The DNO Sampler node's
    SAMPLER stays in ComfyUI's output cache after its run, so it keeps nothing: its latent has
    been handed downstream."""

    def __init__(self, settings: DNORunSettings, history=None, keep_result: bool = False):
        self.settings = settings
        self.history = history
        self.keep_result = keep_result
        self.result: Optional[DNOResult] = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None,
               denoise_mask=None, disable_pbar=False):
        s = self.settings
        s.validate()
        if len(sigmas) < 2:
            raise DNOError("DNO needs at least one sampling step (sigmas has fewer than 2 values)")
        base_model = model_wrap.inner_model
        check_latent_channels(noise.shape, base_model.latent_format.latent_channels)
        schedule = schedule_for(base_model.model_sampling)
        log.info("DNO: %d updates over %d sampling steps, %s", s.config.steps, len(sigmas) - 1,
                 "SDE" if s.eta > 0 else "ODE")
        reporter = RunReporter(s.node_id, s.config.steps, s.preview_every)
        result = None
        compiled = uses_torch_compile(extra_args.get("model_options"))
        try:
            with torch.inference_mode(False), torch.enable_grad():
                device = noise.device
                conds = clone_inference_tensors(getattr(model_wrap, "conds", {}), device)
                controls = control_modules(conds)
                config = sampler_config(precision_config(s.config, base_model, device), base_model)
                self._load_models(model_wrap, conds, noise.shape, len(sigmas) - 1, config)
                for module in (base_model, *controls, s.vae.first_stage_model):
                    make_autograd_ready(module)
                self._move_reward(device, reward_dtype(config.precision, device))
                # after the load: ComfyUI may have loaded the UNet partially (no CUDA graphs then)
                config = graph_config(config, base_model)
                if config.memory_budget_gb is None:
                    config = dataclasses.replace(config, auto_budget_bytes=auto_budget_bytes(device))
                x_T = noise.clone().float()
                latent = latent_image.clone().float() if latent_image is not None else torch.zeros_like(x_T)
                sig = sigmas.clone().float()
                mask = None if denoise_mask is None else denoise_mask.clone()
                steps = host_step_noises(x_T, sig, extra_args.get("seed")) if s.eta > 0 else None
                denoiser = WatchedDenoiser(reporter, model_wrap, sig, extra_args, x_T, latent, mask)
                decode = vae_decoder(s.vae, base_model.process_latent_out)
                modules = model_modules(base_model, controls)
                # no weight gradients: half the backward FLOPs, none of the stored layer inputs
                # (convolutions included, which autograd would otherwise keep regardless)
                with noise_only_backward((base_model, *controls, s.vae.first_stage_model, s.reward)), \
                        functional_residuals(modules), linear_weights_recast_in_backward(modules), \
                        channels_last_weights((base_model, *controls, s.vae.first_stage_model),
                                              enabled=channels_last_wanted(x_T.device, base_model.diffusion_model)):
                    if compiled:
                        settle_compiled_model(denoiser, x_T * sig[0], sig[0], config.sampler_precision)
                    result = optimize(denoiser, sig, s.reward, decode, DNONoise(x_T, steps), schedule,
                                      eta=s.eta, prompts=s.prompts, latent=latent,
                                      full_denoise=self.max_denoise(model_wrap, sigmas), config=config,
                                      regularizer=s.regularizer, callback=reporter)
        except StopOptimization:
            # Cancel seen before the first sample was scored (while the memory plan measured a
            # step, a compiled model settled, or the first render ran): nothing to hand on, so
            # the prompt ends as ComfyUI's own Cancel ends it.
            raise comfy.model_management.InterruptProcessingException() from None
        except comfy.model_management.InterruptProcessingException as error:
            # Cancel ends the optimisation, not the graph: ComfyUI's layers raise
            # this mid-forward; the best latent so far is the node's output and
            # downstream nodes (decode, save) still run.
            result = getattr(error, "dno_result", None)
            if result is None:
                raise
            result.stop_reason = f"cancelled by the user after {len(result.history)} scored samples"
        except DNOError as error:
            result = error.result
            raise DNOError(f"DNO: {error}", result) from None
        except RuntimeError as error:       # OOM, a checkpoint mismatch, an inference tensor
            result = getattr(error, "dno_result", None)
            message = explain_failure(error, compiled)
            if message is None:
                raise
            raise DNOError(message, result) from error
        finally:
            self.result = result if self.keep_result else None
            reporter.finish(result)
            if result is not None:
                log.info("DNO finished: %s; reward %.4f -> %.4f", result.stop_reason,
                         result.initial_reward.mean().item(), result.best_reward.mean().item())
            gc.collect()
            comfy.model_management.soft_empty_cache()
        if callback is not None:
            callback(len(sigmas) - 2, result.latent, result.latent, len(sigmas) - 1)
        samples = result.latent.to(noise.dtype)
        if self.history is not None:
            # keyed by the latent as the guider returns it (CFGGuider.inner_sample), so DNO Reward
            # History finds this run from SamplerCustomAdvanced's output
            self.history.record(base_model.process_latent_out(samples.to(torch.float32)), history_json(result))
        return samples

    def _load_models(self, model_wrap, conds, shape, steps: int, config: DNOConfig) -> None:
        """UNet, ControlNets (and the other models the guider loaded) and VAE in one
        ``load_models_gpu`` with the run's working set and the reward models' weights declared
        (nodes/memory.py). The reward models, cast to the run's dtype first, are loaded next in
        full (``_move_reward``): plain torch modules cannot be loaded partially."""
        s = self.settings
        device = torch.device(model_wrap.model_patcher.load_device)
        rewards = managed_rewards(s.reward)
        for part in rewards:
            part.cast(reward_dtype(config.precision, device))
        patchers = [model_wrap.model_patcher, *getattr(model_wrap, "loaded_models", []), s.vae.patcher]
        reward_weights = sum(part.patcher.model_size() for part in rewards)
        weights = sum(p.model_size() for p in patchers) + reward_weights
        base_model = model_wrap.inner_model
        working = working_set_bytes(config, s.reward, base_model, s.vae, shape, steps, weights)
        load_run_models(patchers, working + reward_weights,
                        plain_sampling_minimum(base_model, conds, shape) + reward_weights)

    def _move_reward(self, device, dtype: torch.dtype) -> None:
        reward = self.settings.reward
        prepare = getattr(reward, "prepare", None)
        if callable(prepare):
            prepare(device, dtype)
        elif isinstance(reward, torch.nn.Module):
            reward.to(device)


def model_modules(base_model, controls) -> list:
    """Every module of the diffusion model and its ControlNets: where host layers may add
    residuals in place (ComfyUI's Flux blocks, made out-of-place by dno/residuals.py) or cast
    their weights per call (fp8, partial loads: cast again in backward, nodes/host.py)."""
    return [m for root in (base_model.diffusion_model, *controls) for m in root.modules()]


def explain_failure(error: RuntimeError, compiled: bool) -> Optional[str]:
    """The node error for a torch failure with a known cause and fix, or None."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return ("DNO ran out of GPU memory. To fit: set memory_mode to 'lowest memory' (recomputes the "
                "model's blocks), or lower memory_budget_gb (the auto mode then stores fewer steps); lower "
                "the resolution or the batch size of latent_image; use precision bf16/fp16; or shorten "
                "opt_window")
    if isinstance(error, torch.utils.checkpoint.CheckpointError) and compiled:
        return ("DNO: a checkpointed sampling step recomputed differently from its forward pass because "
                "torch.compile (TorchCompileModel) changed the compiled code in between. Set memory_mode "
                "to 'fastest (store every step)', or remove TorchCompileModel before the DNO node")
    if "Inference tensors cannot be saved for backward" in str(error):
        # DNO readies the UNet, the VAE, ControlNets / T2I adapters and the conditioning; a
        # model patch from another node pack (e.g. an IP-Adapter) may hold weights it cannot see.
        return ("DNO: a module in this model's patches was loaded under inference mode and cannot be "
                "differentiated. DNO handles the checkpoint's UNet (with LoRAs), the VAE, ControlNets / "
                "T2I adapters and the conditioning; remove other model patches (e.g. an IP-Adapter) "
                "from the MODEL that DNO samples")
    return None


def check_latent_channels(shape, channels: int) -> None:
    """The latent fits the model (``latent_image`` of either DNO node), else a DNOError naming it.

    An image latent is (B, C, H, W); models with a video VAE that make images (Qwen-Image) use
    (B, C, 1, H, W), one frame. More frames are a video, which DNO does not optimise."""
    if len(shape) == 5 and shape[1] == channels and shape[2] != 1:
        raise DNOError(f"the latent (latent_image) has {shape[2]} frames (shape {tuple(shape)}): DNO optimises "
                       "images; use a latent of one frame (length 1)")
    if len(shape) not in (4, 5) or shape[1] != channels:
        raise DNOError(f"the latent (latent_image) has shape {tuple(shape)} but this model works on "
                       f"{channels}-channel image latents: use a latent made for this model "
                       "(e.g. EmptyLatentImage, or VAEEncode with this model's VAE)")


def graph_config(config: DNOConfig, base_model) -> DNOConfig:
    """CUDA graphs off where the host moves weights in every call (ComfyUI's low-VRAM partial
    load), or where the user says so with DNO_CUDA_GRAPHS=0."""
    reason = None
    if os.environ.get("DNO_CUDA_GRAPHS", "1").strip() in ("0", "false", "off"):
        reason = "DNO_CUDA_GRAPHS=0"
    elif getattr(base_model, "model_lowvram", False):
        reason = "ComfyUI loaded the model partially (low VRAM), so its weights move in every call"
    if not config.cuda_graphs or reason is None:
        return config
    log.info("DNO: CUDA graphs off for this run: %s", reason)
    return dataclasses.replace(config, cuda_graphs=False)


def channels_last_wanted(device, diffusion_model: Optional[torch.nn.Module] = None) -> bool:
    """Convolution weights channels-last for the run: on CUDA, for a model whose weights are
    mostly convolutions (dno/layout.py: SD1.5-class UNets; not SDXL, DiTs). DNO_CHANNELS_LAST=1
    or 0 decides instead."""
    if torch.device(device).type != "cuda":
        return False
    wanted = os.environ.get("DNO_CHANNELS_LAST", "").strip().lower()
    if wanted in ("0", "false", "off", "1", "true", "on"):
        return wanted in ("1", "true", "on")
    return diffusion_model is not None and conv_weight_share(diffusion_model) >= CONV_SHARE_FOR_CHANNELS_LAST


def compute_dtype(base_model) -> torch.dtype:
    """The dtype the host model computes in: its manual-cast dtype, else its weights' dtype."""
    return getattr(base_model, "manual_cast_dtype", None) or base_model.get_dtype()


def precision_config(config: DNOConfig, base_model, device) -> DNOConfig:
    """The run's config with precision "auto" resolved: fp32 on a CPU, on a GPU the dtype the
    host model computes in (its manual-cast dtype, else its weights' dtype)."""
    if config.precision != AUTO:
        return config
    computes = compute_dtype(base_model)
    precision = resolve_precision(AUTO, device, computes)
    log.info("DNO: precision auto -> %s (%s, model computes in %s)", precision, torch.device(device).type,
             str(computes).replace("torch.", ""))
    return dataclasses.replace(config, precision=precision)


def sampler_config(config: DNOConfig, base_model) -> DNOConfig:
    """The run's config with autocast off for the sampler when the host model already computes
    in the requested low precision (its weights' dtype, or its manual-cast dtype): ComfyUI then
    runs it as in plain generation, and autocast would only add fp32 upcasts."""
    wanted = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
    computes = compute_dtype(base_model)
    if wanted is None or computes != wanted:
        return config
    return dataclasses.replace(config, autocast_sampler=False)


def run_ksampler(model, positive, negative, latent, settings: DNORunSettings, seed: int, steps: int,
                 cfg: float, scheduler: str, denoise: float):
    """What ``KSampler`` does (noise from the seed, sigmas from the scheduler, CFG guider),
    with the DNO sampler in place of the host's. Returns (latent dict, sampler)."""
    import comfy.sample
    if steps < 1:
        raise DNOError(f"steps must be at least 1, got {steps}")
    samples = latent["samples"]
    channels = model.get_model_object("latent_format").latent_channels
    samples = comfy.sample.fix_empty_latent_channels(model, samples)
    check_latent_channels(samples.shape, channels)
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    ksampler = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, scheduler=scheduler,
                                       denoise=denoise, model_options=model.model_options)
    sigmas = ksampler.sigmas
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    sampler = DNOHostSampler(settings, keep_result=True)
    out = guider.sample(noise, samples, sampler, sigmas, denoise_mask=latent.get("noise_mask"),
                        seed=seed)
    result = dict(latent)     # as KSampler: the rest of the LATENT (noise_mask, batch_index) passes on
    result["samples"] = out.to(comfy.model_management.intermediate_device())
    return result, sampler
