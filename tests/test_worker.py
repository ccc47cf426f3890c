"""Workers against real stores and real processes: budgets, pruning, NaN slots, Ctrl-C hand-back,
and bad input that leaves nothing behind (kill -9, store outages and unusable hosts: test_faults.py).

The helpers here (study_yaml, run_cli, trials, by_state, wait_for) are shared with test_faults.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
import yaml
from optuna.trial import TrialState

from tuner.study.open import ID_ATTR, create_or_resume
from tuner.study.spec import parse_study_spec
from tuner.study.worker import Worker

TUNER = [sys.executable, "-m", "tuner"]


def study_yaml(tmp_path: Path, npz: Path, name: str, url: str, **over: Any) -> Path:
    """A tiny study: a 1k-image MNIST slice, small MLPs, 3 epochs, fast heartbeats."""
    spec: dict[str, Any] = {
        "study": name,
        "storage": url,
        "base": {
            "data": {"dataset": f"npz:{npz}"},
            "model": {"hidden": 32, "depth": 1},
            "optim": {"batch_size": 64},
            "kl": {"schedule": "constant"},
            "train": {"iwae_k": 5, "gap_examples": 16, "gap_steps": 20},  # gaps measured, cheaply
        },
        "space": {
            "model.latent": {"type": "int", "low": 2, "high": 8},
            "optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
        },
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "budget": {"trials": 4, "epochs": 3},
        "workers": {"count": 2, "heartbeat_interval": 1, "grace_period": 3},
        "enqueue_base": False,  # trials as the sampler (or a test's enqueue) orders them; tests/test_start.py
    }
    for key, value in over.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and isinstance(spec.get(key), dict) else value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_cli(*args: str, timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([*TUNER, *args], capture_output=True, text=True, timeout=timeout, env=env)


def trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name=name, storage=url).get_trials()
    except (KeyError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):
        # the study (or its tables) is being created: opening the store races the other process's
        # schema setup (both insert alembic_version's row; the loser gets IntegrityError)
        return []


def by_state(ts: list[optuna.trial.FrozenTrial], state: TrialState) -> list[optuna.trial.FrozenTrial]:
    return [t for t in ts if t.state == state]


def checkpoint_file(art: Path, url: str, name: str, number: int) -> Path:
    """Where a worker keeps trial ``number``'s checkpoint: under the study's identity, not its name."""
    key = optuna.load_study(study_name=name, storage=url).user_attrs[ID_ATTR]
    return art / key / str(number) / "checkpoint.pt"


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_two_workers_complete_the_budget(store: str, tmp_path: Path, small_npz: Path, request) -> None:
    url = f"sqlite:///{tmp_path}/s.db" if store == "sqlite" else request.getfixturevalue("pg_url")
    spec = study_yaml(tmp_path, small_npz, "two", url)
    proc = run_cli("run", str(spec), "--workers", "2", "--artifacts", str(tmp_path / "art"))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    ts = trials(url, "two")
    complete = by_state(ts, TrialState.COMPLETE)
    assert len(complete) >= 4 and len({t.number for t in ts}) == len(ts)
    logs = sorted((tmp_path / "art" / "two" / "workers").glob("worker-*.log"))
    assert len(logs) == 2  # two worker processes joined the study and ended cleanly
    assert all("worker done:" in log.read_text() for log in logs)
    trained = sum(int(log.read_text().split("worker done: ")[1].split(" complete")[0]) for log in logs)
    assert trained == len(complete)  # every complete trial was told by one of them, once
    for t in complete:
        assert sorted(t.intermediate_values) == [1, 2, 3]  # val -ELBO reported every epoch
        for key in ("iwae_nll", "recon", "kl", "active_units", "mutual_info", "collapsed", "best_epoch",
                    "wall_s", "device", "seed", "config_hash", "versions", "test_iwae_nll", "decoder_ortho_cos"):
            assert key in t.user_attrs, key
        assert t.values[0] == pytest.approx(t.user_attrs["iwae_nll"])
        assert checkpoint_file(tmp_path / "art", url, "two", t.number).is_file()  # 4 trials <= keep_top
    assert "rank" in proc.stdout and "NLL" in proc.stdout  # the ranking is printed at the end
    # running it again continues the same study: the budget is met, nothing new is trained
    again = run_cli("run", str(spec), "--workers", "2", "--artifacts", str(tmp_path / "art"))
    assert again.returncode == 0 and len(trials(url, "two")) == len(ts)


def test_bad_learning_rates_are_pruned_before_max_epochs(tmp_path: Path, small_npz: Path) -> None:
    url = f"sqlite:///{tmp_path}/p.db"
    spec = study_yaml(
        tmp_path, small_npz, "prune", url,
        space={"optim.lr": {"type": "categorical", "choices": [3e-3, 1e-6]}},
        pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 1},
        budget={"trials": 6, "epochs": 6},
    )
    study = create_or_resume(parse_study_spec(yaml.safe_load(spec.read_text())))
    study.enqueue_trial({"optim.lr": 3e-3})  # one good trial completes first: the pruner's reference
    for _ in range(2):  # then bad ones for sure (the worker's sampler seed depends on its pid)
        study.enqueue_trial({"optim.lr": 1e-6})
    Worker(url, "prune", slots=1, device="cpu", artifacts=tmp_path / "art", log=lambda s: None).run()
    ts = study.get_trials()
    bad = [t for t in ts if t.params["optim.lr"] == 1e-6]
    assert bad and ts[0].state == TrialState.COMPLETE
    for t in bad:  # a learning rate 3000x too small is pruned at the first epoch the pruner looks at
        assert t.state == TrialState.PRUNED
        assert max(t.intermediate_values) <= 2 < 6
        assert t.user_attrs["prune_reason"].startswith("pruned at epoch")
        assert "by median" in t.user_attrs["prune_reason"]
        # no value (Optuna's tell would copy the last val -ELBO into it); the -ELBO curve is kept
        assert t.values is None and all(v > 150 for v in t.intermediate_values.values())
    fresh = optuna.load_study(study_name="prune", storage=url).get_trials()  # as any other reader sees it
    assert [t.values is None for t in fresh] == [t.state == TrialState.PRUNED for t in fresh]


def test_nan_slot_is_pruned_with_a_reason_while_neighbours_finish(tmp_path: Path, small_npz: Path) -> None:
    url = f"sqlite:///{tmp_path}/n.db"
    spec = study_yaml(
        tmp_path, small_npz, "nan", url,
        space={"optim.lr": {"type": "categorical", "choices": [0.01, 10.0, 0.02]}},
        base={"data": {"dataset": f"npz:{small_npz}"}, "model": {"hidden": 32, "depth": 1},
              "optim": {"name": "sgd", "batch_size": 64}, "train": {"iwae_k": 5}},
        sampler={"name": "grid", "seed": 0}, budget={"trials": 3, "epochs": 2},
    )
    study = create_or_resume(parse_study_spec(yaml.safe_load(spec.read_text())))
    w = Worker(url, "nan", slots=3, device="cpu", artifacts=tmp_path / "art", log=lambda s: None)
    w.run()
    ts = study.get_trials()
    bad = [t for t in ts if t.params["optim.lr"] == 10.0]  # SGD at lr 10 diverges in its first epoch
    good = [t for t in ts if t.params["optim.lr"] != 10.0]
    assert len(bad) == 1 and bad[0].state == TrialState.PRUNED
    assert "non-finite" in bad[0].user_attrs["prune_reason"]
    assert all(t.state == TrialState.COMPLETE for t in good) and len(good) == 2
    # all three trained side by side in one population of 3
    assert len({t.user_attrs["worker"] for t in ts}) == 1 and w.slots == 3


def wait_for(predicate, timeout: float, what: str) -> None:
    """Poll ``predicate`` every 0.2 s until true; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_ctrl_c_hands_trials_back_and_rerun_continues(tmp_path: Path, small_npz: Path) -> None:
    url = f"sqlite:///{tmp_path}/c.db"
    spec = study_yaml(tmp_path, small_npz, "ctrlc", url, budget={"trials": 3, "epochs": 30})
    art = str(tmp_path / "art")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([*TUNER, "run", str(spec), "--workers", "1", "--artifacts", art], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: Path(f"{tmp_path}/c.db").exists() and any(
        len(t.intermediate_values) >= 2 for t in trials(url, "ctrlc")), 300, "2 epochs")  # slow under a loaded CI
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "run `tuner run" in out
    ts = trials(url, "ctrlc")
    assert not by_state(ts, TrialState.RUNNING)  # nothing left dangling
    handed = [t for t in by_state(ts, TrialState.FAIL) if "handed_back" in t.user_attrs]
    assert handed and len(by_state(ts, TrialState.FAIL)) == len(handed)
    assert by_state(ts, TrialState.WAITING)  # its retry waits for the next run
    again = run_cli("run", str(spec), "--workers", "1", "--artifacts", art, timeout=300)
    assert again.returncode == 0, again.stderr
    ts = trials(url, "ctrlc")
    assert len(by_state(ts, TrialState.COMPLETE)) >= 3
    resumed = [t for t in ts if t.system_attrs.get("failed_trial") == handed[0].number]
    assert resumed and resumed[0].state == TrialState.COMPLETE


