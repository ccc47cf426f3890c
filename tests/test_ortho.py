"""The locally orthogonal decoder (``model.ortho_weight``, tuner.vae.ortho; OroJaR, Wei et al. 2021):
the penalty's estimate and the metric against an exact Jacobian, slots with and without it sharing a
population, what it does to a short real run, `tuner train` + `load_run` and the config's check."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from population_runs import history, run
from test_families import train_one_epoch
from torch.autograd.functional import jacobian

from tuner.errors import TunerError
from tuner.spec import parse_config
from tuner.train import load_run
from tuner.vae import metrics, noise, ortho
from tuner.vae.engine import Population
from tuner.vae.population import PopulationShape, build_vae

ORTHO = {"ortho_weight": 30.0}


def _decoder(tiny, latent: int = 4):
    """A 1-slot model of `latent` true dims in a population of Zmax 6, and one z (6,)."""
    model = build_vae(PopulationShape.of(tiny()), (1, 28, 28), 6, 32, "cpu", 1)
    model.init_slot(0, seed=2, latent=latent, hidden=32, dropout=0.0)
    z = torch.randn(6, generator=torch.Generator().manual_seed(0)) * model.latent_mask[0]
    cols = jacobian(lambda v: model.decode(v.view(1, 1, -1))[0, 0], z)[:, :latent].T  # (latent, D): dx/dz_i
    return model.eval(), z, cols


def test_penalty_estimates_the_off_diagonal_mass_of_the_exact_jacobian(tiny) -> None:
    model, z, cols = _decoder(tiny)
    gram = cols @ cols.T
    exact = 2.0 * (gram - torch.diag(torch.diag(gram))).square().sum() / torch.trace(gram).square()
    b = 20000  # one z, many Rademacher draws: the batch mean of the sample variance is its expectation
    zb = z.expand(1, b, 6)
    with torch.no_grad():
        got = ortho.penalty(model.decode, zb, model.decode(zb), model.latent_mask, noise.keys_from_seeds(torch.tensor([3])))
    assert float(got[0]) == pytest.approx(float(exact), rel=0.05)


def test_metric_is_the_mean_abs_cosine_of_the_exact_jacobian_columns(tiny) -> None:
    model, z, cols = _decoder(tiny)
    unit = cols / cols.norm(dim=1, keepdim=True)
    cos = (unit @ unit.T).abs()
    exact = (cos.sum() - cos.diag().sum()) / (4 * 3)
    got = ortho.ortho_cos(model.decode, z.view(1, 1, 6), model.latent_mask, max_elements=1 << 20)
    assert float(got[0]) == pytest.approx(float(exact), abs=1e-3)
    model1, z1, _ = _decoder(tiny, latent=1)
    assert float(ortho.ortho_cos(model1.decode, z1.view(1, 1, 6), model1.latent_mask, 1 << 20)[0]) == 0.0  # no pairs


def test_ortho_slots_share_a_population_and_make_the_decoder_more_orthogonal(tiny, splits_for) -> None:
    configs = [tiny(seed=1, model=ORTHO, train={"epochs": 3}), tiny(seed=1, train={"epochs": 3})]
    assert len({PopulationShape.of(c) for c in configs}) == 1  # a per-slot weight: no split
    splits = splits_for(configs[0])
    together = Population.for_configs(configs, splits)
    run(together)
    alone = Population.for_configs([configs[1]], splits)
    run(alone)
    for key in ("val_neg_elbo", "train_loss"):
        assert history(together, 1, key) == history(alone, 0, key)  # the plain slot, bit for bit on the CPU
    assert all(math.isfinite(v) for v in history(together, 0))
    assert history(together, 0, "train_loss")[-1] > history(together, 0, "train_neg_elbo")[-1]  # + the penalty
    ev = metrics.evaluate(together.model, splits.test, k=20, seed=0)
    cos = ev.decoder_ortho_cos
    assert 0.0 < float(cos[0]) < float(cos[1]) - 0.05  # same seed and data: the penalty's doing


def test_tuner_train_reports_the_metric_and_load_run_keeps_the_weight(tiny, tmp_path: Path) -> None:
    m = train_one_epoch(tiny(seed=4, model=ORTHO, train={"gap_examples": 0}).model_dump(mode="json"), tmp_path)
    assert 0.0 < m["decoder_ortho_cos"] < 1.0
    assert m["neg_elbo"] == pytest.approx(m["recon"] + m["kl"], rel=1e-5)  # the true ELBO, no penalty in it
    cfg, model = load_run(tmp_path / "run")
    assert cfg.model.ortho_weight == 30.0 and float(model.ortho_weight[0]) == 30.0


def test_ortho_on_one_latent_dim_is_a_one_line_error() -> None:
    with pytest.raises(TunerError) as err:
        parse_config({"model": {"latent": 1, "ortho_weight": 1.0}})
    assert "model.ortho_weight" in str(err.value) and "\n" not in str(err.value)
