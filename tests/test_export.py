"""Export and backup of a real tiny study: the exported best config retrains (real `tuner train`
process) to the stored test NLL, checkpoints are copied, a SQLite -> PostgreSQL -> SQLite round trip
keeps every attr and intermediate value, and bad input through the real command is one line, exit 2,
with nothing (half-)written."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import optuna
import pandas as pd
import pytest
from test_ranking import HEALTHY_A, HEALTHY_B, STALLED, Built, build_study, cli
from test_worker import TUNER, checkpoint_file, run_cli

from tuner.results.export import backup_study, export_top
from tuner.results.ranking import rank_study
from tuner.spec import load_config, parse_config

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models: extra threads only fight the other tests for CPUs


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory, small_npz: Path) -> Built:
    """Trial 0 (latent 4) completes first, trial 1 (latent 8) beats it, trial 2 is pruned at epoch 1."""
    built = build_study(tmp_path_factory.mktemp("export"), small_npz, "exp", [HEALTHY_B, HEALTHY_A, STALLED],
                        pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 1})
    assert [t.state.name for t in built.study.get_trials()] == ["COMPLETE", "COMPLETE", "PRUNED"]
    return built


@pytest.fixture(scope="module")
def exported(real: Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "nested" / "best"  # parents made as needed
    proc = run_cli("export", real.name, "--storage", real.url, "--top", "2", "--out", str(out),
                   "--artifacts", str(real.art), env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    assert f"exported 2 config(s), 2 checkpoint(s) and ranking.csv to {out}" in proc.stdout
    return out


def test_export_writes_configs_checkpoints_and_ranking(real: Built, exported: Path) -> None:
    _, frame = rank_study(real.url, real.name)
    best, second = (int(n) for n in frame["trial"][:2])
    names = {p.name for p in exported.iterdir()}
    assert names == {f"trial-{best}.yaml", f"trial-{second}.yaml", f"trial-{best}-checkpoint.pt",
                     f"trial-{second}-checkpoint.pt", "ranking.csv"}  # and no staging folder left
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]
    trials = {t.number: t for t in real.study.get_trials()}
    for n in (best, second):
        config = load_config(exported / f"trial-{n}.yaml")  # what `tuner train` reads
        assert config == parse_config(trials[n].user_attrs["config"])
        assert config.seed == trials[n].user_attrs["seed"] and config.data.split_seed == 0
        stored = checkpoint_file(real.art, real.url, real.name, n)
        assert (exported / f"trial-{n}-checkpoint.pt").read_bytes() == stored.read_bytes()
    ranking = pd.read_csv(exported / "ranking.csv")
    assert list(ranking["trial"]) == list(frame["trial"]) and list(ranking["rank"]) == [1, 2]
    assert (exported.stat().st_mode & 0o777) == (exported.parent.stat().st_mode & 0o777)  # not a 0700 temp dir


def test_retraining_the_best_exported_config_reproduces_its_test_nll(real: Built, exported: Path,
                                                                     tmp_path: Path) -> None:
    _, frame = rank_study(real.url, real.name)
    best = int(frame["trial"].iloc[0])
    env = dict(os.environ, **ONE_THREAD)
    proc = subprocess.run([*TUNER, "train", str(exported / f"trial-{best}.yaml"), "--out", str(tmp_path / "re"),
                           "--device", "cpu"], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr
    retrained = json.loads((tmp_path / "re" / "metrics.json").read_text())
    stored = real.study.get_trials()[best].user_attrs
    # same seed, same split, same code path (a population of one): equal up to float summation order
    assert abs(retrained["iwae_nll"] - stored["test_iwae_nll"]) < 1.0
    assert retrained["iwae_nll"] == pytest.approx(stored["test_iwae_nll"], abs=0.05)
    assert retrained["epochs"] == stored["epochs"] and retrained["best_epoch"] == stored["best_epoch"]


def test_export_without_checkpoints_and_into_an_existing_folder(real: Built, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "ranking.csv").write_text("old")
    r = export_top(real.url, real.name, out, top=1, by="recon", artifacts=tmp_path / "no-artifacts")
    _, by_recon = rank_study(real.url, real.name, by="recon")
    assert [p.name for p in r.configs] == [f"trial-{by_recon['trial'].iloc[0]}.yaml"] and r.checkpoints == []
    assert sorted(p.name for p in out.iterdir()) == sorted(["notes.txt", "ranking.csv", r.configs[0].name])
    assert (out / "notes.txt").read_text() == "mine" and (out / "ranking.csv").read_text() != "old"


def _snapshot(url: str, name: str) -> tuple:
    study = optuna.load_study(study_name=name, storage=url)
    trials = [(t.number, t.state, t.values, t.params, t.distributions, t.user_attrs, t.system_attrs,
               t.intermediate_values) for t in study.get_trials()]
    return study.directions, study.user_attrs, trials


def test_backup_sqlite_postgres_sqlite_keeps_everything(real: Built, pg_url: str, tmp_path: Path) -> None:
    proc = run_cli("backup", real.name, "--storage", real.url, "--to", pg_url)
    assert proc.returncode == 0, proc.stderr
    assert f"copied study '{real.name}' (3 trials)" in proc.stdout
    back = f"sqlite:///{tmp_path}/back.db"
    assert backup_study(real.name, pg_url, back) == 3
    original = _snapshot(real.url, real.name)
    assert _snapshot(pg_url, real.name) == original == _snapshot(back, real.name)
    trials = original[2]
    assert all(sorted(t[7]) == [1, 2, 3] for t in trials[:2])  # intermediate values (val -ELBO per epoch)
    assert "prune_reason" in trials[2][5] and "test_iwae_nll" in trials[0][5]
    # the copy ranks the same
    assert rank_study(back, real.name)[1].equals(rank_study(real.url, real.name)[1])


def test_bad_input_through_the_command_is_one_line_exit_2_and_writes_nothing(real: Built, tmp_path: Path) -> None:
    empty = f"sqlite:///{tmp_path}/empty.db"
    optuna.create_study(study_name="empty", storage=empty)
    (tmp_path / "a-file").write_text("")
    src = ("--storage", real.url)
    cases = {  # args -> words the one line must hold
        ("rank", "nope", *src): "no study 'nope' in",
        ("rank", "empty", "--storage", empty): "study 'empty' has no complete trial yet (no trials)",
        ("rank", real.name, "--storage", "postgresql+psycopg://postgres@127.0.0.1:1/x"): "connection refused",
        ("export", real.name, *src, "--out", f"{tmp_path}/a-file/sub"): "/a-file' is not a writable folder",
        ("export", real.name, *src, "--top", "0", "--out", f"{tmp_path}/x/top0"): "--top must be at least 1",
    }
    env = dict(os.environ, **ONE_THREAD)
    procs = {args: subprocess.Popen([*TUNER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=env) for args in cases}  # all at once: each is mostly start-up
    for args, words in cases.items():
        out, err = procs[args].communicate(timeout=120)
        lines = err.strip().splitlines()
        assert procs[args].returncode == 2, (args, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], (args, err)
        assert out == "", (args, out)
    assert (tmp_path / "a-file").is_file() and not (tmp_path / "x").exists()
    assert optuna.load_study(study_name="empty", storage=empty).get_trials() == []


def test_more_bad_input_is_one_line_exit_2_and_writes_nothing(real: Built, tmp_path: Path, capsys,
                                                              monkeypatch) -> None:
    taken = f"sqlite:///{tmp_path}/taken.db"
    optuna.create_study(study_name=real.name, storage=taken)
    src = ("--storage", real.url)
    cases = {
        ("rank", real.name, "--storage", f"sqlite:///{tmp_path}/missing/t.db"): "the file does not exist",
        ("rank", real.name, *src, "--top", "0"): "--top must be at least 1, but got top=0",
        ("rank", real.name, *src, "--by", "loss"): "--by 'loss' is not one of nll, recon, elbo, au",
        ("rank", real.name, *src, "--states", "complete,done"): "--states 'done' is not one of",
        ("rank", real.name, *src, "--format", "xml"): "--format 'xml' is not one of csv, json, parquet, markdown",
        ("export", "nope", *src, "--out", f"{tmp_path}/x/nope"): "no study 'nope'",
        ("export", real.name, *src, "--out", f"{tmp_path}/x/collapsed", "--by", "loss"): "--by 'loss'",
        ("backup", "nope", *src, "--to", f"sqlite:///{tmp_path}/y/new.db"): "no study 'nope'",
        ("backup", real.name, *src, "--to", taken): f"study '{real.name}' already exists in {taken}",
    }
    for args, words in cases.items():
        code, out, err = cli(capsys, monkeypatch, *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and words in lines[0], (args, err)
        assert out == "", (args, out)
    # no export folder, no new store (taken.db may keep its WAL files while this process holds it open)
    assert {p.name for p in tmp_path.iterdir()} <= {"taken.db", "taken.db-wal", "taken.db-shm"}
    assert optuna.load_study(study_name=real.name, storage=taken).get_trials() == []  # left as it was
