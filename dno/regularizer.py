"""The probability regulariser: keep the optimised noise typical for N(0, I).

Following the paper (Sec. 5) and its official code: the flattened noise of D
numbers is split into n = D // d blocks of d = 4**k numbers. For noise drawn
from N(0, I) the block mean m (d numbers) and the uncentred block covariance
C = X^T X / n (d x d) concentrate, with tail bounds

    P(|m| >= M)           <= 2 exp(-n M^2 / (2 d))
    P(|C - I|_2 >= M)     <= 2 exp(-n (sqrt(1 + M) - 1 - sqrt(d / n))_+^2 / 2).

The log of each bound, capped at -log 2 (the bound is vacuous above it, so
typical noise gets no gradient), is a log-probability; the penalty is minus
their sum, over the sequential split plus the mean over random permutations
of the noise (which catches structure the sequential split misses).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .errors import DNOError

_LOG_HALF = -math.log(2.0)


@dataclass
class RegularizerTerms:
    loss: torch.Tensor            # (B,) the penalty; 4 log 2 when the noise looks typical
    mean_log_prob: torch.Tensor   # (B,) sequential split, mean bound
    cov_log_prob: torch.Tensor    # (B,) sequential split, covariance bound
    probability: torch.Tensor     # (B,) product of the two sequential bounds; 1 = typical, -> 0 = atypical

    def detach(self) -> "RegularizerTerms":
        return RegularizerTerms(*(t.detach() for t in (self.loss, self.mean_log_prob,
                                                        self.cov_log_prob, self.probability)))


def block_log_probs(flat: torch.Tensor, block_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Capped log tail bounds of the block mean and covariance, per leading index.

    ``flat`` is (..., D); trailing numbers that do not fill a block are left out.
    """
    d = int(block_size)
    n = flat.shape[-1] // d
    if n < 1:
        raise DNOError(f"the noise has {flat.shape[-1]} numbers per sample, fewer than one block "
                       f"of 4**k = {d}; lower the block exponent k")
    x = flat[..., : n * d].reshape(flat.shape[:-1] + (n, d)).float()
    mean = x.mean(dim=-2)
    cov = x.transpose(-1, -2) @ x / n
    eye = torch.eye(d, device=x.device, dtype=x.dtype)
    cov_dev = torch.linalg.matrix_norm(cov - eye, ord=2)
    mean_lp = (-n * mean.pow(2).sum(-1) / (2 * d)).clamp(max=_LOG_HALF)
    excess = (torch.sqrt(1 + cov_dev) - 1 - math.sqrt(d / n)).clamp(min=0)
    cov_lp = (-n * excess.pow(2) / 2).clamp(max=_LOG_HALF)
    return mean_lp, cov_lp


class ProbabilityRegularizer:
    """Penalty ``gamma * loss`` on the noise, per sample.

    ``k`` sets the block size 4**k, ``permutations`` the number of random
    permutations averaged on top of the sequential split (0 = deterministic).
    """

    def __init__(self, gamma: float = 1.0, k: int = 1, permutations: int = 0, seed: int = 0,
                 permutation_chunk: int = 16):
        if gamma < 0:
            raise DNOError(f"regulariser gamma must be >= 0, got {gamma}")
        if k < 0 or k > 6:
            raise DNOError(f"block exponent k must be in 0..6 (block size 4**k), got {k}")
        if permutations < 0:
            raise DNOError(f"permutations must be >= 0, got {permutations}")
        self.gamma = float(gamma)
        self.k = int(k)
        self.permutations = int(permutations)
        self.seed = int(seed)
        self.permutation_chunk = max(1, int(permutation_chunk))

    @property
    def block_size(self) -> int:
        return 4 ** self.k

    def terms(self, flat: torch.Tensor) -> RegularizerTerms:
        """Penalty terms for ``flat`` of shape (B, D): one row per sample."""
        if flat.dim() != 2:
            raise DNOError(f"regulariser input must be (batch, numbers), got {tuple(flat.shape)}")
        mean_lp, cov_lp = block_log_probs(flat, self.block_size)
        log_prob = mean_lp + cov_lp
        if self.permutations:
            log_prob = log_prob + self._permuted_log_prob(flat)
        probability = (4 * torch.exp(mean_lp + cov_lp)).clamp(max=1.0)
        return RegularizerTerms(-log_prob, mean_lp, cov_lp, probability)

    def _permuted_log_prob(self, flat: torch.Tensor) -> torch.Tensor:
        # The permutations are drawn from a generator on the noise's device, so
        # the penalty stays on the GPU without a host round-trip.
        gen = torch.Generator(device=flat.device).manual_seed(self.seed)
        dim = flat.shape[-1]
        total = flat.new_zeros(flat.shape[0], dtype=torch.float32)
        done = 0
        while done < self.permutations:
            count = min(self.permutation_chunk, self.permutations - done)
            perms = torch.stack([torch.randperm(dim, generator=gen, device=flat.device)
                                 for _ in range(count)])
            shuffled = flat[:, perms]                      # (B, count, D)
            m_lp, c_lp = block_log_probs(shuffled, self.block_size)
            total = total + (m_lp + c_lp).sum(dim=1)
            done += count
        return total / self.permutations

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        return self.gamma * self.terms(flat).loss

    def __repr__(self) -> str:
        return (f"ProbabilityRegularizer(gamma={self.gamma}, k={self.k}, "
                f"permutations={self.permutations}, seed={self.seed})")
