"""Model families beyond the diagonal Gaussian (tuner.vae.models, flows, priors, ladder): each trains in
a population like alone, resumes from a checkpoint, is scored by the metrics with its own q and p,
runs through `tuner train`, and is a choice in study specs. The math pieces are checked directly."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from population_runs import history, run, straight_and_resumed

from tuner.spec import TrainConfig, parse_config
from tuner.study import space
from tuner.study.spec import parse_study_spec
from tuner.train import load_run
from tuner.vae import metrics, noise
from tuner.vae.data import load_splits
from tuner.vae.engine import Population
from tuner.vae.flows import IAF
from tuner.vae.ladder import gaussian_kl_pair
from tuner.vae.population import PopulationShape
from tuner.vae.priors import mixture_log_prob_dims

optuna.logging.set_verbosity(optuna.logging.WARNING)
TUNER = shutil.which("tuner") or str(Path(sys.executable).with_name("tuner"))

FAMILIES: dict[str, dict[str, Any]] = {
    "mog": {"prior": "mog", "prior_components": 4},
    "vamp": {"prior": "vamp", "prior_components": 3},
    "iaf": {"posterior": "iaf", "flow_steps": 2},
    "ladder": {"hierarchy": "ladder", "latent2": 3},
}


def config(small_npz: Path, family: str, seed: int = 1, **model: Any) -> TrainConfig:
    return parse_config({
        "seed": seed, "data": {"dataset": f"npz:{small_npz}"},
        "model": {"latent": 6, "hidden": 48, "depth": 1, **FAMILIES[family], **model},
        "optim": {"batch_size": 64, "lr": 2e-3}, "kl": {"schedule": "constant"},
        "train": {"epochs": 2, "iwae_k": 20},
    })


def trimmed_equal(big: list[torch.Tensor], small: list[torch.Tensor], atol: float) -> bool:
    """The slot's weights equal the alone model's on its region, and the padding stayed exactly 0."""
    for b, s in zip(big, small):
        region = tuple(slice(0, n) for n in s.shape)
        if not torch.allclose(b[region], s, atol=atol, rtol=1e-4):
            return False
        pad = b.clone()
        pad[region] = 0
        if pad.abs().max() != 0:
            return False
    return True


@pytest.fixture(scope="module")
def trained(small_npz: Path) -> dict[str, tuple[Population, list[TrainConfig]]]:
    """Per family, a population of 3 different configs trained 2 epochs (one of smaller sizes)."""
    out = {}
    for family in FAMILIES:
        configs = [
            config(small_npz, family, seed=1),
            config(small_npz, family, seed=2, latent=4, hidden=32, latent2=2),
            config(small_npz, family, seed=3, dropout=0.1),
        ]
        pop = Population.for_configs(configs, load_splits(configs[0].data, 64))
        run(pop)
        out[family] = (pop, configs)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_in_a_population_like_alone(family: str, trained) -> None:
    pop, configs = trained[family]
    assert PopulationShape.of(configs[0]) == pop.shape and pop.shape.hierarchy == configs[0].model.hierarchy
    for s in range(3):
        assert pop.state[s].status == "finished"
        train, val = history(pop, s, "train_neg_elbo"), history(pop, s)
        assert all(math.isfinite(v) for v in train + val)
        assert train[1] < train[0] and val[1] < val[0]
        assert val[1] < 450 and val[0] - val[1] > 20  # a real decrease (untrained: ~545 nats)
    alone = Population.for_configs([configs[1]], pop.splits)
    run(alone)
    assert history(pop, 1) == pytest.approx(history(alone, 0), rel=1e-4)
    slot = [p[1].detach() for p in pop.params]
    assert trimmed_equal(slot, [p[0].detach() for p in alone.params], atol=2e-3)
    # and one slot's evaluation does not depend on its neighbours either
    a = metrics.evaluate(pop.slot_model(1), pop.splits.test, k=10, seed=0).slot(0)
    b = metrics.evaluate(alone.slot_model(0), pop.splits.test, k=10, seed=0).slot(0)
    assert a["iwae_nll"] == pytest.approx(b["iwae_nll"], rel=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_metrics_iwae_below_elbo(family: str, trained) -> None:
    pop, configs = trained[family]
    model, x = pop.slot_model(0), pop.splits.test
    ev = metrics.evaluate(model, x, k=200, seed=0)
    row = ev.slot(0)
    size = configs[0].model.latent + (configs[0].model.latent2 if family == "ladder" else 0)
    assert row["latent_size"] == size and len(row["kl_per_dim"]) == size
    assert row["kl"] == pytest.approx(sum(row["kl_per_dim"]), abs=1e-3)
    assert row["neg_elbo"] == pytest.approx(row["recon"] + row["kl"], rel=1e-5)
    assert all(math.isfinite(v) for v in (row["iwae_nll"], row["mutual_info"], row["kl"]))
    assert 0 <= row["mutual_info"] <= math.log(x.shape[0]) + 1e-4
    # K=1 IWAE is an unbiased -ELBO estimate (the sampled log-ratio): its mean over keys agrees with
    # evaluate's -ELBO (the family's own KL estimator) within MC noise, and K=200 is far below both
    k1 = torch.stack([metrics.iwae_nll(model, x, 1, noise.keys_from_seeds(torch.tensor([s]))) for s in range(6)])
    # evaluate's -ELBO is one more draw of about the same spread: 4 sigma of the difference
    assert float(k1.mean()) == pytest.approx(row["neg_elbo"], abs=4.0 * float(k1.std()) * math.sqrt(1 + 1 / 6))
    assert row["iwae_nll"] < row["neg_elbo"] - 1.0
    assert row["iwae_nll"] < float(k1.mean()) - 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_family_checkpoint_resumes_exactly(family: str, small_npz: Path, tmp_path: Path) -> None:
    cfg = config(small_npz, family, seed=5, latent=4)
    other = config(small_npz, family, seed=9, latent=7, hidden=64, latent2=5)  # wider maxima
    straight, resumed, _ = straight_and_resumed(cfg, [other], load_splits(cfg.data, 64), tmp_path)
    assert history(resumed, 1) == pytest.approx(history(straight, 0), rel=1e-5)


def test_iaf_is_autoregressive_and_its_log_det_is_exact() -> None:
    torch.manual_seed(0)
    flow = IAF(slots=2, steps=3, latent_max=5, hidden_max=16, context_max=8)
    g = torch.Generator().manual_seed(3)
    flow.init_slot(0, latent=5, hidden=16, context=8, generator=g)
    flow.init_slot(1, latent=3, hidden=10, context=6, generator=g)
    mask = torch.tensor([[1.0] * 5, [1, 1, 1, 0, 0]]).unsqueeze(1)
    z0, h = torch.randn(2, 1, 5) * mask, torch.randn(2, 1, 8)
    h[1, :, 6:] = 0.0
    for s, size in ((0, 5), (1, 3)):
        def f(v: torch.Tensor, s: int = s) -> torch.Tensor:
            z = z0.clone()
            z[s, 0, :size] = v
            return flow(z, h, mask)[0][s, 0, :size]

        jac = torch.autograd.functional.jacobian(f, z0[s, 0, :size])
        # alternating orders make the composition dense; the log-det is still exact
        _, log_det = flow(z0, h, mask)
        assert float(log_det[s, 0].sum().detach()) == pytest.approx(float(torch.linalg.slogdet(jac)[1]), abs=1e-5)
    # one step alone is triangular in its own order (ascending for step 0)
    one = IAF(slots=1, steps=1, latent_max=4, hidden_max=12, context_max=3)
    one.init_slot(0, latent=4, hidden=12, context=3, generator=g)
    jac = torch.autograd.functional.jacobian(
        lambda v: one(v.view(1, 1, 4), torch.randn(1, 1, 3, generator=torch.Generator().manual_seed(1)),
                      torch.ones(1, 1, 4))[0].view(4), torch.randn(4))
    assert torch.equal(jac.triu(1), torch.zeros(4, 4))
    assert (jac.diagonal() > 0).all() and (jac.diagonal() < 1).all()  # sigma in (0, 1)


def test_mixture_chain_rule_sums_to_the_mixture_density() -> None:
    g = torch.Generator().manual_seed(0)
    s, b, k, zmax = 2, 7, 3, 4
    log_w = torch.log_softmax(torch.randn(s, k, generator=g), -1)
    mu, logvar = torch.randn(s, k, zmax, generator=g), 0.3 * torch.randn(s, k, zmax, generator=g)
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    z = torch.randn(s, b, zmax, generator=g) * mask[:, None]
    dims = mixture_log_prob_dims(z, log_w, mu, logvar, mask)
    assert dims[1, :, 2:].abs().max() == 0  # masked dims: exactly 0
    for slot, size in ((0, 4), (1, 2)):
        mix = torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(logits=log_w[slot]),
            torch.distributions.Independent(
                torch.distributions.Normal(mu[slot, :, :size], (0.5 * logvar[slot, :, :size]).exp()), 1),
        )
        torch.testing.assert_close(dims[slot].sum(-1), mix.log_prob(z[slot, :, :size]), atol=1e-5, rtol=1e-5)


def test_ladder_kl_and_precision_merge() -> None:
    mu_q, lv_q = torch.tensor([0.3, -1.0]), torch.tensor([0.2, -0.5])
    mu_p, lv_p = torch.tensor([0.0, 0.5]), torch.tensor([-0.3, 0.4])
    want = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu_q, (0.5 * lv_q).exp()), torch.distributions.Normal(mu_p, (0.5 * lv_p).exp()))
    torch.testing.assert_close(gaussian_kl_pair(mu_q, lv_q, mu_p, lv_p), want)


def test_family_config_errors_name_the_field(small_npz: Path) -> None:
    from tuner.errors import TunerError

    with pytest.raises(TunerError, match="model.hierarchy 'ladder' needs model.posterior 'gaussian'"):
        parse_config({"model": {"hierarchy": "ladder", "posterior": "iaf"}})
    with pytest.raises(TunerError, match="model.flow_steps"):
        parse_config({"model": {"posterior": "iaf", "flow_steps": 0}})
    with pytest.raises(TunerError, match="model.prior"):
        parse_config({"model": {"prior": "gmm"}})
    # fields a family does not use do not split populations
    a, b = config(small_npz, "mog"), config(small_npz, "mog", flow_steps=7, latent2=9)
    assert PopulationShape.of(a) == PopulationShape.of(b)
    assert PopulationShape.of(a) != PopulationShape.of(config(small_npz, "mog", prior_components=5))


def train_one_epoch(raw: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """`tuner train` of the config `raw` for one epoch on CPU in a subprocess, into tmp_path/run:
    its metrics.json, checked to be one epoch with a finite IWAE NLL below the -ELBO."""
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([TUNER, "train", tmp_path / "c.yaml", "--out", tmp_path / "run", "--epochs", "1",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["epochs"] == 1 and math.isfinite(m["iwae_nll"]) and m["iwae_nll"] < m["neg_elbo"]
    return m


@pytest.mark.parametrize("family", FAMILIES)
def test_tuner_train_runs_each_family(family: str, small_npz: Path, tmp_path: Path) -> None:
    raw = config(small_npz, family, seed=4).model_dump(mode="json")
    m = train_one_epoch(raw, tmp_path)
    assert (tmp_path / "run" / "samples.png").is_file()
    cfg, model = load_run(tmp_path / "run")
    assert cfg.model == parse_config(raw).model
    again = metrics.evaluate(model, load_splits(cfg.data, 64).test, k=cfg.train.iwae_k, seed=cfg.seed).slot(0)
    assert again["iwae_nll"] == pytest.approx(m["iwae_nll"], abs=1e-4)
    assert again["kl_per_dim"] == pytest.approx(m["kl_per_dim"], abs=1e-4)


def test_study_spec_samples_valid_family_configs(small_npz: Path) -> None:
    spec = parse_study_spec({
        "study": "families",
        "base": {"data": {"dataset": f"npz:{small_npz}"}, "model": {"latent": 8, "hidden": 32}},
        "space": {
            "model.posterior": {"type": "categorical", "choices": ["gaussian", "iaf"]},
            "model.prior": {"type": "categorical", "choices": ["normal", "mog", "vamp"]},
            "model.flow_steps": {"type": "int", "low": 1, "high": 4, "when": {"model.posterior": "iaf"}},
            "model.prior_components": {"type": "int", "low": 2, "high": 16,
                                       "when": {"model.prior": ["mog", "vamp"]}},
            "model.hierarchy": {"type": "categorical", "choices": ["flat", "ladder"],
                                "when": {"model.posterior": "gaussian", "model.prior": "normal"}},
            "model.latent2": {"type": "int", "low": 2, "high": 12},
        },
        "sampler": {"name": "random", "seed": 0},
        "budget": {"epochs": 2},
    })
    assert space.size_bounds(spec) == (12, 32)  # a ladder's top level shares the latent maxima
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    shapes, families = set(), set()
    for i in range(40):
        trial = study.ask()
        params = space.sample(trial, spec)
        cfg = spec.train_config(params, seed=i)  # validated: never ladder with iaf or a mixture
        m = cfg.model
        assert ("model.flow_steps" in params) == (m.posterior == "iaf")
        assert ("model.hierarchy" in params) == (m.posterior == "gaussian" and m.prior == "normal")
        assert not (m.hierarchy == "ladder" and (m.posterior, m.prior) != ("gaussian", "normal"))
        families.add((m.posterior, m.prior, m.hierarchy))
        shapes.add(PopulationShape.of(cfg))
        study.tell(trial, 1.0)
    assert {("gaussian", "normal", "ladder"), ("iaf", "mog", "flat"), ("gaussian", "vamp", "flat")} <= families
    # a population per shape; a sampled ladder trains in one sized by the study's bounds
    ladder = next(s for s in shapes if s.hierarchy == "ladder")
    assert ladder.posterior == "gaussian" and ladder.flow_steps == 0 and ladder.prior_components == 0
