import math

import numpy as np
import pytest
import torch

from dno import ProbabilityRegularizer


def paper_penalty(flat: np.ndarray, k: int) -> float:
    """The paper's formula (Sec. 5, official code), written independently in numpy (float64)."""
    d = 4 ** k
    n = flat.size // d
    blocks = flat[: n * d].reshape(n, d)
    mean = blocks.mean(axis=0)
    cov = blocks.T @ blocks / n
    spec = np.abs(np.linalg.eigvalsh(cov - np.eye(d))).max()
    log_mean = min(-n * float(mean @ mean) / (2 * d), -math.log(2))
    excess = max(math.sqrt(1 + spec) - 1 - math.sqrt(d / n), 0.0)
    log_cov = min(-n * excess ** 2 / 2, -math.log(2))
    return -(log_mean + log_cov)


def official_penalty(flat: np.ndarray, k: int = 1, shuffles: int = 100, seed: int = 0) -> float:
    """The official code's penalty, from the paper's description: the capped log tail bounds of the
    sequential split plus their mean over ``shuffles`` random permutations, negated (numpy, float64)."""
    rng = np.random.default_rng(seed)
    split = lambda v: -paper_penalty(v, k)                     # log bound of mean + of covariance
    shuffled = np.mean([split(flat[rng.permutation(flat.size)]) for _ in range(shuffles)])
    return -(split(flat) + shuffled)


@pytest.mark.parametrize("scale", [1.0, 1.3])
def test_default_penalty_is_the_official_value_so_gamma_is_the_papers(scale):
    # one SD1.5 x_T per sample: typical noise and noise scaled by 1.3 (off the shell)
    g = torch.Generator().manual_seed(5)
    flat = torch.randn(2, 4 * 64 * 64, generator=g, dtype=torch.float64) * scale
    ours = ProbabilityRegularizer().terms(flat).loss
    floor = 4 * math.log(2)
    for b in range(2):
        ref = official_penalty(flat[b].numpy())
        # the sequential split is the same; the 100 permutations are random in both, their means agree
        if scale == 1.0:
            # typical noise sits at the floor of 4 log 2 or just above it (a split's covariance
            # bound is reached now and then)
            assert floor - 1e-9 <= ours[b].item() < floor + 0.5 and floor - 1e-9 <= ref < floor + 0.5
            assert abs(ours[b].item() - ref) < 0.1, (ours[b].item(), ref)
        else:
            assert ref > 100 * floor
            assert ours[b].item() == pytest.approx(ref, rel=5e-3), (ours[b].item(), ref)
    # the sequential split alone is about half of it: with it gamma would not be the paper's
    half = ProbabilityRegularizer(permutations=0).terms(flat).loss
    assert (half < 0.6 * ours).all() and (half > 0.4 * ours).all()


