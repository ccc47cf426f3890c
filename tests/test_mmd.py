"""tuner.vae.mmd: the IMQ-kernel MMD against a direct O(n^2) loop in numpy, per slot with padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tuner.vae.mmd import mmd


def _mmd_numpy(a: np.ndarray, b: np.ndarray) -> float:
    """The V-statistic written out pair by pair: k(x, y) = C / (C + |x - y|^2), C = 2 d."""
    c = 2.0 * a.shape[1]

    def mean_k(u: np.ndarray, v: np.ndarray) -> float:
        total = 0.0
        for x in u:
            for y in v:
                total += c / (c + float(np.sum((x - y) ** 2)))
        return total / (len(u) * len(v))

    return mean_k(a, a) + mean_k(b, b) - 2.0 * mean_k(a, b)


def test_mmd_matches_the_pairwise_sum_per_slot_and_ignores_padding() -> None:
    rng = np.random.default_rng(0)
    n, zmax, sizes = 17, 6, (6, 3)
    q = rng.normal(0.5, 0.7, size=(2, n, zmax)).astype(np.float32)
    p = rng.normal(0.0, 1.0, size=(2, n, zmax)).astype(np.float32)
    q[1, :, 3:] = p[1, :, 3:] = 0.0  # slot 1 has 3 real dims; padding is 0 in both
    got = mmd(torch.from_numpy(q), torch.from_numpy(p), torch.tensor(sizes, dtype=torch.float32))
    for s, d in enumerate(sizes):
        want = _mmd_numpy(q[s, :, :d].astype(np.float64), p[s, :, :d].astype(np.float64))
        assert float(got[s]) == pytest.approx(want, rel=1e-4, abs=1e-6)
        assert want > 0.01  # shifted and narrower: clearly apart
    # a slot alone, at its own width, gives the same value as padded in the population
    alone = mmd(torch.from_numpy(q[1:, :, :3]), torch.from_numpy(p[1:, :, :3]), torch.tensor([3.0]))
    assert float(alone[0]) == pytest.approx(float(got[1]), rel=1e-6)


def test_mmd_is_zero_for_identical_samples_and_small_for_two_draws_of_one_law() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1, 64, 8, generator=g)
    assert float(mmd(a, a.clone(), torch.tensor([8.0]))) == 0.0
    same_law = mmd(a, torch.randn(1, 64, 8, generator=g), torch.tensor([8.0]))
    shifted = mmd(a, torch.randn(1, 64, 8, generator=g) + 1.0, torch.tensor([8.0]))
    assert 0.0 <= float(same_law) < 0.03 and float(shifted) > 5 * float(same_law)


def test_mmd_gradient_moves_the_samples_towards_the_prior() -> None:
    g = torch.Generator().manual_seed(2)
    q = (0.1 * torch.randn(1, 64, 4, generator=g) + 2.0).requires_grad_()  # a narrow clump away from 0
    p = torch.randn(1, 64, 4, generator=g)
    before = mmd(q, p, torch.tensor([4.0]))
    before.sum().backward()
    after = mmd((q - 0.5 * q.grad / q.grad.norm()).detach(), p, torch.tensor([4.0]))
    assert float(after) < float(before.detach())
