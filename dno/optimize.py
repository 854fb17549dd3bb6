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
                     plan_stored_steps)
from .noise import DNONoise, TrainableNoise
from .precision import AUTO, autocast, check_precision, grad_scaler, module_dtype, resolve_precision
from .regularizer import ProbabilityRegularizer, RegularizerTerms
from .sampling import Denoiser, as_sigma_list, denoise_step, sample, step_uses_noise
from .schedule import VP, NoiseSchedule, get_schedule

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
    """
    config = config or DNOConfig()
    config.validate()
    if config.precision == AUTO:    # fp32 on a CPU, the denoiser's dtype on a GPU
        config = dataclasses.replace(config, precision=resolve_precision(
            AUTO, noise.x_T.device, module_dtype(denoiser)))
    schedule = get_schedule(schedule)
    sig = as_sigma_list(sigmas)
    n = len(sig) - 1
    noise.validate(n, eta)
    if latent is not None and tuple(latent.shape) != tuple(noise.x_T.shape):
        raise DNOError(f"latent shape {tuple(latent.shape)} does not match the noise shape "
                       f"{tuple(noise.x_T.shape)}")
    window = n if not config.window else int(config.window)
    if not 1 <= window <= n:
        raise DNOError(f"opt_window must be 0 (every step and x_T) or between 1 and the number of sampling "
                       f"steps ({n}), got {window}")
    method = resolve_method(config.method, reward)
    device = noise.x_T.device
    batch = noise.batch_size

    steps_in_window, optimise_x_T = optimised_noises(schedule, sig, eta, window, noise.steps is not None)
    if not steps_in_window and not optimise_x_T:
        if eta == 0 or noise.steps is None:
            raise DNOError(f"opt_window={window} with sampler_mode ODE (eta=0) optimises nothing: an ODE "
                           f"sampler injects no noise after x_T, and x_T is optimised only when opt_window "
                           f"covers every sampling step (0 or {n}); set opt_window=0 or sampler_mode SDE")
        raise DNOError(f"opt_window={window} optimises nothing: none of the last {window + 1} sampling steps "
                       f"injects noise at eta={eta}; widen opt_window (0 = every step and x_T)")
    params = TrainableNoise(noise, steps_in_window, optimise_x_T=optimise_x_T)
    optimizer = torch.optim.AdamW(params.leaves, lr=config.lr, weight_decay=config.weight_decay)
    scaler = grad_scaler(config.precision, device)

    def scaled(t: torch.Tensor) -> torch.Tensor:
        return t if scaler is None else scaler.scale(t)
    generator = torch.Generator(device=device).manual_seed(int(config.seed))

    plan = None
    keep, blocks, store_decode = config.checkpoint, False, config.checkpoint is False
    if keep == "blocks":
        keep, blocks = True, True
    elif keep == "auto":
        keep = True
        if method in ("autograd", "hybrid"):
            plan = _plan_memory(config, denoiser, decode, schedule, eta, sig, window, noise, latent,
                                full_denoise, params.leaves)
        if plan is not None:
            keep, blocks = plan.stored_steps, plan.block_checkpointing
            store_decode = plan.stored_steps >= window and not blocks
    segments = (segments_of(denoiser) + segments_of(decode)) if blocks else []

    def render(current: DNONoise, graph: bool = False) -> tuple:
        times = current.batch_size // batch
        start = latent if latent is None or times == 1 else latent.repeat(times, *([1] * (latent.dim() - 1)))
        out = sample(denoiser, current, sig, schedule, eta, start, full_denoise, window, keep)
        if graph and not store_decode:
            image = _checkpoint(decode, out)
        else:
            image = decode(out)
        return out, image

    def sampler_autocast():
        return autocast(config.sampler_precision, device)

    def render_current() -> tuple:
        # what the render (eager or replayed as CUDA graphs) computes from the trainable leaves
        with sampler_autocast():
            return render(params.assemble(), graph=torch.is_grad_enabled())

    def score(images: torch.Tensor) -> torch.Tensor:
        times = images.shape[0] // batch
        return checked_reward(reward, images, tile_prompts(prompts, times), images.shape[0])

    def render_only(current: DNONoise) -> torch.Tensor:
        with sampler_autocast():
            return render(current)[1]

    renderer = make_render(render_current, params.leaves, device,
                           config.cuda_graphs and method in ("autograd", "hybrid"))

    history: List[StepRecord] = []
    best = {}
    rendered = 0
    stop_reason = "completed"
    started = time.perf_counter()

    def result() -> Optional[DNOResult]:
        if not best:
            return None
        return DNOResult(best["latent"], best["image"], best["noise"], best["reward"], best["initial"],
                         best["step"], history, stop_reason, rendered, plan, dict(renderer.info))

    scopes = contextlib.ExitStack()
    try:
        # Around the whole loop: the blocks must stay patched through every backward pass.
        scopes.enter_context(checkpointed_blocks(segments))
        # Gradients flow to the noise only: weights of module callables get none, and their
        # convolutions need not keep their inputs (see frozen.py).
        scopes.enter_context(noise_only_backward((denoiser, decode, reward)))
        for it in range(int(config.steps) + 1):
            last = it == int(config.steps)
            graph = not last and method in ("autograd", "hybrid")
            out, image = renderer.forward(graph)
            with torch.no_grad():
                current = params.assemble()     # the noise of this sample, kept if it is the best
            # the reward's own graph starts at the image; the render's backward takes its gradient
            image_leaf = image.requires_grad_(True) if graph and method == "autograd" else image
            with torch.set_grad_enabled(graph and method == "autograd"), autocast(config.precision, device):
                value = score(image_leaf)
            rendered += batch
            reward_now = value.detach()
            finite = bool(torch.isfinite(reward_now).all())
            if not finite and it == 0:
                raise DNOError(f"reward {reward_name(reward)!r} returned a "
                               f"non-finite value for the unoptimised sample ({reward_now.tolist()}); "
                               "check the reward and the model's output")
            if not finite:
                stop_reason = f"non-finite reward at step {it}; kept the best sample so far"
                break

            terms = None
            if regularizer is not None:
                with torch.set_grad_enabled(not last):
                    terms = regularizer.terms(params.flat())

            _update_best(best, it, reward_now, out, image.detach(), current.detach())
            history.append(StepRecord(
                it, reward_now.tolist(),
                None if terms is None else terms.loss.detach().tolist(),
                None if terms is None else terms.probability.detach().tolist(),
                time.perf_counter() - started))
            if callback is not None:
                callback(StepInfo(it, int(config.steps), reward_now, best["reward"],
                                  None if terms is None else terms.detach(), out,
                                  image.detach(), current.detach(), time.perf_counter() - started))
            if last:
                break
            if config.target_reward is not None and bool((best["reward"] >= config.target_reward).all()):
                stop_reason = f"target reward {config.target_reward} reached at step {it}"
                break
            elapsed = time.perf_counter() - started
            if config.time_budget is not None and elapsed + _next_iteration_estimate(history) > config.time_budget:
                stop_reason = f"time budget of {config.time_budget}s reached after {it} updates"
                break

            optimizer.zero_grad(set_to_none=True)
            grad_image = None       # d(-reward)/d(image), scaled for fp16; the render takes it back
            estimate = None
            if method == "autograd":
                loss = -value.sum()
                grad_image = torch.autograd.grad(scaled(loss), image_leaf)[0]
            elif method == "hybrid":
                g, count = hybrid_gradient(render_only, score, params, image, reward_now, config.mu,
                                           config.q, config.estimator_batch, generator, estimator_share)
                rendered += count
                grad_image = scaled(-g.to(image.dtype))
            else:
                estimate, count = zeroth_order_gradient(render_only, score, params, reward_now, config.mu,
                                                        config.q, config.estimator_batch, generator,
                                                        estimator_share)
                rendered += count
            if grad_image is not None:
                renderer.backward(grad_image)
            if terms is not None and regularizer.gamma > 0:
                reg = regularizer.gamma * terms.loss.sum()
                scaled(reg).backward()
            has_grad = grad_image is not None or (terms is not None and regularizer.gamma > 0)
            if scaler is not None and has_grad:
                scaler.unscale_(optimizer)
            if estimate is not None:
                # an estimate alone is unscaled by scaler.step(): hand it over in scaled units
                factor = scaler.get_scale() if scaler is not None and not has_grad else 1.0
                for leaf, g in zip(params.leaves, estimate):
                    leaf.grad = -g * factor if leaf.grad is None else leaf.grad - g
            del grad_image, value, image, image_leaf, out, current
            if scaler is None and not all(bool(torch.isfinite(t.grad).all())
                                          for t in params.leaves if t.grad is not None):
                stop_reason = f"non-finite gradient at step {it}; kept the best sample so far"
                break
            if config.max_grad_norm is not None:
                norm = params.per_sample_grad_norm()
                params.scale_grads((config.max_grad_norm / (norm + 1e-6)).clamp(max=1.0))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
    except StopOptimization as stop:
        if not best:        # stopped before the first sample was scored: nothing to return
            raise
        stop_reason = f"stopped by callback at step {len(history) - 1}" + (f": {stop}" if str(stop) else "")
    except torch.cuda.OutOfMemoryError as error:
        if not best:        # nothing to keep: the caller says what to lower
            raise
        # A later, larger graph ran out (a bigger estimator batch, fragmentation): keep what was found.
        stop_reason = (f"out of GPU memory after {len(history)} scored samples; kept the best sample so far "
                       "(lower the resolution or batch size, or use a low-memory mode)")
    except BaseException as error:
        # Interrupts (ComfyUI's Cancel, Ctrl-C, an OOM) keep what was found.
        error.dno_result = result()
        if isinstance(error, DNOError) and error.result is None:
            error.result = error.dno_result
        raise
    finally:
        optimizer.zero_grad(set_to_none=True)
        renderer.release()
        scopes.close()
    return result()


def optimised_noises(schedule: NoiseSchedule, sig: List[float], eta: float, window: int,
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

    Off CUDA there is no allocator counter to read: None (recompute every step).
    """
    device = noise.x_T.device
    if device.type != "cuda":
        return None
    budget = (int(config.memory_budget_gb * GIB) if config.memory_budget_gb is not None
              else default_budget_bytes(device))
    first = len(sig) - 1 - window
    z = None if noise.steps is None else noise.steps[first].detach()
    with torch.no_grad():
        x = schedule.start(sig[0], noise.x_T.detach(), latent, full_denoise)
    with autocast(config.sampler_precision, device):
        step, step_working = activation_cost(lambda v: denoise_step(denoiser, schedule, eta, sig[first],
                                                                    sig[first + 1], v, z), x)
        decoded, decode_working = activation_cost(decode, x)
    can_blocks = bool(segments_of(denoiser) or segments_of(decode))
    # allocated once the loop runs: a gradient and AdamW's two moments per optimised noise tensor
    state = 3 * sum(t.numel() * t.element_size() for t in trainable)
    # without a budget from the user, stored steps are capped where they stop paying (memory.py)
    cap = None if config.memory_budget_gb is not None else DEFAULT_STORED_BYTES
    return plan_stored_steps(budget, torch.cuda.memory_allocated(device), step, decoded, window, can_blocks,
                             working_bytes=max(step_working, decode_working), state_bytes=state,
                             max_stored_bytes=cap)


def _next_iteration_estimate(history: List[StepRecord]) -> float:
    """Seconds the next update plus scoring should take.

    After the first update it is the measured mean; before, the first
    (forward-only) evaluation times 4: an update recomputes the checkpointed
    forward and runs the backward on top of the next forward.
    """
    if len(history) >= 2:
        return (history[-1].elapsed - history[0].elapsed) / (len(history) - 1)
    return 4.0 * history[0].elapsed


def _update_best(best: dict, step: int, reward: torch.Tensor, latent: torch.Tensor,
                 image: torch.Tensor, noise: DNONoise) -> None:
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
