"""Ranking: a real tiny study (one real worker, real SQLite) ranked with collapse last and pruned
trials listed with their reasons; every output format through the command; ordering, collapse and
Pareto rules on a constructed study whose answers are known."""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
import yaml
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from test_worker import study_yaml

from tuner.cli import main
from tuner.errors import TunerError
from tuner.results.ranking import pareto_front, rank_study, ranking_frame, ranking_records
from tuner.study.open import create_or_resume
from tuner.study.spec import parse_study_spec
from tuner.study.worker import Worker

HEALTHY_A = {"model.latent": 8, "kl.beta": 1.0, "optim.lr": 1e-2}
HEALTHY_B = {"model.latent": 4, "kl.beta": 1.0, "optim.lr": 1e-2}
COLLAPSING = {"model.latent": 8, "kl.beta": 30.0, "optim.lr": 1e-2}  # beta 30 shuts the latent code
STALLED = {"model.latent": 8, "kl.beta": 1.0, "optim.lr": 1e-6}  # learns nothing: pruned


@dataclass
class Built:
    url: str
    name: str
    art: Path
    study: optuna.Study


def build_study(tmp: Path, npz: Path, name: str, enqueue: list[dict], **over) -> Built:
    """A tiny real study: one worker, one slot (trials run in the enqueued order), 3 epochs each.

    Batch 32 at lr 1e-2 trains a healthy code in 3 epochs on the 700-image train split."""
    url = f"sqlite:///{tmp}/{name}.db"
    space = {"model.latent": {"type": "categorical", "choices": [4, 8]},
             "kl.beta": {"type": "categorical", "choices": [1.0, 30.0]},
             "optim.lr": {"type": "categorical", "choices": [1e-2, 1e-6]}}
    over = {"base": {"data": {"dataset": f"npz:{npz}"}, "model": {"hidden": 32, "depth": 1},
                     "optim": {"batch_size": 32}, "kl": {"schedule": "constant"}, "train": {"iwae_k": 5, "gap_examples": 16, "gap_steps": 20}},
            "space": space, "budget": {"trials": len(enqueue), "epochs": 3}, **over}
    spec = study_yaml(tmp, npz, name, url, **over)
    study = create_or_resume(parse_study_spec(yaml.safe_load(spec.read_text())))
    for params in enqueue:
        study.enqueue_trial(params)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only fight the other test processes for CPUs
    try:
        Worker(url, name, slots=1, device="cpu", artifacts=tmp / "art", log=lambda s: None).run()
    finally:
        torch.set_num_threads(threads)
    return Built(url, name, tmp / "art", study)


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory, small_npz: Path) -> Built:
    """The collapsing trial completes first (the median pruner's reference), two healthy ones follow,
    and the stalled one is pruned by the median rule."""
    built = build_study(
        tmp_path_factory.mktemp("rank"), small_npz, "rank", [COLLAPSING, HEALTHY_A, HEALTHY_B, STALLED],
        pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 1},
    )
    states = [t.state for t in built.study.get_trials()]
    assert states == [TrialState.COMPLETE] * 3 + [TrialState.PRUNED], states
    return built


