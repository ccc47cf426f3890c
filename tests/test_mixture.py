"""The mixture-of-encoders posterior (``model.mixture``, tuner.vae.mixture; Kviman et al. 2023): its
log-density against torch.distributions, the stratified draws' weights, one component being today's
Gaussian VAE, slots of a population training as alone, checkpoint resume, `tuner train` + `load_run`
and the config's checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from population_runs import history, run
from test_families import train_one_epoch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from tuner.errors import TunerError
from tuner.spec import parse_config
from tuner.train import load_run
from tuner.vae import metrics
from tuner.vae.data import load_splits
from tuner.vae.engine import Population
from tuner.vae.mixture import pick, posterior_log_prob_dims, stratify
from tuner.vae.population import PopulationShape, build_vae


def test_mixture_log_density_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    s, b, m, z = 2, 5, 3, 4
    mu, logvar = torch.randn(s, b, m, z, generator=g), torch.randn(s, b, m, z, generator=g) * 0.5
    x = torch.randn(s, b, z, generator=g)
    mask = torch.ones(s, z)
    mask[1, 3] = 0.0  # slot 1 holds 3 latent dims
    got = posterior_log_prob_dims(x * mask[:, None], mu * mask[:, None, None], logvar * mask[:, None, None], mask)
    for slot, dims in ((0, 4), (1, 3)):
        q = MixtureSameFamily(
            Categorical(logits=torch.zeros(b, m)),
            Independent(Normal(mu[slot, ..., :dims], torch.exp(0.5 * logvar[slot, ..., :dims])), 1),
        )
        assert got[slot].sum(-1) == pytest.approx(q.log_prob(x[slot, :, :dims]), abs=1e-5)
    assert (got[1, :, 3] == 0).all()  # a padded dim adds exactly 0


def test_stratified_draws_cover_components_with_unbiased_weights() -> None:
    for k, m in ((200, 4), (7, 3), (5, 5)):
        eps, offset = stratify(torch.randn(1, k, 2, 1 + 3), torch.arange(k), k, m)
        comp = pick(eps, m)  # (1, k, 2)
        assert (comp[0, :, 0] == torch.arange(k) % m).all() and (comp[..., 0] == comp[..., 1]).all()
        assert torch.exp(offset).mean().item() == pytest.approx(1.0)  # weights average to 1 over k draws
        per_component = torch.zeros(m).index_add_(0, torch.arange(k) % m, torch.exp(offset))
        assert per_component == pytest.approx(torch.full((m,), k / m))  # each component weighs 1/M
    assert stratify(torch.randn(1, 2, 1, 4), torch.arange(2), 2, 3)[1] is None  # k < M: random components


def test_one_component_is_the_gaussian_vae_and_equal_components_give_its_density(tiny) -> None:
    plain, one = tiny(seed=3), tiny(seed=3, model={"mixture": 1})
    assert PopulationShape.of(plain) == PopulationShape.of(one)  # the same population, the same code
    two = build_vae(PopulationShape.of(tiny(model={"mixture": 2})), (1, 28, 28), 8, 64, "cpu", 1)
    two.init_slot(0, seed=3, latent=8, hidden=64, dropout=0.0)
    ref = build_vae(PopulationShape.of(plain), (1, 28, 28), 8, 64, "cpu", 1)
    ref.init_slot(0, seed=3, latent=8, hidden=64, dropout=0.0)
    common = {n for n, _ in ref.named_parameters()}
    assert all(torch.equal(p, dict(ref.named_parameters())[n]) for n, p in two.named_parameters() if n in common)
    with torch.no_grad():  # component 2 := component 1: the mixture is the Gaussian itself
        for i, layer in enumerate(two.mixture.hidden):
            layer.weight[0, 0].copy_(two.enc_hidden[i].weight[0])
            layer.bias[0, 0].copy_(two.enc_hidden[i].bias[0])
        for head, own in ((two.mixture.mu, two.enc_mu), (two.mixture.logvar, two.enc_logvar)):
            head.weight[0, 0].copy_(own.weight[0])
            head.bias[0, 0].copy_(own.bias[0])
    x = torch.rand(1, 16, 784).round()
    with torch.no_grad():
        local = two.local_posterior(x)
        z, log_ratio = two.sample(local, torch.randn(1, 16, 9))
        mu, logvar = ref.encode(x)
        log_q = Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
        log_p = Normal(0.0, 1.0).log_prob(z).sum(-1)
    assert log_ratio.sum(-1) == pytest.approx(log_q - log_p, abs=1e-4)


def test_mixture_slots_share_a_population_train_as_alone_and_resume(tiny, splits_for, tmp_path: Path) -> None:
    configs = [
        tiny(seed=1, model={"mixture": 3}),
        tiny(seed=2, model={"mixture": 3, "latent": 4, "hidden": 32, "dropout": 0.1}),
    ]
    splits = splits_for(configs[0])
    together = Population.for_configs(configs, splits)
    run(together)
    alone = Population.for_configs([configs[1]], splits)
    run(alone)
    for key in ("val_neg_elbo", "train_loss"):
        assert history(together, 1, key) == history(alone, 0, key)  # bit for bit on the CPU
    curve = history(together, 0)
    assert all(math.isfinite(v) for v in curve) and curve[1] < curve[0]
    first = Population.for_configs([configs[0]], splits)
    first.run_epoch()
    torch.save(first.slot_checkpoint(0), tmp_path / "ckpt.pt")
    resumed = Population.for_configs([tiny(seed=9, model={"mixture": 3, "latent": 12, "hidden": 80}), configs[0]], splits)
    resumed.load_slot_checkpoint(1, torch.load(tmp_path / "ckpt.pt", weights_only=True))
    run(resumed)
    assert history(resumed, 1) == history(together, 0)


def test_iwae_objective_trains_a_mixture(tiny, splits_for) -> None:
    cfg = tiny(seed=4, model={"mixture": 2}, train={"objective": "iwae", "k": 4, "epochs": 1})
    pop = Population.for_configs([cfg], splits_for(cfg))
    run(pop)
    assert math.isfinite(history(pop, 0, "train_loss")[0])


def test_tuner_train_runs_a_mixture_and_load_run_rescored(tiny, tmp_path: Path) -> None:
    raw = tiny(seed=4, model={"mixture": 2}).model_dump(mode="json")  # with the gaps (16 examples)
    m = train_one_epoch(raw, tmp_path)
    cfg, model = load_run(tmp_path / "run")
    assert cfg.model.mixture == 2 and model.mixture is not None and math.isfinite(m["amortization_gap"])
    again = metrics.evaluate(model, load_splits(cfg.data, 64).test, k=cfg.train.iwae_k, seed=cfg.seed).slot(0)
    assert again["iwae_nll"] == pytest.approx(m["iwae_nll"], abs=1e-4)


@pytest.mark.parametrize("model", [{"mixture": 2, "posterior": "iaf"}, {"mixture": 2, "hierarchy": "ladder"},
                                   {"mixture": 0}, {"mixture": 17}])
def test_a_mixture_that_cannot_be_built_is_a_one_line_error(model) -> None:
    with pytest.raises(TunerError) as err:
        parse_config({"model": model})
    assert "model.mixture" in str(err.value) and "\n" not in str(err.value)
