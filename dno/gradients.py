"""Gradient estimators for the noise.

* exact autograd (the optimisation loop backpropagates ``-reward``);
* :func:`hybrid_gradient`: the paper's Hybrid-2 estimator for rewards without
  a gradient. The reward's gradient *in image space* is estimated from q
  samples whose **noise** is perturbed, ``sum_j (r_j - r_0) (x_j - x_0)``,
  which points along ``J J^T grad r`` with J the Jacobian of the image w.r.t.
  the optimised noise; the loop then backpropagates ``-<g, x_0>`` through the
  decoder and sampler. As in the official code, only its direction is kept:
  ``g`` has unit norm per sample in the [-1, 1] pixel space that code
  normalises in, which is norm 2 in the [0, 1] images here (``HYBRID_NORM``),
  with the official code's guard added to the norm (1e-3 in its [-1, 1]
  pixels, ``HYBRID_EPS`` = 5e-4 in the [0, 1] pixels here): an estimate far
  above the guard gets norm 2, a tiny one (perturbed rewards that barely
  differ) is scaled down instead of blown up, a zero one stays zero. So the
  reward's pull on the noise, and its balance with ``gamma`` times the
  regulariser, does not depend on the reward's units, q or mu (unless the
  estimate is as small as the guard). Hybrid-2 (the
  variant of the official code) perturbs along directions the sampler can
  actually produce, so with few samples it is far better aligned than
  Hybrid-1, which perturbs the image itself in all its pixel dimensions.
* :func:`zeroth_order_gradient`: the pure zeroth-order baseline over the
  noise, ``g = 1/(q mu) sum_j (r_j - r_0) xi_j``.

``render(noise) -> image`` and ``score(image) -> reward[B']`` may be called
with the batch tiled several times; the perturbed samples are rendered
``chunk`` copies of the batch at a time.

An :class:`EstimatorShare` spreads the q renders over several processes (one
GPU each, ``dno.distributed``): every process draws the same perturbations
in the same chunks, renders only its own chunks, and the partial sums are
added up across processes, so each ends with the estimate one process would
have computed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from .noise import DNONoise, TrainableNoise

# Per-sample norm of the hybrid estimate in [0, 1] pixels: unit norm in the [-1, 1] pixels of the
# official code (x = 2 x01 - 1, so its <g, x> has gradient 2 g in x01).
HYBRID_NORM = 2.0
# The official guard, in the [0, 1] pixels here. The official code (dno_stable_diffusion_nograd.py)
# sums e = sum_j (L_j - L_0)(x_j - x_0) over its renders (one worker process rendering all q: with
# W workers it averages their sums), with x = 2 x01 - 1 in [-1, 1], and uses e / (|e| + 1e-3).
# Here s = sum_j (r_j - r_0)(x01_j - x01_0), so e = -2 s and |e| = 2 |s|, and the official
# direction is e / (2 |s| + 1e-3) = -s / (|s| + 5e-4). Its <e/(...), x> has gradient 2 e/(...) in
# x01, so the estimate here is HYBRID_NORM * s / (|s| + HYBRID_EPS) with HYBRID_EPS = 1e-3 / 2:
# norm 2 |s| / (|s| + 5e-4), just under 2 for any estimate well above 5e-4, towards 0 below it.
HYBRID_EPS = 0.5e-3

Render = Callable[[DNONoise], torch.Tensor]
Score = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EstimatorShare:
    """This process's part of an estimate whose perturbed renders are spread over ``count`` processes.

    Chunk c of the perturbations (``chunk`` copies of the batch each) is rendered by process
    c % count; ``reduce`` sums a partial estimate over all processes (an all-reduce) and returns it.
    """
    index: int
    count: int
    reduce: Callable[[torch.Tensor], torch.Tensor]

    def owns(self, chunk_index: int) -> bool:
        return chunk_index % self.count == self.index


def _perturbed_rewards(render: Render, score: Score, params: TrainableNoise, mu: float,
                       q: int, chunk: int, generator: torch.Generator,
                       share: Optional[EstimatorShare] = None):
    """Yield (rewards (m, B), images (m, B, ...), deltas per leaf) for chunks of m perturbations.

    With a ``share``, the chunks of other processes are drawn (so the generator advances as in a
    single process) but neither rendered nor yielded.
    """
    batch = params.batch_size
    done = 0
    index = 0
    while done < q:
        m = min(chunk, q - done)
        noise, deltas = params.perturbations(m, mu, generator)
        if share is None or share.owns(index):
            with torch.no_grad():
                images = render(noise)
                rewards = score(images).float()
            yield rewards.view(m, batch), images.view((m, batch) + tuple(images.shape[1:])), deltas, m
        done += m
        index += 1


def hybrid_gradient(render: Render, score: Score, params: TrainableNoise, image: torch.Tensor,
                    reward: torch.Tensor, mu: float = 0.01, q: int = 16, chunk: int = 4,
                    generator: torch.Generator = None,
                    share: Optional[EstimatorShare] = None) -> Tuple[torch.Tensor, int]:
    """Hybrid-2 estimate of the direction of d reward / d image for each sample (same shape as
    ``image``), scaled as the official code scales it: ``HYBRID_NORM * s / (|s| + HYBRID_EPS)``,
    norm just under ``HYBRID_NORM`` per sample (see the module doc).

    Returns the estimate and the number of images rendered for it (by all processes of a ``share``).
    """
    image0 = image.detach().float()
    reward0 = reward.detach().float()
    grad = torch.zeros_like(image0)
    for rewards, images, _, _ in _perturbed_rewards(render, score, params, mu, q, chunk, generator, share):
        diff_r = rewards - reward0                       # (m, B)
        diff_x = images.float() - image0                 # (m, B, ...)
        grad += (diff_r.view(diff_r.shape + (1,) * (image0.dim() - 1)) * diff_x).sum(0)
    if share is not None:       # the sum over every process's renders, then normalised as one
        grad = share.reduce(grad)
    norm = grad.reshape(grad.shape[0], -1).norm(dim=1).view((-1,) + (1,) * (grad.dim() - 1))
    # the official guard (HYBRID_EPS): a zero estimate (no perturbation changed the reward) stays zero
    return grad * (HYBRID_NORM / (norm + HYBRID_EPS)), q * params.batch_size


def zeroth_order_gradient(render: Render, score: Score, params: TrainableNoise,
                          reward: torch.Tensor, mu: float = 0.01, q: int = 16, chunk: int = 4,
                          generator: torch.Generator = None,
                          share: Optional[EstimatorShare] = None) -> Tuple[List[torch.Tensor], int]:
    """Zeroth-order estimate of d reward / d noise, one tensor per trainable leaf."""
    reward0 = reward.detach().float()
    grads = [torch.zeros_like(t, dtype=torch.float32) for t in params.leaves]
    for rewards, _, deltas, m in _perturbed_rewards(render, score, params, mu, q, chunk, generator, share):
        diff_r = rewards - reward0                       # (m, B)
        for i, delta in enumerate(deltas):
            axis = params.batch_axis(i)
            # delta is the leaf tiled m times along its batch axis
            shape = list(params.leaves[i].shape)
            d = delta.float().unflatten(axis, (m, shape[axis]))
            w_shape = [1] * d.dim()
            w_shape[axis], w_shape[axis + 1] = m, shape[axis]
            grads[i] += (d * diff_r.view(w_shape)).sum(axis)
    if share is not None:
        grads = [share.reduce(g) for g in grads]
    return [g / (q * mu) for g in grads], q * params.batch_size
