"""The probability regulariser: keep the optimised noise typical for N(0, I).

Following the paper (Sec. 5) and its official code: the flattened noise of D
numbers is split into n = D // d blocks of d = 4**k numbers. For noise drawn
from N(0, I) the block mean m (d numbers) and the uncentred block covariance
C = X^T X / n (d x d) concentrate, with tail bounds

    P(|m| >= M)           <= 2 exp(-n M^2 / (2 d))
    P(|C - I|_2 >= M)     <= 2 exp(-n (sqrt(1 + M) - 1 - sqrt(d / n))_+^2 / 2).

The log of each bound, capped at -log 2 (the bound is vacuous above it, so
typical noise gets no gradient), is a log-probability; the penalty is minus
their sum over the sequential split plus minus their mean over random
permutations of the noise (which catches structure the sequential split
misses). The defaults (k = 1, 100 permutations) are the official code's, so
the penalty is its value and gamma is the paper's gamma: typical noise costs
4 log 2, the floor (2 log 2 from the sequential split, 2 log 2 from the
permutations; a little more now and then, when a split's covariance bound
is just reached). With ``permutations=0`` only the sequential split counts:
about half the penalty (2 log 2 for typical noise), so the same gamma
weighs it about half as much as the paper's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch.utils.checkpoint import checkpoint

from .errors import DNOError

_LOG_HALF = -math.log(2.0)
# permuted copies of the batch's noise built at once: at most this many numbers (a 64-bit index
# and a float each); with the chunks checkpointed, 100 permutations of an SDXL noise do not hold
# gigabytes for the backward pass
_CHUNK_NUMBERS = 1 << 25
DEFAULT_PERMUTATIONS = 100     # the official code's shuffled_times


@dataclass
class RegularizerTerms:
    loss: torch.Tensor            # (B,) the penalty; 4 log 2 (its floor) when the noise looks
                                  # typical, 2 log 2 with permutations=0
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
    cov = _gram(x) / n
    eye = torch.eye(d, device=x.device, dtype=x.dtype)
    cov_dev = torch.linalg.matrix_norm(cov - eye, ord=2)
    mean_lp = (-n * mean.pow(2).sum(-1) / (2 * d)).clamp(max=_LOG_HALF)
    excess = (torch.sqrt(1 + cov_dev) - 1 - math.sqrt(d / n)).clamp(min=0)
    cov_lp = (-n * excess.pow(2) / 2).clamp(max=_LOG_HALF)
    return mean_lp, cov_lp


def _gram(x: torch.Tensor, split: int = 4096) -> torch.Tensor:
    """x^T x over the blocks axis, (..., n, d) -> (..., d, d).

    One (d x n) @ (n x d) product per matrix leaves a GPU almost idle (two tiny dimensions, one
    huge); n is split into rows of ``split`` blocks whose products are summed instead (zero
    blocks pad the last row and add nothing).
    """
    n = x.shape[-2]
    if n <= split:
        return x.transpose(-1, -2) @ x
    pad = -n % split
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    x = x.reshape(x.shape[:-2] + (-1, split, x.shape[-1]))
    return (x.transpose(-1, -2) @ x).sum(dim=-3)


class ProbabilityRegularizer:
    """Penalty ``gamma * loss`` on the noise, per sample.

    ``k`` sets the block size 4**k, ``permutations`` the number of random
    permutations averaged on top of the sequential split (100 = the official
    code, whose gamma this gamma then is; 0 = sequential split only, about
    half the penalty). The permutations are fixed by ``seed``.
    """

    def __init__(self, gamma: float = 1.0, k: int = 1, permutations: int = DEFAULT_PERMUTATIONS,
                 seed: int = 0, permutation_chunk: int = 16):
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
        # Each chunk of permutations is checkpointed: the backward pass draws its permutations again
        # (permutation j always comes from the same seed, on the noise's device, so the penalty stays
        # on the GPU without a host round-trip) instead of keeping their indices and blocks.
        chunk = max(1, min(self.permutation_chunk, _CHUNK_NUMBERS // max(1, flat.numel())))
        total = flat.new_zeros(flat.shape[0], dtype=torch.float32)
        for first in range(0, self.permutations, chunk):
            count = min(chunk, self.permutations - first)
            if torch.is_grad_enabled() and flat.requires_grad:
                part = checkpoint(self._chunk_log_prob, flat, first, count, use_reentrant=False,
                                  preserve_rng_state=False)
            else:
                part = self._chunk_log_prob(flat, first, count)
            total = total + part
        return total / self.permutations

    def _chunk_log_prob(self, flat: torch.Tensor, first: int, count: int) -> torch.Tensor:
        """Sum of the capped log-probabilities over permutations first .. first + count - 1."""
        gen = torch.Generator(device=flat.device)
        perms = []
        for j in range(first, first + count):
            gen.manual_seed(self.seed * 1_000_003 + j)
            perms.append(torch.randperm(flat.shape[-1], generator=gen, device=flat.device))
        m_lp, c_lp = block_log_probs(flat[:, torch.stack(perms)], self.block_size)   # (B, count)
        return (m_lp + c_lp).sum(dim=1)

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        return self.gamma * self.terms(flat).loss

    def __repr__(self) -> str:
        return (f"ProbabilityRegularizer(gamma={self.gamma}, k={self.k}, "
                f"permutations={self.permutations}, seed={self.seed})")
