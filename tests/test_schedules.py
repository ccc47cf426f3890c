"""tuner.vae.schedules: each kind at chosen epochs against hand-computed values, mixed kinds, free bits."""

from __future__ import annotations

import math

import pytest
import torch

from tuner.vae.schedules import KL_SCHEDULES, LR_DECAYS, free_bits_kl, kl_capacity, kl_weight, learning_rate


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _kl(kind: str, epochs, beta=2.0, warmup=10.0, cycles=4.0, ratio=0.5, total=40.0) -> list[float]:
    """kl_weight at several epochs of one config (one slot per epoch)."""
    n = len(epochs)
    code = torch.full((n,), KL_SCHEDULES.index(kind), dtype=torch.int64)
    rep = lambda v: torch.full((n,), float(v))  # noqa: E731
    out = kl_weight(_t(*epochs), code, rep(beta), rep(warmup), rep(cycles), rep(ratio), rep(total))
    assert out.shape == (n,) and out.dtype == torch.float32
    return out.tolist()


def _lr(decay: str, epochs, lr=1e-3, warmup=2.0, total=12.0, min_ratio=0.1, step_epochs=3.0, gamma=0.5):
    n = len(epochs)
    code = torch.full((n,), LR_DECAYS.index(decay), dtype=torch.int64)
    rep = lambda v: torch.full((n,), float(v))  # noqa: E731
    args = (rep(total), rep(min_ratio), rep(step_epochs), rep(gamma))
    out = learning_rate(_t(*epochs), rep(lr), rep(warmup), code, *args)
    return out.tolist()


def test_constant_kl_weight_is_beta():
    assert _kl("constant", [0.0, 3.3, 100.0]) == pytest.approx([2.0, 2.0, 2.0])


def test_linear_kl_weight_ramps_to_beta():
    assert _kl("linear", [0.0, 2.5, 5.0, 10.0, 30.0]) == pytest.approx([0.0, 0.5, 1.0, 2.0, 2.0])
    assert _kl("linear", [0.0, 1.0], warmup=0.0) == pytest.approx([2.0, 2.0])  # no warmup


def test_sigmoid_kl_weight():
    logistic = lambda x: 2.0 / (1.0 + math.exp(-x))  # noqa: E731
    got = _kl("sigmoid", [0.0, 2.5, 5.0, 9.9, 10.0, 20.0])
    want = [logistic(-6.0), logistic(-3.0), 1.0, logistic(12 * (0.99 - 0.5)), 2.0, 2.0]
    assert got == pytest.approx(want, rel=1e-5)
    assert _kl("sigmoid", [0.0, 5.0], warmup=0.0) == pytest.approx([2.0, 2.0])


def test_cyclical_kl_weight_within_and_across_cycles():
    # total 40, 4 cycles -> period 10; ratio 0.5 -> rises over 5 epochs, flat for 5
    epochs = [0.0, 2.5, 5.0, 7.5, 9.99, 10.0, 12.5, 17.0, 30.0, 32.5, 41.0]
    want = [0.0, 1.0, 2.0, 2.0, 2.0, 0.0, 1.0, 2.0, 0.0, 1.0, 0.4]
    assert _kl("cyclical", epochs) == pytest.approx(want, abs=1e-5)
    # ratio 1: rises over the whole cycle
    assert _kl("cyclical", [2.5, 12.5], ratio=1.0) == pytest.approx([0.5, 0.5])


def test_capacity_weight_is_beta_and_target_grows():
    assert _kl("capacity", [0.0, 5.0, 50.0]) == pytest.approx([2.0, 2.0, 2.0])
    n = 4
    code = torch.full((n,), KL_SCHEDULES.index("capacity"), dtype=torch.int64)
    c = kl_capacity(_t(0.0, 2.5, 10.0, 20.0), code, torch.full((n,), 25.0), torch.full((n,), 10.0))
    assert c.tolist() == pytest.approx([0.0, 6.25, 25.0, 25.0])
    c0 = kl_capacity(_t(0.0), code[:1], _t(25.0), _t(0.0))  # warmup 0 -> full capacity
    assert c0.tolist() == pytest.approx([25.0])
    others = torch.tensor([0, 1, 2, 3], dtype=torch.int64)  # every non-capacity kind: C = 0
    c = kl_capacity(torch.full((4,), 5.0), others, torch.full((4,), 25.0), torch.full((4,), 10.0))
    assert c.tolist() == [0.0] * 4