@pytest.mark.parametrize(
    ("edit", "phrase"),
    [
        ({"storage": "mysql://nobody@nowhere/db"}, "not supported"),
        ({"storage": "postgresql+psycopg://u:hunter2@127.0.0.1:1/db"}, "127.0.0.1:1"),
        ({"base": {"data": {"dataset": "npz:/no/such.npz"}}}, "does not exist"),
        ({"space": {"model.latent": {"type": "int", "low": 9, "high": 2}}}, "model.latent"),
        ({"budget": {"trials": -1}}, "budget.trials"),
    ],
)
def test_bad_input_one_line_exit_2_and_nothing_in_the_store(edit, phrase, tmp_path: Path, small_npz: Path) -> None:
    db = tmp_path / "store" / "t.db"
    spec = study_yaml(tmp_path, small_npz, "bad", f"sqlite:///{db}", **edit)
    proc = run_cli("run", str(spec))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and phrase in lines[0], proc.stderr
    assert "hunter2" not in proc.stderr
    assert not db.exists()


def test_existing_study_with_another_spec_is_refused(tmp_path: Path, small_npz: Path) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    create_or_resume(parse_study_spec(yaml.safe_load(study_yaml(tmp_path, small_npz, "same", url).read_text())))
    other = study_yaml(tmp_path, small_npz, "same", url, budget={"trials": 9})
    proc = run_cli("run", str(other))
    assert proc.returncode == 2 and "exists" in proc.stderr and "another spec" in proc.stderr
    assert len(trials(url, "same")) == 0


