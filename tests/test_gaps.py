"""Amortization and approximation gaps (tuner.vae.gaps) on tiny real models trained on a 1k MNIST slice:
sign and size on a trained model, a deliberately weak encoder, determinism and independence of the
chunking and of the population, the config fields, and the gaps through a real worker into the
trial's user attrs, `tuner rank`, the HTML report and `tuner train`'s metrics."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from optuna.trial import TrialState
from test_ranking import cli
from test_worker import checkpoint_file, study_yaml

from tuner.errors import TunerError
from tuner.results.ranking import rank_study
from tuner.results.report import render_report
from tuner.spec import TrainConfig, parse_config
from tuner.store.artifacts import artifact_store
from tuner.store.attrs import trial_config
from tuner.study.open import create_or_resume
from tuner.study.spec import parse_study_spec
from tuner.study.worker import Worker
from tuner.train import train_config
from tuner.vae import gaps, metrics
from tuner.vae.data import Splits, load_splits
from tuner.vae.engine import Population
from tuner.vae.models import VAE

ROOT = Path(__file__).resolve().parents[1]
WEAK_UNITS = 4  # the weak encoder's hidden units; its decoder keeps all 64
EXAMPLES = 64  # test examples the gaps are measured on here (the default is 128)


@dataclass
class Pair:
    """Slot 0: a normal VAE (encoder and decoder of 64 hidden units); slot 1: the same config and
    seed, trained with only WEAK_UNITS encoder hidden units. Both trained 5 epochs together."""

    pop: Population
    splits: Splits
    config: TrainConfig
    both: gaps.Gaps  # estimate_gaps of the 2-slot model


def _shrink_encoder(model: VAE, slot: int, units: int) -> None:
    """Zero one slot's encoder hidden units past `units` (in and out weights, bias): the engine's
    own padding (tuner.vae.layers) applied to the encoder alone, so they stay zero while training."""
    with torch.no_grad():
        model.enc_hidden[0].weight[slot, :, units:] = 0.0
        model.enc_hidden[0].bias[slot, :, units:] = 0.0
        model.enc_mu.weight[slot, units:] = 0.0
        model.enc_logvar.weight[slot, units:] = 0.0


@pytest.fixture(scope="module")
def pair(small_npz: Path) -> Pair:
    config = parse_config({
        "seed": 3, "data": {"dataset": f"npz:{small_npz}"}, "model": {"latent": 8, "hidden": 64, "depth": 1},
        "optim": {"batch_size": 32, "lr": 3e-3}, "kl": {"schedule": "constant"}, "train": {"epochs": 5, "iwae_k": 20},
    })
    splits = load_splits(config.data, config.optim.batch_size)
    pop = Population.for_configs([config, config], splits, "cpu")
    _shrink_encoder(pop.model, 1, WEAK_UNITS)
    while pop.running():
        pop.run_epoch()
    assert float(pop.model.enc_hidden[0].weight[1, :, WEAK_UNITS:].detach().abs().sum()) == 0.0  # still weak
    both = gaps.estimate_gaps(pop.model, splits.test, examples=EXAMPLES, seed=0)
    return Pair(pop, splits, config, both)


# ------------------------------------------------------------------------------------- the numbers
def test_gaps_of_a_trained_model_are_positive_and_decompose_its_elbo(pair: Pair) -> None:
    g = pair.both
    assert g.examples == EXAMPLES and g.steps == 100 and g.iwae_k == gaps.GAP_IWAE_K
    for s in (0, 1):
        # both gaps are positive well beyond their noise (a few standard errors)
        assert g.amortization_gap[s] > max(0.5, 5 * g.amortization_gap_se[s]), g.slot(s)
        assert g.approximation_gap[s] > 3 * g.approximation_gap_se[s], g.slot(s)
        assert 0 < g.amortization_gap_se[s] < 0.3 and 0 < g.approximation_gap_se[s] < 0.3
        # -ELBO(encoder) = IWAE + approximation + amortization, each term as defined
        assert float(g.neg_elbo_amortized[s] - g.iwae_nll[s]) == pytest.approx(
            float(g.amortization_gap[s] + g.approximation_gap[s]), abs=1e-3)
    # the encoder's -ELBO here is the metrics' -ELBO on the same examples (one sample per seed there:
    # 16 seeds average it down to about 0.5 nats of noise)
    model, x = pair.pop.slot_model(0, best=False), pair.splits.test[:EXAMPLES]
    sampled = sum(float(metrics.evaluate(model, x, k=1, seed=seed).neg_elbo[0]) for seed in range(16)) / 16
    assert float(g.neg_elbo_amortized[0]) == pytest.approx(sampled, abs=1.5)


def test_weak_encoder_has_a_much_larger_amortization_gap(pair: Pair) -> None:
    g = pair.both
    normal, weak = float(g.amortization_gap[0]), float(g.amortization_gap[1])
    # measured: about 5 nats against 10.6; a 4-unit encoder cannot fit each example's posterior
    assert weak > normal + 2.5 and weak > 1.5 * normal, (normal, weak)


def test_each_slot_measures_as_if_alone_and_results_repeat(pair: Pair) -> None:
    alone = gaps.estimate_gaps(pair.pop.slot_model(1, best=False), pair.splits.test, examples=EXAMPLES, seed=0)
    assert alone.slot(0) == pytest.approx(pair.both.slot(1), abs=2e-3)
    model = pair.pop.slot_model(1, best=False)
    runs = [gaps.estimate_gaps(model, pair.splits.test, examples=16, steps=20, seed=5).slot(0) for _ in range(2)]
    assert runs[0] == runs[1]  # bit for bit: every draw comes from the seed


def test_chunking_changes_nothing_and_another_seed_only_noise(pair: Pair) -> None:
    model = pair.pop.slot_model(0, best=False)
    whole = gaps.estimate_gaps(model, pair.splits.test, examples=EXAMPLES, steps=20, seed=0)
    # 32 rows at a time and one evaluation draw per decoder call: the same per-example noise
    chunked = gaps.estimate_gaps(model, pair.splits.test, examples=EXAMPLES, steps=20, seed=0,
                                 max_elements=32 * 784)
    assert chunked.slot(0) == pytest.approx(whole.slot(0), abs=2e-3)
    other = gaps.estimate_gaps(model, pair.splits.test, examples=EXAMPLES, steps=20, seed=1)
    assert other.slot(0) != whole.slot(0)
    # another seed moves each gap by its noise only (a few standard errors, IWAE and optimizer included)
    for name in ("amortization_gap", "approximation_gap"):
        assert abs(other.slot(0)[name] - whole.slot(0)[name]) < 0.5, name


@pytest.mark.parametrize("family", [{"posterior": "iaf"}, {"hierarchy": "ladder"}, {"prior": "vamp"}])
def test_every_family_measures_through_its_local_posterior(family: dict, tiny) -> None:
    """IAF (a context h among its local parameters), the ladder (two levels) and the VampPrior (a
    prior made of the encoder): the same code, positive amortization gaps, finite everything."""
    config = tiny(model={"latent": 4, "hidden": 32, **family}, optim={"lr": 1e-2}, train={"epochs": 2})
    pop = Population.for_configs([config], load_splits(config.data, config.optim.batch_size), "cpu")
    while pop.running():
        pop.run_epoch()
    g = gaps.estimate_gaps(pop.slot_model(0), pop.splits.test, examples=16, steps=30).slot(0)
    assert all(math.isfinite(v) for v in g.values()), g
    assert g["amortization_gap"] > 3 * g["amortization_gap_se"] > 0, g


def test_model_is_left_as_it_was(pair: Pair) -> None:
    model = pair.pop.slot_model(0, best=False).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    gaps.estimate_gaps(model, pair.splits.test, examples=8, steps=3, k=5)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_bad_arguments_and_config_fields_are_one_line_errors(pair: Pair) -> None:
    model, x = pair.pop.slot_model(0), pair.splits.test
    for kwargs, words in (({"steps": 0}, "steps=0"), ({"examples": 0}, "examples=0"),
                          ({"lr": float("nan")}, "lr=nan"), ({"k": 0}, "k=0")):
        with pytest.raises(TunerError, match=words):
            gaps.estimate_gaps(model, x, **kwargs)
    for field, value in (("gap_examples", -1), ("gap_steps", 0), ("gap_lr", 0.0), ("gap_lr", 2.0)):
        with pytest.raises(TunerError) as err:
            parse_config({"train": {field: value}})
        assert f"train.{field}" in str(err.value) and "\n" not in str(err.value)
    assert gaps.trial_gaps(model, x, parse_config({"train": {"gap_examples": 0}})) == {}  # off
    assert parse_config({}).train.gap_examples == 128  # the documented default


def test_imports_with_torch_and_numpy_alone() -> None:
    block = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'pydantic', 'yaml', 'optuna', 'mlxtend', 'pandas', 'typer', 'rich'}:\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import tuner.vae.gaps\n"
        "print(tuner.vae.gaps.estimate_gaps.__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", block], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "estimate_gaps", proc.stderr


# ------------------------------------------------------------------- through the worker and the CLI
def test_worker_stores_the_gaps_and_rank_and_report_show_them(
    tmp_path: Path, small_npz: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, name = f"sqlite:///{tmp_path}/g.db", "gaps"
    spec = study_yaml(
        tmp_path, small_npz, name, url,
        base={"data": {"dataset": f"npz:{small_npz}"}, "model": {"hidden": 32, "depth": 1},
              "optim": {"batch_size": 32, "lr": 1e-2}, "kl": {"schedule": "constant"},
              "train": {"iwae_k": 5, "gap_steps": 50}},
        space={"train.gap_examples": {"type": "categorical", "choices": [0, 32]}},
        budget={"trials": 2, "epochs": 3},
    )
    study = create_or_resume(parse_study_spec(yaml.safe_load(spec.read_text())))
    for n in (32, 0):  # every searched param given: the helper's space also holds latent and lr
        study.enqueue_trial({"train.gap_examples": n, "model.latent": 8, "optim.lr": 1e-2})
    Worker(url, name, slots=1, device="cpu", artifacts=tmp_path / "art", log=lambda s: None).run()
    measured, off = study.get_trials()
    assert measured.state == off.state == TrialState.COMPLETE
    attrs = measured.user_attrs
    assert attrs["gap_examples"] == 32 and attrs["gap_steps"] == 50 and attrs["gap_iwae_k"] == gaps.GAP_IWAE_K
    assert attrs["amortization_gap"] > 0 and abs(attrs["approximation_gap"]) < 50
    assert "amortization_gap" not in off.user_attrs and "gap_examples" not in off.user_attrs  # 0 = off

    # the same model the metrics used (best weights from the trial's checkpoint) gives the same gaps
    ckpt = torch.load(checkpoint_file(tmp_path / "art", url, name, 0), map_location="cpu", weights_only=True)
    config = parse_config(trial_config(measured))
    pop = Population.for_configs([config], load_splits(config.data, config.optim.batch_size), "cpu")
    pop.load_slot_checkpoint(0, ckpt)
    model = pop.slot_model(0, best=config.train.restore_best and pop.state[0].best_epoch > 0)
    assert gaps.trial_gaps(model, pop.splits.test, config) == pytest.approx(
        {k: attrs[k] for k in gaps.trial_gaps(model, pop.splits.test, config)}, abs=1e-4)

    # tuner rank: a column in the table (dash when off), and in the JSON records
    _, frame = rank_study(url, name)
    by_trial = frame.set_index("trial")
    assert by_trial.loc[0, "amortization_gap"] == attrs["amortization_gap"]
    assert by_trial.loc[0, "approximation_gap"] == attrs["approximation_gap"]
    code, out, err = cli(capsys, monkeypatch, "rank", name, "--storage", url, "--params", "0",
                         "--columns", "rank,trial,amortization_gap,approximation_gap")
    assert code == 0, err
    assert "amort gap" in out and "approx gap" in out
    # rows: rank, trial, amortization gap, approximation gap (the table has no cell borders)
    rows = {cells[1]: cells for cells in (line.split() for line in out.splitlines())
            if len(cells) == 4 and cells[0].isdigit()}
    for i, attr in ((2, "amortization_gap"), (3, "approximation_gap")):
        assert rows["0"][i] == f"{attrs[attr]:.2f}"
        assert rows["1"][i] == "-"  # the trial without gaps shows a dash
    code, out, err = cli(capsys, monkeypatch, "rank", name, "--storage", url, "--format", "json")
    records = {r["trial"]: r for r in json.loads(out)}
    assert records[0]["amortization_gap"] == pytest.approx(attrs["amortization_gap"], rel=1e-12)
    assert records[1]["amortization_gap"] is None

    # the HTML report's ranking table carries both columns
    page = render_report(study, frame, artifact_store(url, tmp_path / "art"))
    ranking = page.split('<section id="ranking">', 1)[1].split("</section>", 1)[0]
    assert ">amortization_<wbr>gap</th>" in ranking and ">approximation_<wbr>gap</th>" in ranking  # test group
    assert f"{attrs['amortization_gap']:.4g}" in ranking


def test_train_metrics_and_output_include_the_gaps(
    tmp_path: Path, tiny, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = tiny(train={"epochs": 2, "iwae_k": 5, "gap_examples": 16, "gap_steps": 20})
    result = train_config(config, tmp_path / "run", device="cpu")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("amortization_gap", "approximation_gap", "amortization_gap_se", "approximation_gap_se"):
        assert saved[key] == result.metrics[key] and isinstance(saved[key], float), key
    assert saved["gap_examples"] == 16 and saved["gap_steps"] == 20
    # the command prints them on its one result line
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    code, out, err = cli(capsys, monkeypatch, "train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "again"),
                         "--device", "cpu")
    assert code == 0, err
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["amortization_gap"] == saved["amortization_gap"]  # same config, same numbers
    assert f"amortization gap {saved['amortization_gap']:.2f}" in out
    assert f"approximation gap {saved['approximation_gap']:.2f}" in out
