"""A study's first trials (tuner.study.start): the base config enqueued first, the spec's own
``enqueue`` list, and warm starts from an earlier study in another store, fitted to the new space
(clipped, snapped or left out with one line each). Real SQLite stores; the trials are asked the way
a worker asks them (``study.ask`` then ``space.sample``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from tuner.cli import main
from tuner.errors import TunerError
from tuner.study import space
from tuner.study.launch import prepare
from tuner.study.open import create_or_resume
from tuner.study.spec import parse_study_spec
from tuner.study.start import WarmStart, base_params
from tuner.study.strategy import collapse_constraint_attrs


def spec_dict(npz: Path, db: Path, **over: Any) -> dict[str, Any]:
    return {
        "study": "start",
        "storage": f"sqlite:///{db}",
        "base": {"data": {"dataset": f"npz:{npz}"}, "model": {"hidden": 32, "depth": 1, "latent": 4},
                 "optim": {"lr": 1e-3}},
        "space": {
            "model.latent": {"type": "int", "low": 2, "high": 8},
            "optim.lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
            "model.dropout": {"type": "float", "low": 0.0, "high": 0.3, "step": 0.05},
            "kl.schedule": {"type": "categorical", "choices": ["constant", "cyclical"]},
            "kl.cycles": {"type": "int", "low": 2, "high": 6, "when": {"kl.schedule": "cyclical"}},
        },
        "budget": {"trials": 4, "epochs": 1},
        **over,
    }


def ask_like_a_worker(study: optuna.Study, spec) -> dict[str, Any]:
    return space.sample(study.ask(), spec)


def test_new_study_asks_the_base_config_then_the_listed_ones_first(tmp_path, small_npz) -> None:
    extra = {"model.latent": 8, "kl.schedule": "cyclical", "kl.cycles": 3}
    spec = parse_study_spec(spec_dict(small_npz, tmp_path / "s.db", enqueue=[extra]))
    study = create_or_resume(spec)
    base = ask_like_a_worker(study, spec)
    # the base's values where they lie in the space (defaults: dropout 0.0, kl.schedule constant)
    assert base == {"model.latent": 4, "optim.lr": 1e-3, "model.dropout": 0.0, "kl.schedule": "constant"}
    listed = ask_like_a_worker(study, spec)
    assert {k: listed[k] for k in extra} == extra  # what it does not list, the sampler chose
    create_or_resume(spec)  # resuming enqueues nothing again
    assert not [t for t in study.get_trials() if t.state == TrialState.WAITING]
    # enqueue_base false: the sampler starts
    off = parse_study_spec(spec_dict(small_npz, tmp_path / "o.db", enqueue_base=False))
    assert not create_or_resume(off).get_trials()


def test_a_listed_config_outside_the_space_is_one_line_and_writes_nothing(tmp_path, small_npz) -> None:
    db = tmp_path / "s.db"
    spec = parse_study_spec(spec_dict(small_npz, db, enqueue=[{"model.latent": 40}]))
    with pytest.raises(TunerError, match=r"enqueue\[0\] model.latent: 40 -> 8"):
        create_or_resume(spec)
    assert not db.exists()
    with pytest.raises(ValueError, match=r"enqueue\[0\]: model.hidden is not in the space"):
        parse_study_spec(spec_dict(small_npz, db, enqueue=[{"model.hidden": 64}]))


def test_fit_clips_snaps_and_leaves_out_with_a_line_each(tmp_path, small_npz) -> None:
    spec = parse_study_spec(spec_dict(small_npz, tmp_path / "s.db"))
    params, notes = space.fit(spec, {"model.latent": 12.6, "optim.lr": 1e-5, "model.dropout": 0.12,
                                     "kl.schedule": "linear", "kl.cycles": 4, "model.depth": 2})
    assert params == {"model.latent": 8, "optim.lr": 1e-4, "model.dropout": 0.1}
    assert notes == [
        "model.latent: 12.6 -> 8 (range [2, 8])",
        "optim.lr: 1e-05 -> 0.0001 (range [0.0001, 0.003])",
        "model.dropout: 0.12 -> 0.1 (range [0.0, 0.3], step 0.05)",
        "kl.schedule: 'linear' left out (not among the choices ['constant', 'cyclical'])",
        "kl.cycles: left out (applies only when {'kl.schedule': 'cyclical'})",
        "model.depth: left out (not in this space)",
    ]
    assert base_params(spec) == {"model.latent": 4, "optim.lr": 1e-3, "model.dropout": 0.0, "kl.schedule": "constant"}


def _earlier_study(url: str) -> None:
    """An earlier study in another store, with another space: trials 0-3, trial 1 collapsed."""
    study = optuna.create_study(study_name="old", storage=url)
    dists = {"model.latent": IntDistribution(2, 64), "optim.lr": FloatDistribution(1e-5, 1e-2, log=True),
             "kl.schedule": CategoricalDistribution(["constant", "linear", "cyclical"]),
             "model.depth": IntDistribution(1, 3)}
    rows = [(104.0, False, 16, 2e-3, "constant"), (90.0, True, 6, 1e-3, "cyclical"),
            (101.0, False, 32, 5e-3, "linear"), (120.0, False, 3, 1e-3, "constant")]
    for value, collapsed, latent, lr, schedule in rows:
        study.add_trial(create_trial(value=value, params={"model.latent": latent, "optim.lr": lr,
                                                          "kl.schedule": schedule, "model.depth": 2},
                                     distributions=dists, user_attrs={"collapsed": collapsed},
                                     system_attrs=collapse_constraint_attrs(collapsed)))
    study.add_trial(create_trial(state=TrialState.PRUNED, params={"model.latent": 5},
                                 distributions={"model.latent": dists["model.latent"]}))


def test_warm_start_enqueues_the_best_of_an_earlier_study_first(tmp_path, small_npz) -> None:
    old_url = f"sqlite:///{tmp_path}/old.db"
    _earlier_study(old_url)
    spec = parse_study_spec(spec_dict(small_npz, tmp_path / "new.db"))
    lines: list[str] = []
    result, _ = prepare(spec, spec.storage, tmp_path / "art", WarmStart("old", old_url, top=2),
                        console=_Lines(lines))
    study = result.study
    # best first, the collapsed trial (lowest value) after the good ones: trials 2 then 0, then the base
    first, second, third = (ask_like_a_worker(study, spec) for _ in range(3))
    assert "kl.schedule" not in study.trials[0].system_attrs["fixed_params"]  # 'linear': the sampler chooses
    assert {k: first[k] for k in ("model.latent", "optim.lr")} == {"model.latent": 8, "optim.lr": 3e-3}
    assert {k: second[k] for k in ("model.latent", "optim.lr", "kl.schedule")} == {
        "model.latent": 8, "optim.lr": 2e-3, "kl.schedule": "constant"}
    assert third == base_params(spec)
    assert "warm start from old trial 2: model.latent: 32 -> 8 (range [2, 8])" in lines
    assert "warm start from old trial 2: kl.schedule: 'linear' left out (not among the choices " \
           "['constant', 'cyclical'])" in lines
    assert "warm start from old trial 0: model.depth: left out (not in this space)" in lines
    assert lines[-1] == "warm start: 2 config(s) from study 'old' enqueued first"


class _Lines:
    """A console stand-in that keeps what is printed."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def print(self, text: str) -> None:
        self.lines.append(text)


def run_main(capsys, monkeypatch, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["tuner", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def test_warm_start_from_a_missing_study_is_one_line_exit_2_and_creates_nothing(tmp_path, small_npz, capsys,
                                                                                 monkeypatch) -> None:
    db = tmp_path / "new.db"
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict(small_npz, db)))
    old_url = f"sqlite:///{tmp_path}/old.db"
    _earlier_study(old_url)
    for args, phrase in (
        (["--warm-start", "nope", "--from", old_url], "no study 'nope'"),
        (["--warm-start", "old", "--from", f"sqlite:///{tmp_path}/none.db"], "the file does not exist"),
        (["--from", old_url], "add --warm-start STUDY"),
    ):
        code, err = run_main(capsys, monkeypatch, "run", str(path), *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and phrase in err, err
    assert not db.exists() and not (tmp_path / "none.db").exists()
