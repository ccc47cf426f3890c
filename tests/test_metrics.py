"""tuner.vae.metrics on a population of linear Gaussian VAEs, whose exact log p(x) is known.

Model per slot s: z ~ N(0, I), x | z ~ N(z @ W_s + b_s, diag(sigma2_s)), so x ~ N(b_s, W_s^T W_s +
diag(sigma2_s)); encoder mu = x @ A_s + a_s with a fixed per-dim logvar. With A, a, logvar set
from the exact posterior the ELBO is nearly tight; perturbing them opens a gap for IWAE to close.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import Tensor

from tuner.errors import TunerError
from tuner.vae import noise
from tuner.vae.metrics import (
    COLLAPSE_KL_NATS,
    COLLAPSE_MI_NATS,
    Evaluation,
    active_units,
    collapse_verdict,
    evaluate,
    gaussian_kl_per_dim,
    iwae_nll,
    log_normal,
    mutual_info,
)

LOG_2PI = math.log(2.0 * math.pi)


class LinearGaussianVAE(torch.nn.Module):
    """Population-shaped linear Gaussian VAE with the interface tuner.vae.metrics uses."""

    def __init__(self, A: Tensor, a: Tensor, logvar: Tensor, W: Tensor, b: Tensor,
                 sigma2: Tensor, latent_mask: Tensor) -> None:
        super().__init__()
        # A (S, D, Z), a (S, Z), logvar (S, Z), W (S, Z, D), b (S, D), sigma2 (S, D), mask (S, Z)
        self.A, self.a, self.logvar, self.W, self.b, self.sigma2 = A, a, logvar, W, b, sigma2
        self.latent_mask = latent_mask.float()
        self.slots, self.latent_max = latent_mask.shape

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mask = self.latent_mask[:, None]
        mu = (torch.bmm(x, self.A) + self.a[:, None]) * mask
        return mu, self.logvar[:, None].expand_as(mu) * mask

    def decode(self, z: Tensor) -> Tensor:
        return torch.bmm(z * self.latent_mask[:, None], self.W) + self.b[:, None]

    def log_likelihood(self, x: Tensor, params: Tensor) -> Tensor:
        v = self.sigma2[:, None]
        return (-0.5 * (LOG_2PI + v.log() + (x - params).square() / v)).sum(-1)

    def exact_nll(self, x: Tensor) -> Tensor:
        """(S,) -log p(x) data mean, from x ~ N(b, W^T W + diag(sigma2)) (float64)."""
        out = []
        for s in range(self.slots):
            W = (self.W[s] * self.latent_mask[s][:, None]).double()
            cov = W.T @ W + torch.diag(self.sigma2[s].double())
            mvn = torch.distributions.MultivariateNormal(self.b[s].double(), cov)
            out.append(-mvn.log_prob(x.double()).mean())
        return torch.stack(out).float()

    def exact_neg_elbo(self, x: Tensor) -> Tensor:
        """(S,) -ELBO data mean in closed form: E_q log p(x|z) is a Gaussian expectation."""
        out = []
        for s in range(self.slots):
            mask, v = self.latent_mask[s], self.sigma2[s]
            mu = (x @ self.A[s] + self.a[s]) * mask  # (N, Z)
            var = self.logvar[s].exp() * mask  # (Z,)
            mean = mu @ self.W[s] + self.b[s]  # (N, D)
            # E_q (x - W^T z - b)^2 = (x - W^T mu - b)^2 + sum_z W_zd^2 var_z
            spread = (self.W[s].square() * var[:, None]).sum(0)  # (D,)
            recon = 0.5 * (LOG_2PI + v.log() + ((x - mean).square() + spread) / v).sum(-1)
            kl = 0.5 * (mu.square() + var - mask - self.logvar[s] * mask).sum(-1)
            out.append((recon + kl).mean())
        return torch.stack(out)

    def select(self, slots: list[int]) -> LinearGaussianVAE:
        p = [t[slots] for t in (self.A, self.a, self.logvar, self.W, self.b, self.sigma2)]
        return LinearGaussianVAE(*p, self.latent_mask[slots])


def make_model(seed: int, slots: int, d: int, z: int, *, gap: float = 0.0,
               latent_mask: Tensor | None = None) -> LinearGaussianVAE:
    """Random decoder; encoder = the mean-field exact posterior, perturbed by `gap`."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(slots, z, d, generator=g)
    b = 0.5 * torch.randn(slots, d, generator=g)
    sigma2 = 0.3 + torch.rand(slots, d, generator=g)
    mask = torch.ones(slots, z) if latent_mask is None else latent_mask.float()
    A, logvar = torch.zeros(slots, d, z), torch.zeros(slots, z)
    for s in range(slots):
        Wm = W[s] * mask[s][:, None]  # only the slot's active dims exist
        cov = torch.linalg.inv(torch.eye(z) + (Wm / sigma2[s]) @ Wm.T)  # posterior covariance
        A[s] = (Wm / sigma2[s]).T @ cov * mask[s]
        logvar[s] = cov.diagonal().log()
    A = A * (1.0 - gap)
    a = -torch.einsum("sd,sdz->sz", b, A)
    return LinearGaussianVAE(A, a, logvar + gap, W, b, sigma2, mask)