def test_chunked_checkpointed_permutations_give_the_same_penalty_and_gradient():
    x = (torch.randn(2, 4096, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 1.2)
    results = []
    for chunk in (1, 7, 100):
        z = x.clone().requires_grad_(True)
        loss = ProbabilityRegularizer(permutations=20, seed=4, permutation_chunk=chunk).terms(z).loss
        loss.sum().backward()
        results.append((loss.detach(), z.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        torch.testing.assert_close(grad, results[0][1])
    with torch.no_grad():
        torch.testing.assert_close(ProbabilityRegularizer(permutations=20, seed=4).terms(x).loss, results[0][0])


@pytest.mark.parametrize("shape,k", [((4, 8, 8), 1), ((4, 16, 16), 2), ((3, 5, 7), 1), ((16, 8, 8), 3),
                                     ((4, 72, 72), 1), ((8, 64, 64), 1)])  # the last two: split Gram
@pytest.mark.parametrize("kind", ["normal", "scaled", "shifted"])
def test_matches_independent_formula(shape, k, kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2,) + shape, generator=g, dtype=torch.float64)
    if kind == "scaled":
        x = x * 1.5
    if kind == "shifted":
        x = x + 0.3
    flat = x.reshape(2, -1)
    ours = ProbabilityRegularizer(k=k, permutations=0).terms(flat).loss
    for b in range(2):
        ref = paper_penalty(flat[b].numpy(), k)
        assert abs(ours[b].item() - ref) <= 1e-5 * abs(ref), (ours[b].item(), ref)


def test_deterministic_without_permutations_and_seeded_with():
    x = torch.randn(2, 4096)
    r0 = ProbabilityRegularizer(k=1, permutations=0)
    assert torch.equal(r0.terms(x).loss, r0.terms(x).loss)
    r5 = ProbabilityRegularizer(k=1, permutations=5, seed=3)
    assert torch.equal(r5.terms(x).loss, r5.terms(x).loss)


def test_minimal_for_normal_noise_and_grows_off_distribution():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4 * 64 * 64, generator=g)
    reg = ProbabilityRegularizer(k=1, permutations=4)
    floor = 4 * math.log(2)
    base = reg.terms(z)
    assert floor - 1e-6 <= base.loss.item() < floor + 0.5
    assert base.probability.item() == pytest.approx(1.0)
    corr = z.clone()
    corr[:, 1::2] = corr[:, ::2]                       # neighbours equal: correlated blocks
    for name, bad in {"scaled": z * 1.2, "shifted": z + 0.1, "correlated": corr}.items():
        t = reg.terms(bad)
        assert t.loss.item() > floor + 1.0, name
        assert t.probability.item() < 0.5, name


def spikes_the_sequential_split_cannot_see(numbers: int = 4 * 32 * 32, per_position: int = 4) -> torch.Tensor:
    """(1, numbers) noise whose sequential blocks of 4 have exactly mean 0 and covariance I: all zeros
    but ``per_position`` spikes at each of the 4 block positions, one spike per block, half of them
    positive, of size sqrt(n / per_position). Far from N(0, I) (mostly zeros), yet the sequential
    split's bounds are both at their cap."""
    n = numbers // 4
    z = torch.zeros(numbers, dtype=torch.float64)
    blocks = torch.randperm(n, generator=torch.Generator().manual_seed(3))[: 4 * per_position].tolist()
    for i, block in enumerate(blocks):
        position, sign = i % 4, 1.0 if (i // 4) % 2 == 0 else -1.0
        z[4 * block + position] = sign * math.sqrt(n / per_position)
    return z[None]


def test_permutations_catch_structure_the_sequential_split_misses():
    z = spikes_the_sequential_split_cannot_see()
    blocks = z[0].view(-1, 4)
    torch.testing.assert_close(blocks.mean(0), torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(blocks.T @ blocks / blocks.shape[0], torch.eye(4, dtype=torch.float64))
    floor = 2 * math.log(2)                                     # one split at both caps
    seq = ProbabilityRegularizer(k=1, permutations=0).terms(z).loss.item()
    assert seq == pytest.approx(floor, abs=1e-6) and paper_penalty(z[0].numpy(), 1) == pytest.approx(floor)
    # Shuffled, the spikes fall into blocks unevenly: the covariance of the permuted blocks is far
    # from I. The permuted term is the paper's formula, in numpy, on the noise under each of the
    # regulariser's seeded permutations (permutation j drawn from seed * 1_000_003 + j), averaged.
    seed, permutations = 7, 8
    both = ProbabilityRegularizer(k=1, permutations=permutations, seed=seed).terms(z).loss.item()
    perms = [torch.randperm(z.shape[1], generator=torch.Generator().manual_seed(seed * 1_000_003 + j)).numpy()
             for j in range(permutations)]
    permuted = float(np.mean([paper_penalty(z[0].numpy()[p], 1) for p in perms]))
    assert both == pytest.approx(seq + permuted, rel=1e-5)
    assert permuted > 5 * floor, permuted


def test_gradient_pushes_back_toward_the_shell():
    z = (torch.randn(1, 4096) * 1.3).requires_grad_(True)
    ProbabilityRegularizer(k=1).terms(z).loss.sum().backward()
    # descending the penalty shrinks an inflated noise
    assert (z.grad * z).sum() > 0