def test_status_lists_studies(tmp_path: Path, small_npz: Path) -> None:
    url = f"sqlite:///{tmp_path}/st.db"
    create_or_resume(parse_study_spec(yaml.safe_load(study_yaml(tmp_path, small_npz, "listed", url).read_text())))
    proc = run_cli("status", "--storage", url)
    assert proc.returncode == 0 and "listed" in proc.stdout


def test_shapes_get_their_own_populations_and_multi_objective(tmp_path: Path, small_npz: Path) -> None:
    """Batch size is structural: two batch sizes give two populations in one worker. The multi
    objective (NLL, inactive fraction) completes trials with two values and no pruning."""
    url = f"sqlite:///{tmp_path}/m.db"
    spec = study_yaml(
        tmp_path, small_npz, "multi", url,
        space={"optim.batch_size": {"type": "categorical", "choices": [32, 64]},
               "model.latent": {"type": "int", "low": 2, "high": 8}},
        objective="multi", budget={"trials": 2, "epochs": 2},
    )
    study = create_or_resume(parse_study_spec(yaml.safe_load(spec.read_text())))
    study.enqueue_trial({"optim.batch_size": 32})
    study.enqueue_trial({"optim.batch_size": 64})
    w = Worker(url, "multi", slots=2, device="cpu", artifacts=tmp_path / "art", log=lambda s: None)
    w.run()
    ts = study.get_trials()
    # one population per batch size (each trial records where it trained; idle populations are dropped)
    assert sorted(t.user_attrs["population"].split(" batch ")[1].split()[0] for t in ts) == ["32", "64"]
    assert not w.populations
    assert len(by_state(ts, TrialState.COMPLETE)) == 2
    for t in ts:
        assert len(t.values) == 2
        assert t.values[0] == pytest.approx(t.user_attrs["iwae_nll"])
        assert t.values[1] == pytest.approx(t.user_attrs["inactive_fraction"])
    # the Pareto front holds only feasible trials: collapsed ones violate the collapse constraint
    healthy = {t.number for t in ts if not t.user_attrs["collapsed"]}
    assert {t.number for t in study.best_trials} <= healthy
    assert bool(study.best_trials) == bool(healthy)
