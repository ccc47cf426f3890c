"""The diffusion prior (tuner.vae.diffusion, Wehenkel & Louppe 2021): its bound on a toy 2-d latent,
masking and Zmax independence, the family in populations, checkpoints, `tuner train`, the config and
its export, and the bounded-prior flag that the ranking and report carry."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tuner.errors import TunerError
from tuner.results.exported_config import settings_that_apply
from tuner.spec import TrainConfig, parse_config
from tuner.train import load_run
from tuner.vae import metrics
from tuner.vae.data import load_splits
from tuner.vae.diffusion import DiffusionPrior, cosine_betas
from tuner.vae.engine import Population
from tuner.vae.population import PopulationShape

from population_runs import history, run, straight_and_resumed
from test_families import train_one_epoch

_LOG_2PI = math.log(2.0 * math.pi)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tiny matmuls: extra threads only fight the other test processes for CPUs (here and in the
    `tuner train` subprocess)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def prior(latents: list[int], latent_max: int, steps: int = 20, hidden: int = 32, seed: int = 0) -> DiffusionPrior:
    p = DiffusionPrior(len(latents), steps, latent_max, hidden)
    for slot, latent in enumerate(latents):
        p.init_slot(slot, latent, hidden, torch.Generator().manual_seed(seed + slot))
    return p


def mask_of(latents: list[int], latent_max: int) -> torch.Tensor:
    return torch.tensor([[1.0] * n + [0.0] * (latent_max - n) for n in latents]).unsqueeze(1)  # (S, 1, Z)


def test_schedule_is_cosine_and_capped() -> None:
    b = cosine_betas(20)
    assert b.shape == (20,) and b.dtype == torch.float64 and (b > 0).all() and b.max() == 0.5 and (b.diff() >= 0).all()
    assert float(b[0]) == pytest.approx(0.008, abs=1e-3)


def test_bound_learns_a_toy_2d_latent_and_starts_exactly_normal() -> None:
    """A fresh prior is N(0, I) for any chain noise; 200 Adam steps on a 2-d Gaussian far from it
    raise the held-out bound to within 0.3 nats of the true log-density (a bound: never above it)."""
    g = torch.Generator().manual_seed(1)
    p, mask = prior([2], 2), torch.ones(1, 1, 2)
    z = torch.randn(1, 500, 2, generator=g)
    fresh = p.bound_dims(z, torch.randn(1, 500, 20, 2, generator=g), mask)
    torch.testing.assert_close(fresh, -0.5 * (_LOG_2PI + z.square()), atol=1e-4, rtol=0)
    scale, shift = torch.tensor([0.3, 1.5]), torch.tensor([1.0, -0.5])
    held = torch.randn(1, 2000, 2, generator=g) * scale + shift
    held_noise = torch.randn(1, 2000, 20, 2, generator=g)
    truth = float((-0.5 * (_LOG_2PI + ((held - shift) / scale).square()) - torch.log(scale)).sum(-1).mean())

    def held_bound() -> float:
        with torch.no_grad():
            return float(p.bound_dims(held, held_noise, mask).sum(-1).mean())

    before = held_bound()
    opt = torch.optim.Adam(p.parameters(), lr=3e-3)
    for _ in range(200):
        x = torch.randn(1, 256, 2, generator=g) * scale + shift
        loss = -p.bound_dims(x, torch.randn(1, 256, 20, 2, generator=g), mask).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_bound()
    assert before < truth - 1.0  # N(0, I) is a poor fit: about 1.6 nats below the truth
    assert truth - 0.3 < after < truth + 0.05  # the bound rose to near the truth (2000 points: MC slack)
    draws = p.sample(torch.tensor([7]), 4000, torch.ones(1, 2))  # the reverse chain follows the fit
    torch.testing.assert_close(draws.mean(1)[0], shift, atol=0.15, rtol=0)
    torch.testing.assert_close(draws.std(1)[0], scale, atol=0.2, rtol=0)


def test_masked_dims_are_zero_and_a_slot_ignores_zmax() -> None:
    """Slot 0 (3 of Zmax 7 dims) next to a 7-dim neighbour computes what it computes alone at Zmax 3."""
    g = torch.Generator().manual_seed(2)
    big, alone = prior([3, 7], 7, seed=4), prior([3], 3, seed=4)
    for p in (big, alone):  # a trained-looking output layer (the fresh one is zero)
        with torch.no_grad():
            p.net_out.weight[0, :, :3] = 0.3 * torch.randn(32, 3, generator=torch.Generator().manual_seed(0))
            p.net_out.weight[0, :, 3:] = 0.0
    z, chain = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 20, 7, generator=g)
    mask = mask_of([3, 7], 7)
    out = big.bound_dims(z, chain, mask)
    assert out[0, :, 3:].abs().max() == 0  # padding: exactly 0
    torch.testing.assert_close(out[0, :, :3], alone.bound_dims(z[:1, :, :3], chain[:1, :, :, :3], mask[:1, :, :3])[0])
    keys = torch.tensor([11, 12])
    draws = big.sample(keys, 6, mask[:, 0])
    assert draws[0, :, 3:].abs().max() == 0
    torch.testing.assert_close(draws[0, :, :3], alone.sample(keys[:1], 6, mask[:1, 0, :3])[0])


# --------------------------------------------------------------------------------- the family
def config(small_npz: Path, seed: int = 1, **model: Any) -> TrainConfig:
    return parse_config({
        "seed": seed, "data": {"dataset": f"npz:{small_npz}"},
        "model": {"latent": 6, "hidden": 48, "depth": 1, "prior": "diffusion", "diffusion_steps": 8,
                  "diffusion_hidden": 16, **model},
        "optim": {"batch_size": 64, "lr": 2e-3}, "kl": {"schedule": "constant"},
        "train": {"epochs": 2, "iwae_k": 20, "gap_examples": 16, "gap_steps": 5},
    })


def test_diffusion_slot_trains_in_a_population_like_alone(small_npz: Path) -> None:
    configs = [config(small_npz, seed=1), config(small_npz, seed=2, latent=4, hidden=32)]
    pop = Population.for_configs(configs, load_splits(configs[0].data, 64))
    run(pop)
    train = history(pop, 1, "train_neg_elbo")
    assert all(math.isfinite(v) for v in train) and train[1] < train[0]
    alone = Population.for_configs([configs[1]], pop.splits)
    run(alone)
    assert history(pop, 1) == pytest.approx(history(alone, 0), rel=1e-4)
    a = metrics.evaluate(pop.slot_model(1), pop.splits.test, k=10, seed=0).slot(0)
    b = metrics.evaluate(alone.slot_model(0), pop.splits.test, k=10, seed=0).slot(0)
    assert a["iwae_nll"] == pytest.approx(b["iwae_nll"], rel=1e-4)
    assert a["kl"] == pytest.approx(sum(a["kl_per_dim"]), abs=1e-3) and len(a["kl_per_dim"]) == 4
    assert a["iwae_nll"] < a["neg_elbo"]
    with pytest.raises(ValueError, match="no log p"):  # never silently N(0, I)
        pop.model.log_prior_dims(torch.zeros(2, 1, 6))


def test_a_fresh_diffusion_vae_is_the_gaussian_vae(small_npz: Path) -> None:
    """Its other weights are drawn exactly as the Gaussian family's (the prior's draws come last),
    and its fresh prior is N(0, I): the same posterior draw gives the same sampled KL per dim."""
    normal, diffusion = (config(small_npz, seed=3, prior=p) for p in ("normal", "diffusion"))
    splits = load_splits(normal.data, 64)
    a, b = (Population.for_configs([c], splits).model for c in (normal, diffusion))
    theirs = dict(b.named_parameters())
    for name, p in a.named_parameters():
        assert torch.equal(p, theirs[name]), name
    x = splits.test[:16].unsqueeze(0)
    eps = torch.randn(1, 16, 1 + 8, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        za, kla = a.sample(a.local_posterior(x), eps[:, :, 0], mc=True)
        zb, klb = b.sample(b.local_posterior(x), eps, mc=True)
    torch.testing.assert_close(zb, za)
    torch.testing.assert_close(klb, kla, atol=1e-4, rtol=0)


def test_diffusion_checkpoint_resumes_exactly(small_npz: Path, tmp_path: Path) -> None:
    cfg = config(small_npz, seed=5, latent=4)
    wider = config(small_npz, seed=9, latent=7, hidden=64)
    straight, resumed, _ = straight_and_resumed(cfg, [wider], load_splits(cfg.data, 64), tmp_path)
    assert history(resumed, 1) == pytest.approx(history(straight, 0), rel=1e-5)


def test_tuner_train_runs_the_diffusion_prior(small_npz: Path, tmp_path: Path) -> None:
    raw = config(small_npz, seed=4).model_dump(mode="json")
    m = train_one_epoch(raw, tmp_path)
    assert m["prior_bound"] is True and (tmp_path / "run" / "samples.png").is_file()
    cfg, model = load_run(tmp_path / "run")
    assert cfg.model == parse_config(raw).model and model.prior_bound
    again = metrics.evaluate(model, load_splits(cfg.data, 64).test, k=cfg.train.iwae_k, seed=cfg.seed).slot(0)
    assert again["iwae_nll"] == pytest.approx(m["iwae_nll"], abs=1e-4)


def test_diffusion_config_shape_and_export(small_npz: Path) -> None:
    a = config(small_npz)
    # prior_components does not act on a diffusion prior: neither its shape nor its export
    assert PopulationShape.of(a) == PopulationShape.of(config(small_npz, prior_components=5))
    assert PopulationShape.of(a).prior_components == 0
    assert (PopulationShape.of(a).diffusion_steps, PopulationShape.of(a).diffusion_hidden) == (8, 16)
    assert PopulationShape.of(a) != PopulationShape.of(config(small_npz, diffusion_steps=9))
    normal = PopulationShape.of(config(small_npz, prior="normal", diffusion_steps=9, diffusion_hidden=3))
    assert (normal.diffusion_steps, normal.diffusion_hidden) == (0, 0)
    model = settings_that_apply(a)["model"]
    assert model["diffusion_steps"] == 8 and model["diffusion_hidden"] == 16 and "prior_components" not in model
    assert "diffusion_steps" not in settings_that_apply(config(small_npz, prior="mog"))["model"]
    with pytest.raises(TunerError, match="model.diffusion_steps"):
        config(small_npz, diffusion_steps=0)
    with pytest.raises(TunerError, match="model.hierarchy 'ladder' needs"):
        config(small_npz, hierarchy="ladder")
    with pytest.raises(TunerError, match="model.mixture 2 needs a prior with a density"):
        config(small_npz, mixture=2)
    with pytest.raises(TunerError, match="kl.divergence 'mmd'"):
        parse_config({**a.model_dump(mode="json"), "kl": {"divergence": "mmd"}})


def test_bounded_nll_is_flagged_in_the_ranking_table_and_report(tmp_path: Path) -> None:
    """A trial whose metrics carry prior_bound (as a worker stores them) is listed in the ranking's
    attrs, its NLL marked in `tuner rank`'s table with a caption line, and in the report's caveats."""
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import create_trial
    from rich.console import Console

    from tuner.results.ranking import PRIOR_BOUND_MARK, ranking_frame
    from tuner.results.ranking_table import ranking_tables
    from tuner.results.report_caveats import caveats

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="b", storage=f"sqlite:///{tmp_path}/b.db")
    dists = {"model.prior": CategoricalDistribution(["normal", "diffusion"])}
    for prior, nll in (("normal", 100.0), ("diffusion", 98.0)):
        attrs = {"iwae_nll": nll, "recon": 80.0, "kl": nll - 78.0, "neg_elbo": nll + 2.0, "active_units": 6,
                 "latent_size": 8, "inactive_fraction": 0.25, "mutual_info": 3.0, "collapsed": False, "epochs": 2,
                 "test_iwae_nll": nll + 1.0, **({"prior_bound": True} if prior == "diffusion" else {})}
        study.add_trial(create_trial(value=nll, params={"model.prior": prior}, distributions=dists, user_attrs=attrs))
    frame = ranking_frame(study)
    assert frame.attrs["bounded_prior_trials"] == [1] and list(frame["trial"]) == [1, 0]
    console = Console(width=200, record=True)
    for table in ranking_tables(frame.head(2), "t", width=200, columns="rank,trial,iwae_nll,test_iwae_nll"):
        console.print(table)
    text = console.export_text()
    assert f"val NLL{PRIOR_BOUND_MARK}" in text and f"98.00{PRIOR_BOUND_MARK}" in text and "100.00 " in text
    assert "trial 1 (model.prior diffusion): log p(z) is a one-chain variational bound" in " ".join(text.split())
    plain = Console(width=200, record=True)  # no bounded trial shown: no mark, no note
    for table in ranking_tables(frame.iloc[1:], "t", width=200):
        plain.print(table)
    assert PRIOR_BOUND_MARK not in plain.export_text()
    notes = caveats(frame, {t.number: t for t in study.trials}, None)
    assert notes.marks[(1, "iwae_nll")].suffix == PRIOR_BOUND_MARK and (0, "iwae_nll") not in notes.marks
    assert any("one-chain variational bound" in n for n in notes.notes)
