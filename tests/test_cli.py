"""The `tuner` command's contract for bad input: one line on stderr naming the problem, exit code 2,
and nothing written to the store. Runs `tuner.cli.main` in-process (the subprocess path is covered
in test_train.py and test_worker.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState, create_trial

from tuner.cli import main
from tuner.study.launch import study_summary
from tuner.study.spec import parse_study_spec
from tuner.study.strategy import collapse_constraint_attrs
from tuner.vae.data import load_array


def spec_dict(npz: Path, db: Path) -> dict[str, Any]:
    return {
        "study": "cli",
        "storage": f"sqlite:///{db}",
        "base": {"data": {"dataset": f"npz:{npz}"}, "model": {"hidden": 32, "depth": 1}},
        "space": {"model.latent": {"type": "int", "low": 2, "high": 8},
                  "kl.schedule": {"type": "categorical", "choices": ["constant", "cyclical"]}},
        "budget": {"trials": 2, "epochs": 1},
    }


def merged(base: dict[str, Any], edit: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in edit.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run_main(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["tuner", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


BAD_SPECS = [
    ({"study": "has space"}, "study"),
    ({"colour": "blue"}, "unknown key 'colour'"),
    ({"storage": "mysql://root@localhost/db"}, "storage"),
    ({"storage": "postgresql+psycopg://u:hunter2@127.0.0.1:1/db"}, "127.0.0.1:1"),
    ({"base": {"data": {"dataset": "npz:/no/such/file.npz"}}}, "does not exist"),
    ({"base": {"data": {"dataset": "cifar10"}}}, "mnist5k"),
    ({"base": {"model": {"latnet": 3}}}, "base.model.latnet"),
    ({"space": {"model.latnet": {"type": "int", "low": 1, "high": 2}}}, "model.latnet"),
    ({"space": {"seed": {"type": "int", "low": 1, "high": 2}}}, "seed"),
    ({"space": {"model.latent": {"type": "int", "low": 9, "high": 2}}}, "model.latent"),
    ({"space": {"optim.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}}, "optim.lr"),
    ({"space": {"kl.schedule": {"type": "categorical", "choices": []}}}, "kl.schedule"),
    ({"space": {"model.latent": {"type": "int", "low": 2, "high": 100000}}}, "model.latent"),
    ({"space": {"kl.cycles": {"type": "int", "low": 2, "high": 4, "when": {"model.latent": 4}}}}, "when"),
    ({"space": {"kl.cycles": {"type": "int", "low": 2, "high": 4, "when": {"kl.schedule": "sigmoidal"}}}}, "sigmoidal"),
    ({"sampler": {"name": "bayesopt"}}, "sampler.name"),
    ({"pruner": {"name": "asha"}}, "pruner.name"),
    ({"objective": "multi", "pruner": {"name": "median"}}, "prune"),
    ({"objective": "elbo"}, "objective"),
    ({"budget": {"trials": -3}}, "budget.trials"),
    ({"budget": {"epochs": 0}}, "budget.epochs"),
    ({"budget": {"timeout": -1}}, "budget.timeout"),
    ({"workers": {"count": 0}}, "workers.count"),
]


@pytest.mark.parametrize(("edit", "phrase"), BAD_SPECS, ids=[p for _, p in BAD_SPECS])
def test_bad_study_spec_one_line_exit_2_nothing_written(edit, phrase, tmp_path, small_npz, capsys, monkeypatch) -> None:
    db = tmp_path / "store" / "t.db"
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(merged(spec_dict(small_npz, db), edit)))
    code, err = run_main(capsys, monkeypatch, "run", str(path))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: ") and phrase in lines[0], err
    assert "hunter2" not in err
    assert not db.exists() and not db.parent.exists()


def test_malformed_and_missing_spec_files(tmp_path, capsys, monkeypatch) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: x\nspace: {model.latent: [1, 2\n")
    code, err = run_main(capsys, monkeypatch, "run", str(bad))
    assert code == 2 and "malformed YAML at line" in err and len(err.strip().splitlines()) == 1
    code, err = run_main(capsys, monkeypatch, "run", str(tmp_path / "missing.yaml"))
    assert code == 2 and "does not exist" in err


def test_worker_and_status_bad_input(tmp_path, capsys, monkeypatch) -> None:
    url = f"sqlite:///{tmp_path}/none.db"
    code, err = run_main(capsys, monkeypatch, "worker", "--study", "nope", "--storage", url)
    assert code == 2 and "no study 'nope'" in err
    assert not (tmp_path / "none.db").exists()  # joining never creates a store
    code, err = run_main(capsys, monkeypatch, "status", "--storage", "postgresql+psycopg://a:s3cret@127.0.0.1:1/x")
    assert code == 2 and "s3cret" not in err and len(err.strip().splitlines()) == 1


def test_data_cache_writes_the_mnist5k_file(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["tuner", "data-cache", "--out", str(tmp_path / "cache")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    path = tmp_path / "cache" / "mnist5k.npz"
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith(f"mnist5k: {path} (")
    with np.load(path) as npz:
        np.testing.assert_array_equal(npz["x"] / np.float32(255.0), load_array("mnist5k")[0])


def test_run_summary_without_pandas_counts_and_best(tmp_path, small_npz) -> None:
    # what `tuner run` prints instead of the ranking on a host without pandas (run there in test_imports.py)
    spec = parse_study_spec(spec_dict(small_npz, tmp_path / "s.db"))
    study = optuna.create_study()
    study.add_trial(create_trial(value=90.0, system_attrs=collapse_constraint_attrs(True)))  # collapsed: never best
    study.add_trial(create_trial(state=TrialState.PRUNED))
    assert study_summary(study, spec) == "1 complete, 1 pruned, 0 failed trials; no complete trial without collapse yet"
    study.add_trial(create_trial(value=101.234, system_attrs=collapse_constraint_attrs(False)))
    study.add_trial(create_trial(state=TrialState.FAIL))
    assert study_summary(study, spec) == (
        "2 complete, 1 pruned, 1 failed trials; best: trial 2, validation iwae_nll 101.23 nats"
    )
    multi_spec = merged(spec_dict(small_npz, tmp_path / "s.db"), {"objective": "multi", "pruner": {"name": "none"}})
    multi = parse_study_spec(multi_spec)
    pareto = optuna.create_study(directions=["minimize", "minimize"])
    for values, collapsed in (([100.0, 0.5], False), ([105.0, 0.2], False), ([110.0, 0.6], False), ([90.0, 0.0], True)):
        pareto.add_trial(create_trial(values=values, system_attrs=collapse_constraint_attrs(collapsed)))
    assert study_summary(pareto, multi) == (
        "4 complete, 0 pruned, 0 failed trials; 2 on the Pareto front (validation iwae_nll, inactive fraction)"
    )
