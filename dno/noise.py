"""The noise DNO optimises: x_T and, for SDE sampling, one noise per step.

A batch of B images is B independent problems: every tensor here has the
batch on its own axis and nothing mixes samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .errors import DNOError


@dataclass
class DNONoise:
    x_T: torch.Tensor                      # (B, C, H, W) unit normal
    steps: Optional[torch.Tensor] = None   # (num_steps, B, C, H, W), None for ODE sampling

    @classmethod
    def from_seed(cls, shape: Sequence[int], num_steps: int, seed: int, sde: bool = True,
                  device="cpu", dtype=torch.float32) -> "DNONoise":
        """Deterministic noise: the same seed gives the same values on every device.

        Drawn on the CPU from one generator (x_T first, then the step noises in
        sampling order) and moved afterwards, as ComfyUI does for its noise.
        """
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2 or min(shape) <= 0:
            raise DNOError(f"noise shape must be (batch, channels, ...) with positive sizes, got {shape}")
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        x_T = torch.randn(shape, generator=gen)
        steps = torch.randn((int(num_steps),) + shape, generator=gen) if sde else None
        return cls(x_T.to(device, dtype), None if steps is None else steps.to(device, dtype))

    @property
    def batch_size(self) -> int:
        return self.x_T.shape[0]

    def validate(self, num_steps: int, eta: float, schedule=None, sigmas=None) -> None:
        if self.x_T.dim() < 2:
            raise DNOError(f"x_T must be (batch, channels, ...), got shape {tuple(self.x_T.shape)}")
        if self.steps is None:
            if eta > 0:
                raise DNOError(f"eta={eta} (SDE sampling) needs per-step noises; create the "
                               "noise with sde=True or sample with eta=0")
            return
        expected = (num_steps,) + tuple(self.x_T.shape)
        if tuple(self.steps.shape) != expected:
            raise DNOError(f"per-step noise has shape {tuple(self.steps.shape)}, expected {expected} "
                           f"(num_steps={num_steps} from len(sigmas)-1, then the x_T shape)")

    def detach(self) -> "DNONoise":
        return DNONoise(self.x_T.detach(), None if self.steps is None else self.steps.detach())

    def clone(self) -> "DNONoise":
        return DNONoise(self.x_T.detach().clone(),
                        None if self.steps is None else self.steps.detach().clone())

    def to(self, *args, **kwargs) -> "DNONoise":
        return DNONoise(self.x_T.to(*args, **kwargs),
                        None if self.steps is None else self.steps.to(*args, **kwargs))

    def tensors(self) -> List[torch.Tensor]:
        return [self.x_T] + ([] if self.steps is None else [self.steps])

    def select(self, keep: torch.Tensor, other: "DNONoise") -> "DNONoise":
        """Per sample: this noise where ``keep[b]`` holds, ``other`` elsewhere."""
        x_T = torch.where(_expand(keep, self.x_T), self.x_T, other.x_T)
        steps = None
        if self.steps is not None:
            steps = torch.where(_expand(keep, self.steps[0]).unsqueeze(0), self.steps, other.steps)
        return DNONoise(x_T, steps)

    def repeat(self, times: int) -> "DNONoise":
        """Tile the batch ``times`` times (sample order b0, b1, ..., b0, b1, ...)."""
        x_T = self.x_T.repeat(times, *([1] * (self.x_T.dim() - 1)))
        steps = None
        if self.steps is not None:
            steps = self.steps.repeat(1, times, *([1] * (self.steps.dim() - 2)))
        return DNONoise(x_T, steps)


def _expand(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view((-1,) + (1,) * (like.dim() - 1))


class TrainableNoise:
    """The part of a :class:`DNONoise` that DNO optimises, as autograd leaves.

    With a window of K steps (the paper's ``opt_time``; see
    ``dno.optimize.optimized_noises``) these are the noise that enters the
    first of the last K steps (x_T when the window covers every step, else the
    noise injected by the step before it) and every noise injected after it.
    Steps whose noise has a zero coefficient (the last step, any step of an
    ODE sampler) are never optimised: their value does not change the
    sample, so they would only distort the regulariser.
    """

    def __init__(self, noise: DNONoise, step_indices: Sequence[int], optimize_x_T: bool):
        self.base = noise.detach()
        self.step_indices = list(step_indices)
        self.optimize_x_T = bool(optimize_x_T)
        self.leaves: List[torch.Tensor] = []
        # made once: a tensor built from a Python list per render would be a host-to-device copy,
        # which a CUDA graph cannot capture
        self._index = (torch.as_tensor(self.step_indices, device=self.base.steps.device)
                       if self.step_indices else None)
        if self.optimize_x_T:
            self.leaves.append(self.base.x_T.clone().float().requires_grad_(True))
        if self.step_indices:
            self.leaves.append(self.base.steps[self.step_indices].clone().float().requires_grad_(True))
        if not self.leaves:
            raise DNOError("nothing to optimise: opt_window reaches no step with injected noise and "
                           "not x_T; widen opt_window (0 = every step and x_T) or use sampler_mode SDE")

    @property
    def batch_size(self) -> int:
        return self.base.batch_size

    def batch_axis(self, index: int) -> int:
        # x_T is (B, ...), the stacked step noises are (K, B, ...)
        return 0 if (self.optimize_x_T and index == 0) else 1

    def assemble(self, leaves: Optional[Sequence[torch.Tensor]] = None) -> DNONoise:
        """A DNONoise made of the fixed base and ``leaves`` (default: the trainable leaves)."""
        leaves = list(self.leaves if leaves is None else leaves)
        x_T = leaves.pop(0) if self.optimize_x_T else self.base.x_T
        steps = self.base.steps
        if self.step_indices:
            window = leaves.pop(0)
            index = self._index
            # out-of-place: differentiable w.r.t. the window, the base stays untouched
            steps = steps.index_put((index,), window.to(steps.dtype))
        return DNONoise(x_T.to(self.base.x_T.dtype), None if steps is None else steps.to(self.base.x_T.dtype))

    def flat(self, leaves: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """(B, D): every optimised number of each sample, for the regulariser."""
        leaves = self.leaves if leaves is None else leaves
        parts = []
        for i, t in enumerate(leaves):
            t = t if self.batch_axis(i) == 0 else t.transpose(0, 1)
            parts.append(t.reshape(t.shape[0], -1))
        return torch.cat(parts, dim=1)

    def perturbations(self, times: int, mu: float, generator: torch.Generator):
        """``times`` perturbed copies of the batch (tiled) and their unit deltas."""
        deltas, leaves = [], []
        for i, t in enumerate(self.leaves):
            axis = self.batch_axis(i)
            reps = [1] * t.dim()
            reps[axis] = times
            base = t.detach().repeat(*reps)
            delta = torch.randn(base.shape, generator=generator, device=base.device, dtype=base.dtype)
            deltas.append(delta)
            leaves.append(base + mu * delta)
        tiled = TrainableNoise.__new__(TrainableNoise)
        tiled.base = self.base.repeat(times)
        tiled.step_indices = self.step_indices
        tiled._index = self._index
        tiled.optimize_x_T = self.optimize_x_T
        tiled.leaves = leaves
        return tiled.assemble(leaves), deltas

    def per_sample_grad_norm(self) -> torch.Tensor:
        total = None
        for i, t in enumerate(self.leaves):
            if t.grad is None:
                continue
            g = t.grad if self.batch_axis(i) == 0 else t.grad.transpose(0, 1)
            sq = g.float().pow(2).reshape(g.shape[0], -1).sum(1)
            total = sq if total is None else total + sq
        if total is None:
            return torch.zeros(self.batch_size, device=self.base.x_T.device)
        return total.sqrt()

    def scale_grads(self, factor: torch.Tensor) -> None:
        """Multiply each sample's gradient by ``factor[b]`` (per-sample clipping)."""
        for i, t in enumerate(self.leaves):
            if t.grad is None:
                continue
            shape = [1] * t.dim()
            shape[self.batch_axis(i)] = -1
            t.grad.mul_(factor.view(shape).to(t.grad.dtype))
