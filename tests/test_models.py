"""tuner.vae.models: the training step's objectives against torch.distributions: the k-draw -ELBO
(validation's estimate) and the IWAE bound (train.objective iwae), with the KL weight in the weights."""

from __future__ import annotations

import math

import torch
from torch.distributions import Bernoulli, Normal

from tuner.vae import noise
from tuner.vae.engine import Population
from tuner.vae.models import _STREAM_EPS


def _tiny_model(tiny, splits_for, **over):
    config = tiny(**over)
    pop = Population.for_configs([config], splits_for(config))
    pop.run_epoch()  # trained a little: posteriors away from the prior
    return pop, pop.splits.val[:16].unsqueeze(0)  # (1, 16, D)


def _log_weights(model, x: torch.Tensor, key: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ll, log p(z), log q(z|x)), each (k, B), for the draws forward() makes, by torch.distributions."""
    mu, logvar = model.encode(x)  # (1, B, Z); dropout off in eval
    z_dims = int(model.latent_mask[0].sum())
    mu, std = mu[0, :, :z_dims], torch.exp(0.5 * logvar[0, :, :z_dims])
    eps = noise.normal(noise.derive(key, _STREAM_EPS), (k, x.shape[1], model.latent_max))[0, :, :, :z_dims]
    z = mu + std * eps  # (k, B, z)
    zp = torch.zeros(k, x.shape[1], model.latent_max)
    zp[..., :z_dims] = z
    logits = model.decode(zp.reshape(1, -1, model.latent_max))[0].view(k, x.shape[1], -1)
    ll = Bernoulli(logits=logits).log_prob(x[0].expand_as(logits)).sum(-1)
    return ll, Normal(0.0, 1.0).log_prob(z).sum(-1), Normal(mu, std).log_prob(z).sum(-1)


def test_iwae_loss_is_the_k_draw_bound_with_the_kl_weight_in_its_weights(tiny, splits_for) -> None:
    pop, x = _tiny_model(tiny, splits_for)
    model, key, k = pop.model.eval(), torch.tensor([12345]), 7
    ones, zeros = torch.ones(1), torch.zeros(1)
    ll, log_p, log_q = _log_weights(model, x, key, k)
    with torch.no_grad():
        for w in (1.0, 0.3):
            out = model(x, key, ones * w, zeros, zeros, samples=k, iwae=True)
            log_w = ll - w * (log_q - log_p)
            expected = -(torch.logsumexp(log_w, dim=0) - math.log(k)).mean()
            assert torch.allclose(out.loss, expected.reshape(1), rtol=1e-5, atol=1e-4), (w, out.loss, expected)
        # the reported terms are the k draws' means; the IWAE bound is below the -ELBO's mean (Jensen)
        assert torch.allclose(out.recon, -ll.mean().reshape(1), rtol=1e-5, atol=1e-4)
        assert torch.allclose(out.kl, (log_q - log_p).mean().reshape(1), rtol=1e-5, atol=1e-3)
        full = model(x, key, ones, zeros, zeros, samples=k, iwae=True)
        assert full.loss < full.neg_elbo


def test_k_draw_elbo_is_the_mean_of_its_draws(tiny, splits_for) -> None:
    """Validation's estimate: k draws per example, analytic KL; the loss keeps the KL schedule."""
    pop, x = _tiny_model(tiny, splits_for)
    model, key, k = pop.model.eval(), torch.tensor([7]), 4
    ll, _, _ = _log_weights(model, x, key, k)
    with torch.no_grad():
        out = model(x, key, torch.ones(1), torch.zeros(1), torch.zeros(1), samples=k)
        one = model(x, key, torch.ones(1), torch.zeros(1), torch.zeros(1))  # the one-draw training step
    assert torch.allclose(out.recon, -ll.mean().reshape(1), rtol=1e-5, atol=1e-4)
    assert torch.allclose(out.kl, one.kl)  # the closed form's KL is analytic: no draw in it
    assert torch.allclose(out.loss, out.neg_elbo)  # beta 1, no free bits, no capacity


def test_an_iwae_population_trains_and_a_slot_matches_it_alone(tiny, splits_for) -> None:
    configs = [tiny(seed=1, train={"objective": "iwae", "k": 3}), tiny(seed=2, train={"objective": "iwae", "k": 3},
                                                                       model={"latent": 4})]
    splits = splits_for(configs[0])
    together = Population.for_configs(configs, splits)
    assert together.shape.objective == "iwae" and together.shape.samples == 3
    alone = Population.for_configs([configs[1]], splits)
    for pop in (together, alone):
        while pop.running():
            pop.run_epoch()
    curve = [r["val_neg_elbo"] for r in together.state[1].history]
    assert curve == [r["val_neg_elbo"] for r in alone.state[0].history]  # bit for bit on the CPU
    assert all(math.isfinite(v) for v in curve) and curve[-1] < curve[0]
    assert Population.for_configs([tiny(train={"objective": "elbo", "k": 9})], splits).shape.samples == 1  # k ignored
