"""The DNO optimisation loop: gradient ascent on the noise.

Each iteration samples the image from the current noise (a graph through the
sampler and decoder, checkpointed per step), scores it, records the best
sample so far *per image*, reports to the caller, and takes one Adam step on
``-reward + gamma * regulariser``. The run ends after ``steps`` updates, on
the time budget, on the target reward, on a non-finite value, when the GPU
runs out of memory after a first sample, or when the callback raises; in
every case the best result found so far is kept.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from .checkpointing import checkpoint as _checkpoint, checkpointed_blocks, segments_of
from .errors import DNOError, StopOptimization
from .frozen import noise_only_backward
from .gradients import EstimatorShare, hybrid_gradient, zeroth_order_gradient
from .graphed import make_render
from .memory import (DEFAULT_STORED_BYTES, GIB, MemoryPlan, activation_cost, default_budget_bytes,
                     measure_within,
                     plan_stored_steps)
from .noise import DNONoise, TrainableNoise
from .precision import AUTO, autocast, check_precision, grad_scaler, module_dtype, resolve_precision
from .regularizer import ProbabilityRegularizer, RegularizerTerms
from .sampling import Denoiser, as_sigma_list, denoise_step, sample, step_uses_noise
from .schedule import VP, NoiseSchedule, get_schedule

log = logging.getLogger("DNO")

METHODS = ("auto", "autograd", "hybrid", "zeroth_order")
CHECKPOINT_MODES = ("auto", "blocks")


@dataclass
class DNOConfig:
    steps: int = 20                       # optimisation updates (the run scores steps + 1 samples)
    lr: float = 0.01
    method: str = "auto"                  # auto: autograd if the reward is differentiable, else hybrid
    precision: str = "fp32"               # fp32 | bf16 | fp16 (fp16 uses a grad scaler) | auto (resolve_precision)
    max_grad_norm: Optional[float] = 1.0  # per-sample gradient-norm clipping; None = off
    weight_decay: float = 0.0
    time_budget: Optional[float] = None   # seconds; the run stops before exceeding it
    target_reward: Optional[float] = None # stop once every sample reached it
    # The paper's opt_time K: the K noises that enter the last K denoiser calls (see sampling.sample);
    # None or 0 = every step and x_T.
    window: Optional[int] = None
    # How the exact-gradient pass trades memory for time: True recomputes every step, False stores
    # all, n stores n steps, "auto" stores as many as memory_budget_gb allows (all of them when
    # the card has room, block checkpointing when not even per-step recomputation fits),
    # "blocks" recomputes every step and checkpoints the model's blocks inside it (least memory).
    checkpoint: Union[bool, int, str] = "auto"
    memory_budget_gb: Optional[float] = None  # "auto": cap on allocated GPU memory; None = what is free
    # What "is free" means when memory_budget_gb is None, in bytes: a host's own view of free
    # memory (ComfyUI's, see memory.budget_from_free); None = the allocator's (default_budget_bytes).
    auto_budget_bytes: Optional[int] = None
    # Run the denoiser and decoder under autocast. A host whose model already computes in bf16/fp16
    # (ComfyUI) turns it off: autocast would upcast its norms and softmax to fp32 (slower, more
    # memory). The reward always runs under autocast.
    autocast_sampler: bool = True
    mu: float = 0.01                      # perturbation scale of the zeroth-order / hybrid estimators
    q: int = 16                           # perturbed samples per image per step
    estimator_batch: int = 4              # perturbed copies of the batch rendered at once
    seed: int = 0                         # seed of the perturbations
    # Replay the differentiable render (sampler + decoder, forward and backward) as CUDA graphs
    # after the first update, on CUDA devices (see graphed.py); it falls back to eager by itself
    # wherever capture is impossible. False always runs eagerly.
    cuda_graphs: bool = True

    @property
    def sampler_precision(self) -> str:
        """Autocast precision of the denoiser and decoder (the reward always uses ``precision``)."""
        return self.precision if self.autocast_sampler else "fp32"

    def validate(self) -> None:
        if int(self.steps) < 0:
            raise DNOError(f"steps must be >= 0, got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise DNOError(f"lr must be a positive number, got {self.lr}")
        if self.method not in METHODS:
            raise DNOError(f"method must be one of {METHODS}, got {self.method!r}")
        check_precision(self.precision)
        if self.q < 1 or self.estimator_batch < 1 or not self.mu > 0:
            raise DNOError(f"the estimator needs q >= 1, estimator_batch >= 1 and mu > 0 "
                           f"(got q={self.q}, estimator_batch={self.estimator_batch}, mu={self.mu})")
        if not (isinstance(self.checkpoint, (bool, int)) or self.checkpoint in CHECKPOINT_MODES) or \
                (not isinstance(self.checkpoint, (bool, str)) and self.checkpoint < 0):
            raise DNOError(f"checkpoint must be True, False, a number of stored steps >= 0, 'auto' or "
                           f"'blocks', got {self.checkpoint!r}")
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise DNOError(f"memory_budget_gb must be positive GiB or None (use what is free), "
                           f"got {self.memory_budget_gb}")
        if self.auto_budget_bytes is not None and self.auto_budget_bytes < 0:
            raise DNOError(f"auto_budget_bytes must be >= 0 or None, got {self.auto_budget_bytes}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise DNOError(f"time_budget must be positive seconds or None, got {self.time_budget}")


@dataclass
class StepInfo:
    """What the callback sees after each scored sample."""
    step: int                       # 0 = the unoptimised sample
    total_steps: int
    reward: torch.Tensor            # (B,) reward of this step's sample
    best_reward: torch.Tensor       # (B,)
    regularizer: Optional[RegularizerTerms]
    latent: torch.Tensor            # this step's final latent (detached)
    image: torch.Tensor             # this step's decoded image in [0, 1] (detached)
    noise: DNONoise                 # this step's noise (detached)
    elapsed: float


@dataclass
class StepRecord:
    step: int
    reward: List[float]
    regularizer: Optional[List[float]]
    probability: Optional[List[float]]
    elapsed: float


@dataclass
class DNOResult:
    latent: torch.Tensor            # best latent per sample
    image: torch.Tensor             # its decoded image
    noise: DNONoise                 # the noise that produced it
    best_reward: torch.Tensor
    initial_reward: torch.Tensor
    best_step: torch.Tensor
    history: List[StepRecord] = field(default_factory=list)
    stop_reason: str = "completed"
    rendered: int = 0               # images rendered in total (for equal-budget comparisons)
    memory_plan: Optional[MemoryPlan] = None  # what checkpoint="auto" chose
    render_info: dict = field(default_factory=dict)  # CUDA graphs or eager, and why (graphed.py)


def reward_name(reward) -> str:
    return getattr(reward, "name", type(reward).__name__)


def resolve_method(method: str, reward) -> str:
    differentiable = getattr(reward, "differentiable", True)
    if method == "auto":
        return "autograd" if differentiable else "hybrid"
    if method == "autograd" and not differentiable:
        raise DNOError(f"reward {reward_name(reward)!r} is not differentiable; use method='hybrid' or "
                       "'zeroth_order'")
    return method


def checked_reward(reward, images: torch.Tensor, prompts, batch: int) -> torch.Tensor:
    """Call the reward and insist on one score per image."""
    name = reward_name(reward)
    try:
        value = reward(images, prompts)
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as error:
        # Typically a reward model left on another device or in another dtype.
        raise DNOError(f"reward {name!r} failed on a {tuple(images.shape)} {images.dtype} image batch "
                       f"on {images.device}: {error}. Put the reward on the sampling device and make "
                       "sure it accepts float images in [0, 1]") from error
    if not torch.is_tensor(value):
        raise DNOError(f"reward {name!r} returned {type(value).__name__}, expected a tensor of shape ({batch},)")
    if value.dim() == 2 and value.shape[1] == 1:
        value = value[:, 0]
    if tuple(value.shape) != (batch,):
        raise DNOError(f"reward {name!r} returned shape {tuple(value.shape)}, expected ({batch},): "
                       "one score per image")
    return value.float()


def tile_prompts(prompts: Optional[Sequence[str]], times: int):
    if prompts is None or len(prompts) <= 1 or times == 1:
        return prompts
    return list(prompts) * times


def optimize(denoiser: Denoiser, sigmas, reward, decode: Callable[[torch.Tensor], torch.Tensor],
             noise: DNONoise, schedule: Union[NoiseSchedule, str] = VP, eta: float = 1.0,
             prompts: Optional[Sequence[str]] = None, latent: Optional[torch.Tensor] = None,
             full_denoise: bool = True, config: Optional[DNOConfig] = None,
             regularizer: Optional[ProbabilityRegularizer] = None,
             callback: Optional[Callable[[StepInfo], None]] = None,
             estimator_share: Optional[EstimatorShare] = None) -> DNOResult:
    """Optimise ``noise`` to maximise ``reward(decode(sample(noise)))``; see the module doc.

    ``estimator_share``: this process's part of the hybrid / zeroth-order renders when several
    processes run the same optimisation (``dno.distributed``); None renders all of them here.

    The pieces, each on its own below: :func:`prepare_config`, :func:`trainable_noise`,
    :func:`memory_mode` (the plan), :class:`Render` (what one sample costs), the loop with
    :func:`estimate_gradient` and :func:`update` (one update), :func:`stop_reason` (stopping),
    :class:`Best` (what is kept).
    """
    config = prepare_config(config, noise, denoiser)
    schedule = get_schedule(schedule)
    sig = as_sigma_list(sigmas)
    noise.validate(len(sig) - 1, eta)
    if latent is not None and tuple(latent.shape) != tuple(noise.x_T.shape):
        raise DNOError(f"latent shape {tuple(latent.shape)} does not match the noise shape "
                       f"{tuple(noise.x_T.shape)}")
    window = checked_window(config, len(sig) - 1)
    method = resolve_method(config.method, reward)
    params = trainable_noise(noise, schedule, sig, eta, window)
    mode = memory_mode(config, method, denoiser, decode, schedule, eta, sig, window, noise, latent,
                       full_denoise, params.leaves)
    # graphs for the methods whose render records a graph (the estimators' renders record none)
    render = Render(denoiser, decode, sig, schedule, eta, latent, full_denoise, window, mode, params, config,
                    noise.batch_size, noise.x_T.device, config.cuda_graphs and method in ("autograd", "hybrid"))
    scorer = Scorer(reward, prompts, noise.batch_size)
    return run_updates(render, scorer, params, method, config, regularizer, callback,
                       (denoiser, decode, reward), estimator_share)


def prepare_config(config: Optional[DNOConfig], noise: DNONoise, denoiser) -> DNOConfig:
    """The run's validated config, precision "auto" resolved: fp32 on a CPU, the denoiser's
    dtype on a GPU."""
    config = config or DNOConfig()
    config.validate()
    if config.precision == AUTO:
        config = dataclasses.replace(config, precision=resolve_precision(
            AUTO, noise.x_T.device, module_dtype(denoiser)))
    return config


def checked_window(config: DNOConfig, n: int) -> int:
    """``config.window`` = K (the paper's opt_time) as a number of steps: every step for 0/None."""
    window = n if not config.window else int(config.window)
    if not 1 <= window <= n:
        raise DNOError(f"opt_window must be 0 (every step and x_T) or between 1 and the number of sampling "
                       f"steps ({n}), got {window}")
    return window


def trainable_noise(noise: DNONoise, schedule: NoiseSchedule, sig: List[float], eta: float,
                    window: int) -> TrainableNoise:
    """The noises ``window`` reaches, as the optimiser's leaves; an error where it reaches none."""
    n = len(sig) - 1
    steps_in_window, optimize_x_T = optimized_noises(schedule, sig, eta, window, noise.steps is not None)
    if not steps_in_window and not optimize_x_T:
        if eta == 0 or noise.steps is None:
            raise DNOError(f"opt_window={window} with sampler_mode ODE (eta=0) optimises nothing: an ODE "
                           f"sampler injects no noise after x_T, and x_T is optimised only when opt_window "
                           f"covers every sampling step (0 or {n}); set opt_window=0 or sampler_mode SDE")
        raise DNOError(f"opt_window={window} optimises nothing: none of the last {window + 1} sampling steps "
                       f"injects noise at eta={eta}; widen opt_window (0 = every step and x_T)")
    return TrainableNoise(noise, steps_in_window, optimize_x_T=optimize_x_T)


@dataclass
class MemoryMode:
    """How the exact-gradient render trades memory for time (DNOConfig.checkpoint resolved)."""
    keep: Union[bool, int]      # sampling.sample's checkpoint: True recompute all, False store all, n
    blocks: bool                # also checkpoint the model's blocks inside recomputed steps
    store_decode: bool          # keep the decode's activations instead of recomputing it
    plan: Optional[MemoryPlan]  # what checkpoint="auto" measured and chose


def memory_mode(config: DNOConfig, method: str, denoiser, decode, schedule, eta: float, sig: List[float],
                window: int, noise: DNONoise, latent, full_denoise: bool,
                trainable: List[torch.Tensor]) -> MemoryMode:
    keep, blocks, store_decode, plan = config.checkpoint, False, config.checkpoint is False, None
    if keep == "blocks":
        keep, blocks = True, True
    elif keep == "auto":
        keep = True
        if method in ("autograd", "hybrid"):
            plan = _plan_memory(config, denoiser, decode, schedule, eta, sig, window, noise, latent,
                                full_denoise, trainable)
        if plan is not None:
            keep, blocks = plan.stored_steps, plan.block_checkpointing
            store_decode = plan.stored_steps >= window and not blocks
    return MemoryMode(keep, blocks, store_decode, plan)


class Render:
    """Noise -> (final latent, image): the sampler and the decoder with the run's memory mode
    and precision; ``renderer`` replays the graph-recording render as CUDA graphs where it can."""

    def __init__(self, denoiser, decode, sig: List[float], schedule: NoiseSchedule, eta: float,
                 latent: Optional[torch.Tensor], full_denoise: bool, window: int, mode: MemoryMode,
                 params: TrainableNoise, config: DNOConfig, batch: int, device: torch.device,
                 cuda_graphs: bool):
        self.denoiser, self.decode, self.sig, self.schedule, self.eta = denoiser, decode, sig, schedule, eta
        self.latent, self.full_denoise, self.window, self.mode = latent, full_denoise, window, mode
        self.params, self.config, self.batch, self.device = params, config, batch, device
        self.segments = (segments_of(denoiser) + segments_of(decode)) if mode.blocks else []
        self.renderer = make_render(self.current, params.leaves, device, cuda_graphs)

    def __call__(self, noise: DNONoise, graph: bool = False) -> tuple:
        times = noise.batch_size // self.batch
        start = self.latent
        if start is not None and times > 1:
            start = start.repeat(times, *([1] * (start.dim() - 1)))
        out = sample(self.denoiser, noise, self.sig, self.schedule, self.eta, start, self.full_denoise,
                     self.window, self.mode.keep)
        image = _checkpoint(self.decode, out) if graph and not self.mode.store_decode else self.decode(out)
        return out, image

    def current(self) -> tuple:
        """What the render (eager or replayed as CUDA graphs) computes from the trainable leaves."""
        with autocast(self.config.sampler_precision, self.device):
            return self(self.params.assemble(), graph=torch.is_grad_enabled())

    def image_only(self, noise: DNONoise) -> torch.Tensor:
        """A perturbed sample's image, without a graph (the estimators' renders)."""
        with autocast(self.config.sampler_precision, self.device):
            return self(noise)[1]


class Scorer:
    """The reward of a batch of images (the batch tiled for the estimators), one score each."""

    def __init__(self, reward, prompts: Optional[Sequence[str]], batch: int):
        self.reward, self.prompts, self.batch = reward, prompts, batch

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        times = images.shape[0] // self.batch
        return checked_reward(self.reward, images, tile_prompts(self.prompts, times), images.shape[0])


class Best:
    """The best sample so far per image, and the run's result from it."""

    def __init__(self):
        self.kept = {}

    def __bool__(self) -> bool:
        return bool(self.kept)

    def update(self, step: int, reward: torch.Tensor, latent: torch.Tensor, image: torch.Tensor,
               noise: DNONoise) -> None:
        """Keep this sample for the images where its reward beats the best so far."""
        best = self.kept
        if not best:
            best.update(reward=reward.clone(), initial=reward.clone(), latent=latent.clone(),
                        image=image.clone(), noise=noise.clone(),
                        step=torch.zeros_like(reward, dtype=torch.long))
            return
        better = reward > best["reward"]
        view = lambda t: better.view((-1,) + (1,) * (t.dim() - 1))
        best["reward"] = torch.where(better, reward, best["reward"])
        best["latent"] = torch.where(view(latent), latent, best["latent"])
        best["image"] = torch.where(view(image), image, best["image"])
        best["noise"] = noise.select(better, best["noise"])
        best["step"] = torch.where(better, torch.full_like(best["step"], step), best["step"])

    @property
    def reward(self) -> torch.Tensor:
        return self.kept["reward"]

    def result(self, history: List[StepRecord], stop: str, rendered: int, render: Render) -> Optional[DNOResult]:
        b = self.kept
        if not b:
            return None
        return DNOResult(b["latent"], b["image"], b["noise"], b["reward"], b["initial"], b["step"], history,
                         stop, rendered, render.mode.plan, dict(render.renderer.info))


def stop_reason(config: DNOConfig, step: int, best: Best, history: List[StepRecord],
                started: float) -> Optional[str]:
    """Why the run stops after scoring sample ``step`` (before its update), or None to go on."""
    if config.target_reward is not None and bool((best.reward >= config.target_reward).all()):
        return f"target reward {config.target_reward} reached at step {step}"
    elapsed = time.perf_counter() - started
    if config.time_budget is not None and elapsed + _next_iteration_estimate(history) > config.time_budget:
        return f"time budget of {config.time_budget}s reached after {step} updates"
    return None


def estimate_gradient(method: str, render: Render, scorer: Scorer, params: TrainableNoise,
                      image: torch.Tensor, image_leaf: torch.Tensor, value: torch.Tensor,
                      reward_now: torch.Tensor, config: DNOConfig, generator: torch.Generator, scaled,
                      share: Optional[EstimatorShare] = None):
    """The reward's gradient for this update: ``(grad_image, estimate, renders)``.

    ``grad_image`` is d(-reward)/d(image), scaled for fp16, for the render's backward (autograd:
    through the reward; hybrid: the zeroth-order estimate in image space); ``estimate`` is
    zeroth-order's estimate per noise leaf. ``renders`` counts the perturbed images rendered.
    """
    if method == "autograd":
        return torch.autograd.grad(scaled(-value.sum()), image_leaf)[0], None, 0
    if method == "hybrid":
        g, count = hybrid_gradient(render.image_only, scorer, params, image, reward_now, config.mu,
                                   config.q, config.estimator_batch, generator, share)
        return scaled(-g.to(image.dtype)), None, count
    estimate, count = zeroth_order_gradient(render.image_only, scorer, params, reward_now, config.mu,
                                            config.q, config.estimator_batch, generator, share)
    return None, estimate, count


def update(params: TrainableNoise, optimizer: torch.optim.Optimizer, scaler, render: Render,
           grad_image: Optional[torch.Tensor], estimate, terms: Optional[RegularizerTerms],
           regularizer: Optional[ProbabilityRegularizer], config: DNOConfig, scaled) -> bool:
    """One optimiser step from the reward's gradient and the regulariser's; False (no step) when a
    gradient is not finite."""
    if grad_image is not None:
        render.renderer.backward(grad_image)
    with_regularizer = terms is not None and regularizer.gamma > 0
    if with_regularizer:
        scaled(regularizer.gamma * terms.loss.sum()).backward()
    has_grad = grad_image is not None or with_regularizer
    if scaler is not None and has_grad:
        scaler.unscale_(optimizer)
    if estimate is not None:
        # an estimate alone is unscaled by scaler.step(): hand it over in scaled units
        factor = scaler.get_scale() if scaler is not None and not has_grad else 1.0
        for leaf, g in zip(params.leaves, estimate):
            leaf.grad = -g * factor if leaf.grad is None else leaf.grad - g
    if scaler is None and not all(bool(torch.isfinite(t.grad).all())
                                  for t in params.leaves if t.grad is not None):
        return False
    if config.max_grad_norm is not None:
        norm = params.per_sample_grad_norm()
        params.scale_grads((config.max_grad_norm / (norm + 1e-6)).clamp(max=1.0))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return True


def run_updates(render: Render, scorer: Scorer, params: TrainableNoise, method: str, config: DNOConfig,
                regularizer: Optional[ProbabilityRegularizer], callback, modules,
                share: Optional[EstimatorShare] = None) -> DNOResult:
    """The loop: score the current sample, keep it if best, report, stop or update; every exit
    keeps the best sample found (see the module doc)."""
    device, batch = render.device, render.batch
    optimizer = torch.optim.AdamW(params.leaves, lr=config.lr, weight_decay=config.weight_decay)
    scaler = grad_scaler(config.precision, device)
    scaled = (lambda t: t) if scaler is None else scaler.scale
    generator = torch.Generator(device=device).manual_seed(int(config.seed))
    history: List[StepRecord] = []
    best = Best()
    rendered, stop, started = 0, "completed", time.perf_counter()
    scopes = contextlib.ExitStack()
    try:
        # Around the whole loop: the blocks must stay patched through every backward pass.
        scopes.enter_context(checkpointed_blocks(render.segments))
        # Gradients flow to the noise only: weights of module callables get none, and their
        # convolutions need not keep their inputs (see frozen.py).
        scopes.enter_context(noise_only_backward(modules))
        for it in range(int(config.steps) + 1):
            last = it == int(config.steps)
            graph = not last and method in ("autograd", "hybrid")
            out, image = render.renderer.forward(graph)
            with torch.no_grad():
                current = params.assemble()     # the noise of this sample, kept if it is the best
            # the reward's own graph starts at the image; the render's backward takes its gradient
            image_leaf = image.requires_grad_(True) if graph and method == "autograd" else image
            with torch.set_grad_enabled(graph and method == "autograd"), autocast(config.precision, device):
                value = scorer(image_leaf)
            rendered += batch
            reward_now = value.detach()
            if not bool(torch.isfinite(reward_now).all()):
                if it == 0:
                    raise DNOError(f"reward {reward_name(scorer.reward)!r} returned a non-finite value for "
                                   f"the unoptimised sample ({reward_now.tolist()}); check the reward and "
                                   "the model's output")
                stop = f"non-finite reward at step {it}; kept the best sample so far"
                break
            terms = None
            if regularizer is not None:
                with torch.set_grad_enabled(not last):
                    terms = regularizer.terms(params.flat())
            best.update(it, reward_now, out, image.detach(), current.detach())
            history.append(StepRecord(
                it, reward_now.tolist(),
                None if terms is None else terms.loss.detach().tolist(),
                None if terms is None else terms.probability.detach().tolist(),
                time.perf_counter() - started))
            if callback is not None:
                callback(StepInfo(it, int(config.steps), reward_now, best.reward,
                                  None if terms is None else terms.detach(), out,
                                  image.detach(), current.detach(), time.perf_counter() - started))
            if last:
                break
            reason = stop_reason(config, it, best, history, started)
            if reason is not None:
                stop = reason
                break
            optimizer.zero_grad(set_to_none=True)
            grad_image, estimate, count = estimate_gradient(method, render, scorer, params, image, image_leaf,
                                                            value, reward_now, config, generator, scaled, share)
            rendered += count
            del value, image, image_leaf, out, current
            if not update(params, optimizer, scaler, render, grad_image, estimate, terms, regularizer,
                          config, scaled):
                stop = f"non-finite gradient at step {it}; kept the best sample so far"
                break
            del grad_image, estimate
    except StopOptimization as stopped:
        if not best:        # stopped before the first sample was scored: nothing to return
            raise
        stop = f"stopped by callback at step {len(history) - 1}" + (f": {stopped}" if str(stopped) else "")
    except torch.cuda.OutOfMemoryError:
        if not best:        # nothing to keep: the caller says what to lower
            raise
        # A later, larger graph ran out (a bigger estimator batch, fragmentation): keep what was found.
        stop = (f"out of GPU memory after {len(history)} scored samples; kept the best sample so far "
                "(lower the resolution or batch size, or use a low-memory mode)")
    except BaseException as error:
        # Interrupts (ComfyUI's Cancel, Ctrl-C, an OOM) keep what was found.
        error.dno_result = best.result(history, stop, rendered, render)
        if isinstance(error, DNOError) and error.result is None:
            error.result = error.dno_result
        raise
    finally:
        optimizer.zero_grad(set_to_none=True)
        render.renderer.release()
        scopes.close()
    return best.result(history, stop, rendered, render)


def optimized_noises(schedule: NoiseSchedule, sig: List[float], eta: float, window: int,
                     has_step_noise: bool = True) -> Tuple[List[int], bool]:
    """Which noises ``window`` = K (the paper's ``opt_time``) optimises: (step indices, x_T?).

    As in the official code: the noise that enters the first of the last K steps (x_T when K
    covers all n steps, else the noise the step before them injects) and every noise injected
    after it. A schedule ending at sigma 0 injects none in its last step, so SDE sampling
    optimises K noises. Steps whose noise has a zero coefficient are left out.
    """
    n = len(sig) - 1
    steps = [i for i in range(max(0, n - window - 1), n)
             if has_step_noise and step_uses_noise(schedule, sig[i], sig[i + 1], eta)]
    return steps, window == n


def _plan_memory(config: DNOConfig, denoiser, decode, schedule, eta: float, sig: List[float],
                 window: int, noise: DNONoise, latent, full_denoise: bool,
                 trainable: List[torch.Tensor]) -> Optional[MemoryPlan]:
    """Measure one step's and one decode's activations on the device and plan the storage.

    The measurement runs under the budget (``measure_within``): where one step with all its
    activations does not fit, the plan is block checkpointing, measured the same way.
    Off CUDA there is no allocator counter to read: None (recompute every step).
    """
    device = noise.x_T.device
    if device.type != "cuda":
        return None
    budget = (int(config.memory_budget_gb * GIB) if config.memory_budget_gb is not None
              else config.auto_budget_bytes if config.auto_budget_bytes is not None
              else default_budget_bytes(device))
    first = len(sig) - 1 - window
    z = None if noise.steps is None else noise.steps[first].detach()
    with torch.no_grad():
        x = schedule.start(sig[0], noise.x_T.detach(), latent, full_denoise)

    def measure():
        with autocast(config.sampler_precision, device):
            step, step_working = activation_cost(lambda v: denoise_step(denoiser, schedule, eta, sig[first],
                                                                        sig[first + 1], v, z), x)
            decoded, decode_working = activation_cost(decode, x)
        return step, step_working, decoded, decode_working

    segments = segments_of(denoiser) + segments_of(decode)
    in_use = torch.cuda.memory_allocated(device)
    # allocated once the loop runs: a gradient and AdamW's two moments per optimised noise tensor
    state = 3 * sum(t.numel() * t.element_size() for t in trainable)
    measured = measure_within(budget, device, measure)
    # The cap holds back new device memory only: what the allocator has cached already can be
    # handed out past it. A measurement that fitted only so reads as not fitting all the same.
    if measured is None or in_use + max(measured[1], measured[3]) + state > budget:
        return _plan_without_stored_steps(budget, in_use, state, segments, device, measure)
    step, step_working, decoded, decode_working = measured
    # without a budget from the user, stored steps are capped where they stop paying (memory.py)
    cap = None if config.memory_budget_gb is not None else DEFAULT_STORED_BYTES
    return plan_stored_steps(budget, in_use, step, decoded, window, bool(segments),
                             working_bytes=max(step_working, decode_working), state_bytes=state,
                             max_stored_bytes=cap)


def _plan_without_stored_steps(budget: int, in_use: int, state: int, segments, device,
                               measure: Callable[[], tuple]) -> MemoryPlan:
    """The plan when one step with all its activations did not fit ``budget``: block
    checkpointing (measured the same way) where the model offers blocks, else every step
    recomputed. Where even that measures over the budget it is still the least memory DNO can
    run in: the run goes ahead (and on a card that small may run out, and says so)."""
    blocked = None
    if segments:
        with checkpointed_blocks(segments):
            blocked = measure_within(budget, device, measure)
        if blocked is not None and in_use + max(blocked[1], blocked[3]) + state > budget:
            blocked = None
    how = "block checkpointing" if segments else "every step recomputed (the model offers no blocks to checkpoint)"
    if blocked is None:
        log.warning("DNO: one sampling step does not fit the memory budget of %.2f GiB (%.2f GiB in use) "
                    "even recomputed: running with %s, the least memory DNO can run in", budget / GIB,
                    in_use / GIB, how)
        return MemoryPlan(0, bool(segments), 0, 0, in_use, budget, state,
                          note=f"{how}; not even that measured within the budget")
    step, step_working, decoded, decode_working = blocked
    reserve = max(step_working, decode_working) + state
    log.info("DNO: one step with all its activations does not fit the memory budget of %.2f GiB: %s "
             "(a step's backward measured %.2f GiB)", budget / GIB, how, reserve / GIB)
    return MemoryPlan(0, True, step, decoded, in_use, budget, reserve,
                      note=f"{how}: a step with all its activations does not fit the budget")


def _next_iteration_estimate(history: List[StepRecord]) -> float:
    """Seconds the next update plus scoring should take.

    After the first update it is the measured mean; before, the first
    (forward-only) evaluation times 4: an update recomputes the checkpointed
    forward and runs the backward on top of the next forward.
    """
    if len(history) >= 2:
        return (history[-1].elapsed - history[0].elapsed) / (len(history) - 1)
    return 4.0 * history[0].elapsed