def test_lr_warmup_then_constant():
    assert _lr("constant", [0.5, 1.0, 2.0, 50.0]) == pytest.approx([2.5e-4, 5e-4, 1e-3, 1e-3])
    assert _lr("constant", [0.0, 0.1], warmup=0.0) == pytest.approx([1e-3, 1e-3])


def test_lr_cosine_ends_at_min_lr():
    # warmup 2, total 12 -> cosine over 10 epochs from 1e-3 to 1e-4
    got = _lr("cosine", [1.0, 2.0, 7.0, 12.0, 20.0])
    assert got == pytest.approx([5e-4, 1e-3, 5.5e-4, 1e-4, 1e-4], rel=1e-5)
    quarter = 1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * 0.25))
    assert _lr("cosine", [4.5]) == pytest.approx([quarter], rel=1e-5)


def test_lr_step_decay():
    # warmup 2, then x0.5 every 3 epochs
    got = _lr("step", [1.0, 2.0, 4.9, 5.0, 8.0, 11.5])
    assert got == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4, 2.5e-4, 1.25e-4], rel=1e-5)


def test_mixed_kinds_equal_single_slot_calls():
    g = torch.Generator().manual_seed(0)
    s = 2 * len(KL_SCHEDULES)
    epoch = torch.rand(s, generator=g) * 30
    kind = torch.arange(s) % len(KL_SCHEDULES)
    beta = torch.rand(s, generator=g) * 4
    warmup = torch.tensor([0.0, 5.0] * len(KL_SCHEDULES))
    cycles = torch.randint(1, 5, (s,), generator=g).float()
    ratio = torch.rand(s, generator=g) * 0.9 + 0.1
    total = torch.full((s,), 30.0)
    capacity = torch.rand(s, generator=g) * 20
    together = kl_weight(epoch, kind, beta, warmup, cycles, ratio, total)
    together_c = kl_capacity(epoch, kind, capacity, warmup)
    for i in range(s):
        one = slice(i, i + 1)
        alone = kl_weight(epoch[one], kind[one], beta[one], warmup[one], cycles[one], ratio[one], total[one])
        assert together[i].item() == alone.item()
        assert together_c[i].item() == kl_capacity(epoch[one], kind[one], capacity[one], warmup[one]).item()

    s = 3 * len(LR_DECAYS)
    epoch = torch.rand(s, generator=g) * 20
    decay = torch.arange(s) % len(LR_DECAYS)
    args = (
        torch.rand(s, generator=g) * 1e-2,  # base_lr
        torch.tensor([0.0, 3.0, 10.0] * len(LR_DECAYS)),  # warmup
        decay,
        torch.full((s,), 20.0),  # total
        torch.rand(s, generator=g) * 0.5,  # min_lr_ratio
        torch.full((s,), 4.0),  # step_epochs
        torch.full((s,), 0.3),  # step_gamma
    )
    together = learning_rate(epoch, *args)
    for i in range(s):
        alone = learning_rate(epoch[i : i + 1], *(a[i : i + 1] for a in args))
        assert together[i].item() == alone.item()
    assert set(together.tolist()) != {together[0].item()}  # the kinds really differ


def test_free_bits_zero_is_plain_kl():
    kl = torch.rand(3, 16, 5, generator=torch.Generator().manual_seed(1)) * 2  # (S, B, Z) nats
    mask = torch.ones(3, 5)
    got = free_bits_kl(kl, torch.zeros(3), mask)
    torch.testing.assert_close(got, kl.sum(dim=2).mean(dim=1), atol=1e-6, rtol=0)


def test_free_bits_clamps_small_dims_and_ignores_masked_dims():
    # slot 0: batch means per dim [0.1, 1.0, 3.0]; slot 1: [0.2, 0.4, NaN] with the last dim masked
    kl = torch.tensor(
        [
            [[0.0, 0.5, 2.0], [0.2, 1.5, 4.0]],
            [[0.1, 0.0, float("nan")], [0.3, 0.8, float("nan")]],
        ]
    )  # (S=2, B=2, Z=3)
    free_bits = _t(0.5, 0.3)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    got = free_bits_kl(kl, free_bits, mask)
    assert got.tolist() == pytest.approx([0.5 + 1.0 + 3.0, 0.3 + 0.4])
    # a clamped dim gets no gradient; an unclamped one gets 1/B per example
    kl = kl.clone().requires_grad_(True)
    free_bits_kl(kl, free_bits, mask).sum().backward()
    assert kl.grad[0].tolist() == [[0.0, 0.5, 0.5], [0.0, 0.5, 0.5]]
    assert kl.grad[1].tolist() == [[0.0, 0.5, 0.0], [0.0, 0.5, 0.0]]