def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str, str]:
    """`tuner ARGS` in-process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["tuner", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


# ------------------------------------------------------------------------------ the real study
def test_real_study_ranks_healthy_by_nll_then_collapsed(real: Built) -> None:
    _, frame = rank_study(real.url, real.name)
    trials = {t.number: t for t in real.study.get_trials()}
    assert list(frame["rank"]) == [1, 2, 3] and set(frame["state"]) == {"complete"}
    assert sorted(frame["trial"]) == [0, 1, 2]  # the pruned trial 3 is not ranked
    for _, row in frame.iterrows():  # every number is the one the worker stored
        t = trials[row["trial"]]
        for name in ("iwae_nll", "recon", "kl", "active_units", "mutual_info", "collapsed", "test_iwae_nll"):
            assert row[name] == t.user_attrs[name], name
        assert row["value"] == t.values[0] and row["params.kl.beta"] == t.params["kl.beta"]
    assert bool(frame.set_index("trial").loc[0, "collapsed"])  # beta 30: no information in the code
    healthy = frame[~frame["collapsed"]]
    assert len(healthy) >= 1, "the fixture needs a healthy trial"
    # healthy ones first, by NLL; collapsed ones after them, by NLL
    n = len(healthy)
    assert list(frame["collapsed"]) == [False] * n + [True] * (3 - n)
    for part in (frame.iloc[:n], frame.iloc[n:]):
        assert list(part["iwae_nll"]) == sorted(part["iwae_nll"])
    # Pareto over (NLL, recon, inactive fraction): the best NLL is never dominated
    assert frame.loc[frame["iwae_nll"].idxmin(), "pareto"]


def test_states_list_pruned_trials_with_their_reason(real: Built, capsys, monkeypatch) -> None:
    _, frame = rank_study(real.url, real.name, states=["complete", "pruned"])
    pruned = frame[frame["state"] == "pruned"]
    assert list(pruned["trial"]) == [3] and pruned["rank"].isna().all()
    assert list(frame["trial"][:3]) == list(rank_study(real.url, real.name)[1]["trial"])  # ranked ones first
    reason = real.study.get_trials()[3].user_attrs["prune_reason"]
    assert reason.startswith("pruned at epoch") and "by median" in reason
    assert pruned["reason"].iloc[0] == reason
    # only pruned ones, through the command, as a table with a reason column
    code, out, _ = cli(capsys, monkeypatch, "rank", real.name, "--storage", real.url, "--states", "pruned")
    assert code == 0
    assert "reason" in out and "pruned at epoch" in out and "complete" not in out


def test_json_format_has_the_documented_fields(real: Built, capsys, monkeypatch) -> None:
    code, out, err = cli(capsys, monkeypatch, "rank", real.name, "--storage", real.url, "--format", "json")
    assert code == 0, err
    records = json.loads(out)
    assert [r["rank"] for r in records] == [1, 2, 3]
    for key in ("trial", "rank", "iwae_nll", "recon", "kl", "active_units", "collapsed", "pareto", "params"):
        assert all(key in r for r in records), key
    by_trial = {t.number: t for t in real.study.get_trials()}
    for r in records:
        t = by_trial[r["trial"]]
        assert r["params"] == t.params  # nested, named as in the space
        assert r["iwae_nll"] == pytest.approx(t.user_attrs["iwae_nll"], rel=1e-12)
        assert isinstance(r["collapsed"], bool) and isinstance(r["pareto"], bool)
    assert [r["trial"] for r in records] == list(rank_study(real.url, real.name)[1]["trial"])


def test_csv_parquet_markdown_and_table_formats(real: Built, tmp_path: Path, capsys, monkeypatch) -> None:
    _, expected = rank_study(real.url, real.name, top=2)
    base = ("rank", real.name, "--storage", real.url, "--top", "2")
    code, out, _ = cli(capsys, monkeypatch, *base, "--format", "csv")
    assert code == 0
    csv = pd.read_csv(io.StringIO(out))
    assert list(csv["trial"]) == list(expected["trial"]) and "params.model.latent" in csv.columns
    assert np.allclose(csv["iwae_nll"], expected["iwae_nll"])

    code, out, _ = cli(capsys, monkeypatch, *base, "--format", "parquet", "--out", str(tmp_path / "r.parquet"))
    assert code == 0 and "r.parquet (2 rows)" in out
    parquet = pd.read_parquet(tmp_path / "r.parquet")
    assert list(parquet["trial"]) == list(expected["trial"])
    assert list(parquet["iwae_nll"]) == list(expected["iwae_nll"])  # binary: exact
    assert list(parquet["collapsed"]) == list(expected["collapsed"])

    code, out, _ = cli(capsys, monkeypatch, *base, "--format", "markdown")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4  # header, separator, two rows
    assert [c.strip() for c in lines[0].strip("|").split("|")][:3] == ["rank", "trial", "state"]
    assert set(lines[1]) <= set("|-: ")

    code, out, _ = cli(capsys, monkeypatch, *base)  # the default: a table
    assert code == 0
    for header in ("rank", "trial", "latent", "beta", "NLL", "recon", "KL", "AU", "MI", "collapse", "pareto",
                   "epochs", "state"):
        assert header in out, header
    assert f"{expected['iwae_nll'].iloc[0]:.2f}" in out


# ------------------------------------------------------------------------- a constructed study
# trial: (iwae_nll, recon, neg_elbo, active_units, collapsed); latent 8 everywhere
CASES = {
    0: (100.0, 80.0, 105.0, 6, False),
    1: (95.0, 90.0, 96.0, 1, True),  # best NLL, but collapsed
    2: (110.0, 70.0, 112.0, 8, False),  # best reconstruction, every unit active
    3: (120.0, 85.0, 125.0, 4, False),  # worse than trial 0 on NLL, recon and inactive fraction
}


@pytest.fixture
def made(tmp_path: Path) -> optuna.Study:
    study = optuna.create_study(study_name="made", storage=f"sqlite:///{tmp_path}/made.db")
    dists = {"model.latent": IntDistribution(2, 8), "optim.lr": FloatDistribution(1e-4, 1e-1, log=True)}
    for number, (nll, recon, elbo, au, collapsed) in CASES.items():
        attrs = {"iwae_nll": nll, "recon": recon, "kl": elbo - recon, "neg_elbo": elbo, "active_units": au,
                 "latent_size": 8, "inactive_fraction": 1 - au / 8, "mutual_info": 0.1 if collapsed else 3.0,
                 "collapsed": collapsed, "epochs": 3}
        study.add_trial(create_trial(value=nll, params={"model.latent": 8, "optim.lr": 1e-3 * (number + 1)},
                                     distributions=dists, user_attrs=attrs))
    study.add_trial(create_trial(state=TrialState.PRUNED, params={"model.latent": 2, "optim.lr": 1e-2},
                                 distributions=dists, user_attrs={"prune_reason": "pruned at epoch 1 by median"}))
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"error": "data file missing on host b"}))
    return study


@pytest.mark.parametrize(("by", "include_collapsed", "order"), [
    ("nll", False, [0, 2, 3, 1]),  # collapsed last though its NLL is the best
    ("nll", True, [1, 0, 2, 3]),  # ranked by the metric alone
    ("recon", False, [2, 0, 3, 1]),
    ("elbo", False, [0, 2, 3, 1]),
    ("au", False, [2, 0, 3, 1]),  # more active units first
])
def test_order_by_metric_and_collapse(made: optuna.Study, by: str, include_collapsed: bool, order: list[int]) -> None:
    frame = ranking_frame(made, by=by, include_collapsed=include_collapsed)
    assert list(frame["trial"]) == order and list(frame["rank"]) == [1, 2, 3, 4]
    assert list(frame["collapsed"]) == [CASES[n][4] for n in order]


def test_pareto_flags_and_top(made: optuna.Study) -> None:
    frame = ranking_frame(made).set_index("trial")
    # 1 has the best NLL, 2 the best recon and inactive fraction, 0 is beaten by neither; 0 beats 3
    assert frame["pareto"].to_dict() == {0: True, 2: True, 3: False, 1: True}
    assert list(ranking_frame(made, top=2)["trial"]) == [0, 2]
    assert list(ranking_frame(made, by="au", top=1)["trial"]) == [2]


def test_other_states_follow_unranked_with_reasons(made: optuna.Study) -> None:
    frame = ranking_frame(made, states=["complete", "pruned", "fail"], top=1)
    assert list(frame["trial"]) == [0, 4, 5] and list(frame["state"]) == ["complete", "pruned", "fail"]
    assert frame["rank"].isna().tolist() == [False, True, True]
    assert list(frame["reason"][1:]) == ["pruned at epoch 1 by median", "data file missing on host b"]
    records = ranking_records(frame)
    assert records[1]["rank"] is None and records[1]["params"] == {"model.latent": 2, "optim.lr": 1e-2}
    assert records[2]["params"] == {} and records[2]["pareto"] is False


def test_pareto_front_on_points() -> None:
    points = np.array([
        [1.0, 5.0, 0.0],
        [2.0, 2.0, 0.0],
        [2.0, 2.0, 0.0],  # a duplicate: neither dominates the other
        [3.0, 3.0, 0.0],  # dominated by both rows above
        [0.5, np.nan, 0.0],  # unknown: off the front, dominates nothing
        [5.0, 1.0, 0.5],
    ])
    assert pareto_front(points).tolist() == [True, True, True, False, False, True]
    assert pareto_front(np.empty((0, 3))).tolist() == []


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"by": "loss"}, "--by 'loss' is not one of nll, recon, elbo, au"),
    ({"states": ["complete", "done"]}, "--states 'done' is not one of"),
    ({"top": 0}, "--top must be at least 1, but got top=0"),
])
def test_bad_options_name_the_value(made: optuna.Study, kwargs: dict, words: str) -> None:
    with pytest.raises(TunerError, match=words.replace("(", r"\(")):
        ranking_frame(made, **kwargs)