def sample_data(model: LinearGaussianVAE, n: int, seed: int, slot: int = 0) -> Tensor:
    """n examples (n, D) from slot `slot`'s generative model."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, model.latent_max, generator=g) * model.latent_mask[slot]
    eps = torch.randn(n, model.b.shape[1], generator=g)
    return z @ model.W[slot] + model.b[slot] + eps * model.sigma2[slot].sqrt()


def key(slots: int, seed: int = 0) -> Tensor:
    return noise.keys_from_seeds(torch.full((slots,), seed, dtype=torch.int64))


# ---------------------------------------------------------------------------------- pure pieces


def test_gaussian_kl_and_log_normal_match_hand_values():
    mu = torch.tensor([0.0, 1.0, 0.0, -2.0])
    logvar = torch.tensor([0.0, 0.0, math.log(2.0), math.log(0.5)])
    # 0.5 * (mu^2 + var - 1 - log var) by hand
    want = torch.tensor([0.0, 0.5, 0.5 * (1.0 - math.log(2.0)), 0.5 * (4.0 - 0.5 + math.log(2.0))])
    torch.testing.assert_close(gaussian_kl_per_dim(mu, logvar), want)
    assert gaussian_kl_per_dim(torch.zeros(3), torch.zeros(3)).eq(0.0).all()  # masked dims: exact 0

    z = torch.tensor([0.3, -1.0, 2.0, 0.0])
    ref = torch.distributions.Normal(mu, (0.5 * logvar).exp()).log_prob(z)
    torch.testing.assert_close(log_normal(z, mu, logvar), ref)


def test_active_units_counts_dims_with_variance_above_threshold():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 4000, 5, generator=g)
    base = (base - base.mean(1, keepdim=True)) / base.std(1, correction=0, keepdim=True)  # var 1
    # per-dim std 0.2 (var 0.04, active), 0.05 (0.0025), 0 (constant), 1, 0.11 (0.0121, active)
    mu = base * torch.tensor([0.2, 0.05, 0.0, 1.0, 0.11]) + 3.0
    mask = torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 1, 0, 1]])  # slot 1 has dim 3 masked off
    assert active_units(mu, mask).tolist() == [3, 2]
    assert active_units(mu, mask).dtype == torch.int64
    assert active_units(mu, mask, threshold=0.05).tolist() == [1, 0]


@pytest.mark.parametrize(
    ("kl", "au", "informative", "mi", "collapsed"),
    [
        (13.2, 28, 20, 5.0, False),  # healthy z32 VAE
        (1.5, 17, 3, 1.3, True),  # beta = 8: 17 "active" units but 1.5 nats in total
        (0.14, 7, 1, 0.1, True),  # posterior collapse
        (3.0, 0, 0, 3.0, True),  # no informative unit
        (float("nan"), 10, 5, 4.0, True),  # a broken slot is never "healthy"
    ],
)
def test_collapse_verdict_on_measured_cases(kl, au, informative, mi, collapsed):
    del au  # the verdict deliberately ignores the active-unit count
    verdict = collapse_verdict(torch.tensor([kl]), torch.tensor([mi]), torch.tensor([informative]))
    assert verdict.dtype == torch.bool
    assert verdict.tolist() == [collapsed]


def test_collapse_verdict_thresholds_are_inclusive_and_vectorized():
    kl = torch.tensor([COLLAPSE_KL_NATS, COLLAPSE_KL_NATS - 1e-3, 5.0, 5.0])
    mi = torch.tensor([COLLAPSE_MI_NATS, 5.0, COLLAPSE_MI_NATS - 1e-3, 5.0])
    informative = torch.tensor([1, 1, 1, 0])
    assert collapse_verdict(kl, mi, informative).tolist() == [False, True, True, True]


# -------------------------------------------------------------------------------------- IWAE


def test_neg_elbo_and_iwae_k1_match_the_closed_form_neg_elbo():
    model = make_model(seed=1, slots=2, d=6, z=3, gap=0.3)
    x = sample_data(model, 2000, seed=3)
    exact_elbo = model.exact_neg_elbo(x)  # [11.63, 22.64]
    exact_nll = model.exact_nll(x)  # [10.23, 21.88]
    assert ((exact_elbo - exact_nll) > 0.7).all()  # a gap far above the tolerances below
    ev = evaluate(model, x, k=1, seed=0, batch_size=500)
    # one-sample recon noise only (sd ~0.03 at N=2000); the KL is analytic
    torch.testing.assert_close(ev.neg_elbo, exact_elbo, atol=0.12, rtol=0)
    # K=1 is the single-sample -ELBO estimator: equal in expectation (mean of 8 keys, sd ~0.01)
    iw1 = torch.stack([iwae_nll(model, x, 1, key(2, seed), batch_size=500) for seed in range(8)])
    torch.testing.assert_close(iw1.mean(0), exact_elbo, atol=0.04, rtol=0)
    torch.testing.assert_close(ev.iwae_nll, exact_elbo, atol=0.12, rtol=0)


def test_iwae_bounds_tighten_with_k_towards_exact_nll():
    model = make_model(seed=1, slots=2, d=6, z=3, gap=0.3)
    x = sample_data(model, 200, seed=2)
    neg_elbo, exact = model.exact_neg_elbo(x), model.exact_nll(x)
    # one key for every K: sample k of example i is the same draw, so bounds at larger K
    # reuse the smaller K's samples and the comparisons below are not dominated by MC noise
    iw = {k: iwae_nll(model, x, k, key(2)) for k in (1, 10, 100, 1000)}
    tol = 0.02

    assert (iw[1] - iw[10] > 0.5).all() and (iw[10] - iw[100] > 0.03).all()
    assert (iw[100] >= iw[1000] - tol).all()
    assert (iw[10] < neg_elbo).all()  # IWAE <= -ELBO
    assert (iw[1000] >= exact - tol).all()  # still a bound on -log p(x)
    torch.testing.assert_close(iw[1000], exact, atol=0.02, rtol=0)
    assert ((iw[1000] - exact) < 0.02 * (neg_elbo - exact)).all()  # the gap is closed


def test_iwae_with_the_exact_posterior_is_exact_for_any_k():
    # one latent dim: the mean-field posterior is the exact posterior, so p(x, z) / q(z|x) = p(x)
    model = make_model(seed=3, slots=1, d=4, z=1)
    x = sample_data(model, 5000, seed=4)
    exact = model.exact_nll(x)
    for k in (1, 7):
        torch.testing.assert_close(iwae_nll(model, x, k, key(1)), exact, atol=1e-4, rtol=0)
    ev = evaluate(model, x, k=3, batch_size=1000)
    torch.testing.assert_close(ev.iwae_nll, exact, atol=1e-4, rtol=0)
    torch.testing.assert_close(ev.neg_elbo, exact, atol=0.03, rtol=0)  # one-sample recon noise


def direct_iwae_nll(model: LinearGaussianVAE, x: Tensor, k: int, key: Tensor) -> Tensor:
    """Per slot, per example, per sample loop in float64 with torch.distributions."""
    out = []
    for s in range(model.slots):
        m = model.latent_mask[s].bool()
        total = 0.0
        for i in range(x.shape[0]):
            xi = x[i].double()
            mu = xi @ model.A[s].double() + model.a[s].double()
            std = (0.5 * model.logvar[s].double()).exp()
            log_w = []
            for j in range(k):
                eps = noise.normal(noise.derive(key[s : s + 1], i, j), (model.latent_max,))[0]
                z = (mu + std * eps.double())[m]
                q = torch.distributions.Normal(mu[m], std[m]).log_prob(z).sum()
                p_z = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum()
                mean = z @ model.W[s].double()[m] + model.b[s].double()
                p_x = torch.distributions.Normal(mean, model.sigma2[s].double().sqrt()).log_prob(xi)
                log_w.append(p_x.sum() + p_z - q)
            total -= torch.logsumexp(torch.stack(log_w), 0).item() - math.log(k)
        out.append(total / x.shape[0])
    return torch.tensor(out, dtype=torch.float32)


def test_batched_chunked_iwae_matches_direct_loop():
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    model = make_model(seed=5, slots=2, d=4, z=3, gap=0.4, latent_mask=mask)
    x = sample_data(model, 7, seed=6)
    keys = noise.derive(key(2), 42)
    want = direct_iwae_nll(model, x, 5, keys)
    # batch 3 of 7 (a ragged last batch) and K=5 in chunks of 2, 2, 1
    got = iwae_nll(model, x, 5, keys, batch_size=3, max_elements=2 * 2 * 3 * 4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # noise is per (example, sample): batch size and chunking do not change the value
    torch.testing.assert_close(iwae_nll(model, x, 5, keys, batch_size=7), got, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ KL and masking


def test_kl_per_dim_matches_hand_computation():
    model = make_model(seed=7, slots=2, d=5, z=3, gap=0.2)
    x = sample_data(model, 60, seed=8)
    ev = evaluate(model, x, k=2, batch_size=16)
    for s in range(2):
        mu = x @ model.A[s] + model.a[s]  # (N, Z)
        lv = model.logvar[s]
        want = (0.5 * (mu**2 + lv.exp() - 1.0 - lv)).mean(0)
        torch.testing.assert_close(ev.kl_per_dim[s], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ev.kl, ev.kl_per_dim.sum(-1))
    torch.testing.assert_close(ev.neg_elbo, ev.recon + ev.kl)
    informative = (ev.kl_per_dim >= 0.1).sum(-1)
    assert ev.informative_units.tolist() == informative.tolist()


def test_masked_dims_give_zero_and_change_nothing_else():
    small = make_model(seed=9, slots=1, d=5, z=3, gap=0.3)
    x = sample_data(small, 40, seed=10)
    # the same slot padded to Zmax = 5 with garbage parameters on the 2 masked dims
    torch.manual_seed(0)

    def pad(t: Tensor, dim: int) -> Tensor:
        return torch.cat([t, 50.0 * torch.randn(*t.shape[:dim], 2, *t.shape[dim + 1 :])], dim)

    big = LinearGaussianVAE(
        pad(small.A, 2), pad(small.a, 1), pad(small.logvar, 1), pad(small.W, 1), small.b,
        small.sigma2, torch.tensor([[1.0, 1, 1, 0, 0]]),
    )
    ev_small, ev_big = evaluate(small, x, k=20), evaluate(big, x, k=20)
    assert ev_big.kl_per_dim[0, 3:].eq(0.0).all()
    torch.testing.assert_close(ev_big.kl_per_dim[:, :3], ev_small.kl_per_dim, atol=1e-5, rtol=1e-5)
    for name in ("neg_elbo", "recon", "kl", "iwae_nll", "mutual_info", "inactive_fraction"):
        torch.testing.assert_close(getattr(ev_big, name), getattr(ev_small, name),
                                   atol=1e-5, rtol=1e-5)
    for name in ("active_units", "informative_units", "collapsed"):
        assert getattr(ev_big, name).tolist() == getattr(ev_small, name).tolist()
    assert ev_big.slot(0)["kl_per_dim"] == pytest.approx(ev_small.slot(0)["kl_per_dim"], abs=1e-5)


# ------------------------------------------------------------------------------ mutual information


def test_mutual_info_zero_when_encoder_ignores_x_and_bounded_by_log_n():
    model = make_model(seed=11, slots=3, d=6, z=4)
    x = sample_data(model, 300, seed=12)
    model.A[0] = 0.0  # slot 0 ignores x: q(z|x) = q(z)
    model.A[2] *= 30.0  # slot 2: posterior means far apart relative to their spread
    model.logvar[2] = -6.0
    mi = mutual_info(model, x, key(3), batch_size=64, max_elements=3 * 50 * 300 * 4)
    assert abs(mi[0].item()) < 1e-5
    assert mi[1].item() > 1.0
    assert math.log(300) - 0.05 < mi[2].item() <= math.log(300) + 1e-5  # saturates at log N
    # chunking and batching do not change it
    torch.testing.assert_close(mutual_info(model, x, key(3), batch_size=300), mi, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------- evaluate


def test_slot_metrics_do_not_depend_on_the_population():
    pop = make_model(seed=13, slots=3, d=6, z=4, gap=0.3, latent_mask=torch.tensor(
        [[1.0, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]))
    x = sample_data(pop, 64, seed=14, slot=1)
    ev_pop = evaluate(pop, x, k=30, seed=5, batch_size=20)
    ev_alone = evaluate(pop.select([1]), x, k=30, seed=5, batch_size=20)
    for name in ("neg_elbo", "recon", "kl", "kl_per_dim", "iwae_nll", "mutual_info",
                 "inactive_fraction"):
        torch.testing.assert_close(getattr(ev_pop, name)[1:2], getattr(ev_alone, name),
                                   atol=1e-5, rtol=1e-5)
    for name in ("active_units", "informative_units", "collapsed"):
        assert getattr(ev_pop, name)[1:2].tolist() == getattr(ev_alone, name).tolist()
    row_pop, row_alone = ev_pop.slot(1), ev_alone.slot(0)
    assert row_pop.pop("kl_per_dim") == pytest.approx(row_alone.pop("kl_per_dim"), abs=1e-5)
    assert row_pop == pytest.approx(row_alone, abs=1e-5)
    # and a different seed gives different (but close) stochastic metrics
    other = evaluate(pop.select([1]), x, k=30, seed=6, batch_size=20)
    assert other.iwae_nll.item() != ev_alone.iwae_nll.item()
    assert abs(other.iwae_nll.item() - ev_alone.iwae_nll.item()) < 0.1


def test_evaluation_slot_is_plain_json():
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    model = make_model(seed=15, slots=2, d=6, z=4, gap=0.2, latent_mask=mask)
    x = sample_data(model, 32, seed=16)
    ev = evaluate(model, x, k=4)
    assert isinstance(ev, Evaluation) and ev.iwae_k == 4
    for s, size in ((0, 4), (1, 2)):
        row = ev.slot(s)
        back = json.loads(json.dumps(row))
        assert back == row
        assert len(row["kl_per_dim"]) == size and row["latent_size"] == size
        assert type(row["collapsed"]) is bool and type(row["active_units"]) is int
        assert type(row["neg_elbo"]) is float
        assert row["inactive_fraction"] == pytest.approx(1.0 - row["active_units"] / size)
        assert row["kl"] == pytest.approx(sum(row["kl_per_dim"]), abs=1e-4)
    assert ev.collapsed.dtype == torch.bool and ev.active_units.dtype == torch.int64
    assert all(t.device.type == "cpu" for t in (ev.neg_elbo, ev.kl_per_dim, ev.mutual_info))


def test_evaluate_restores_training_mode_and_rejects_bad_arguments():
    model = make_model(seed=17, slots=1, d=3, z=2)
    x = sample_data(model, 10, seed=18)
    model.train()
    evaluate(model, x, k=2)
    assert model.training
    with pytest.raises(TunerError, match="k=0"):
        evaluate(model, x, k=0)
    with pytest.raises(TunerError, match="N=5"):
        evaluate(model, x[:5], k=2)  # log 5 < COLLAPSE_MI_NATS: the verdict would be meaningless
    with pytest.raises(TunerError, match="shape"):
        iwae_nll(model, x[0], 2, key(1))


# ---- on real trained VAEs (the population engine, the bundled MNIST subset) --------------------


@pytest.fixture(scope="module")
def trained_betas():
    """MLP VAEs (z=32, h=512) trained 12 epochs with beta 1, 8 and 20, as one population of 3."""
    from tuner.spec import parse_config
    from tuner.vae.data import load_splits
    from tuner.vae.engine import Population

    configs = [
        parse_config({"seed": 0, "model": {"latent": 32, "hidden": 512}, "optim": {"batch_size": 128},
                      "kl": {"schedule": "constant", "beta": beta}, "train": {"epochs": 12}})
        for beta in (1.0, 8.0, 20.0)
    ]
    splits = load_splits(configs[0].data, 128)
    pop = Population.for_configs(configs, splits)
    while pop.running():
        pop.run_epoch()
    return pop, splits


def test_collapse_verdict_on_trained_vaes(trained_betas) -> None:
    """The forced cases of the issue: beta=8 keeps many 'active' units yet carries ~1 nat: collapsed."""
    pop, splits = trained_betas
    result = [evaluate(pop.slot_model(s), splits.test[:500], k=10, seed=0).slot(0) for s in range(3)]
    beta1, beta8, beta20 = result
    assert not beta1["collapsed"] and beta1["kl"] > 8 and beta1["mutual_info"] > 4
    assert beta8["collapsed"] and beta8["kl"] < COLLAPSE_KL_NATS
    assert beta8["active_units"] >= 8  # the variance-based count alone would call it healthy
    assert beta20["collapsed"] and beta20["kl"] < 0.5 and beta20["informative_units"] == 0


def test_iwae_on_a_trained_vae_is_below_elbo_and_tightens(trained_betas) -> None:
    pop, splits = trained_betas
    model, x = pop.slot_model(0), splits.test[:200]
    key = noise.keys_from_seeds(torch.tensor([3]))
    elbo = evaluate(model, x, k=1, seed=3).neg_elbo[0]
    nll = [float(iwae_nll(model, x, k, key)[0]) for k in (1, 10, 100)]
    assert nll[0] == pytest.approx(float(elbo), abs=1.5)  # K=1 is the single-sample -ELBO estimate
    assert nll[0] > nll[1] > nll[2]
    assert nll[0] - nll[2] > 2.0  # a real model's bound tightens by nats, not noise


def test_recon_averages_the_iwae_draws_so_its_seed_to_seed_spread_shrinks(tiny, splits_for) -> None:
    """Test recon and -ELBO come from the K draws the IWAE pass makes, not from one: across seeds
    their spread falls roughly as 1/sqrt(K) (measured: one draw's sd on MNIST was 0.15-0.3 nats)."""
    from tuner.vae.engine import Population

    config = tiny(train={"epochs": 2})
    pop = Population.for_configs([config], splits_for(config))
    while pop.running():
        pop.run_epoch()
    model, x = pop.slot_model(0), pop.splits.test[:100]

    def spread(k: int) -> float:
        return torch.tensor([evaluate(model, x, k=k, seed=s).slot(0)["recon"] for s in range(6)]).std().item()

    one, many = spread(1), spread(64)
    assert many < one / 3, (one, many)
