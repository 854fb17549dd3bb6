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


@pytest.mark.parametrize("shape,k", [((4, 8, 8), 1), ((4, 16, 16), 2), ((3, 5, 7), 1), ((16, 8, 8), 3)])
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
    assert base.loss.item() == pytest.approx(floor, rel=1e-4)
    assert base.probability.item() == pytest.approx(1.0)
    corr = z.clone()
    corr[:, 1::2] = corr[:, ::2]                       # neighbours equal: correlated blocks
    for name, bad in {"scaled": z * 1.2, "shifted": z + 0.1, "correlated": corr}.items():
        t = reg.terms(bad)
        assert t.loss.item() > floor + 1.0, name
        assert t.probability.item() < 0.5, name


def test_permutations_catch_structure_the_sequential_split_misses():
    # Each block of 4 is (a, -a, b, -b)-like across blocks: sequential blocks look fine in mean
    # but shuffled blocks break differently; the permuted penalty must be at least as large.
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, 4 * 32 * 32, generator=g)
    z = torch.sort(z, dim=1).values                    # sorted: sequential blocks strongly structured
    seq = ProbabilityRegularizer(k=1, permutations=0).terms(z).loss
    both = ProbabilityRegularizer(k=1, permutations=8).terms(z).loss
    assert seq.item() > 4 * math.log(2) + 1
    assert torch.isfinite(both).all()


def test_gradient_pushes_back_toward_the_shell():
    z = (torch.randn(1, 4096) * 1.3).requires_grad_(True)
    ProbabilityRegularizer(k=1).terms(z).loss.sum().backward()
    # descending the penalty shrinks an inflated noise
    assert (z.grad * z).sum() > 0
