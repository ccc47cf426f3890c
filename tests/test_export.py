"""Export and backup of a real tiny study: the exported best config retrains (real `tuner train`
process) to the stored test NLL, checkpoints are copied into folders `load_run` reads (and score
what the worker stored), the folder's README runs as written, a 14-parameter study exports only the
settings that apply, rounded, tuned values marked; a SQLite -> PostgreSQL -> SQLite round trip keeps
every attr and intermediate value, and bad input through the real command is one line, exit 2, with
nothing (half-)written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from test_ranking import HEALTHY_A, HEALTHY_B, STALLED, Built, build_study, build_wide_study, cli
from test_worker import TUNER, checkpoint_file, run_cli

from tuner.results.export import backup_study, export_top
from tuner.results.exported_config import rounded, settings_that_apply
from tuner.results.ranking import rank_study
from tuner.spec import load_config, parse_config
from tuner.store.attrs import trial_config
from tuner.train import load_run
from tuner.vae.data import load_splits
from tuner.vae.metrics import evaluate

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
    assert f"exported 2 config(s), 2 checkpoint(s) and ranking.csv to {out}; its README.md" in proc.stdout
    return out


def test_export_writes_configs_checkpoints_and_ranking(real: Built, exported: Path) -> None:
    _, frame = rank_study(real.url, real.name)
    best, second = (int(n) for n in frame["trial"][:2])
    names = {str(p.relative_to(exported)) for p in exported.rglob("*")}
    assert names == {f"trial-{best}.yaml", f"trial-{second}.yaml", "ranking.csv", "README.md",
                     *(f"trial-{n}{f}" for n in (best, second) for f in ("", "/checkpoint.pt", "/config.yaml"))}
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]  # no staging folder left
    trials = {t.number: t for t in real.study.get_trials()}
    for n in (best, second):
        stored = parse_config(trial_config(trials[n]))
        config = load_config(exported / f"trial-{n}.yaml")  # what `tuner train` reads
        # every setting the trial reads, as stored (its values round to themselves: 1e-2, 1.0, 0.03...)
        assert settings_that_apply(config) == settings_that_apply(stored)
        assert config.seed == trials[n].user_attrs["seed"] and config.data.split_seed == 0
        assert load_config(exported / f"trial-{n}" / "config.yaml") == stored  # exact, beside its checkpoint
        checkpoint = checkpoint_file(real.art, real.url, real.name, n)
        assert (exported / f"trial-{n}" / "checkpoint.pt").read_bytes() == checkpoint.read_bytes()
        text = (exported / f"trial-{n}.yaml").read_text()
        assert {line.split(":")[0].strip() for line in text.splitlines() if line.endswith("  # tuned")} == \
            {"latent", "beta", "lr"}  # the study's space: model.latent, kl.beta, optim.lr
        assert "momentum" not in text and "flow_steps" not in text and "cycles" not in text  # adam, gaussian, constant
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
    assert sorted(p.name for p in out.iterdir()) == sorted(["notes.txt", "ranking.csv", "README.md", r.configs[0].name])
    assert (out / "notes.txt").read_text() == "mine" and (out / "ranking.csv").read_text() != "old"
    assert "No checkpoint was kept for these trials" in r.readme.read_text()
    # with checkpoints, again into the same folder: a trial-<n>/ folder is replaced as a whole
    r = export_top(real.url, real.name, out, top=1, artifacts=real.art)
    folder = r.checkpoints[0].parent
    (folder / "stale.txt").write_text("from before")
    r = export_top(real.url, real.name, out, top=1, artifacts=real.art)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.pt", "config.yaml"]


def test_an_exported_checkpoint_loads_and_scores_what_the_worker_stored(real: Built, exported: Path) -> None:
    """`load_run` on an exported trial folder: the stored config and the best weights, which score
    the test NLL the worker stored (same seed, same noise: up to float summation order)."""
    _, frame = rank_study(real.url, real.name)
    best = int(frame["trial"].iloc[0])
    trial = real.study.get_trials()[best]
    config, model = load_run(exported / f"trial-{best}")
    assert config == parse_config(trial_config(trial))
    splits = load_splits(config.data, config.optim.batch_size)
    scores = evaluate(model, splits.test, k=config.train.iwae_k, seed=config.seed).slot(0)
    assert scores["iwae_nll"] == pytest.approx(trial.user_attrs["test_iwae_nll"], abs=0.05)


def test_the_export_readme_runs_as_written(real: Built, exported: Path) -> None:
    """README.md: the rerun command names the best trial's file; its Python block, run as it stands
    in the export folder, loads a checkpoint and decodes a batch."""
    _, frame = rank_study(real.url, real.name)
    best = int(frame["trial"].iloc[0])
    readme = (exported / "README.md").read_text()
    assert f"tuner train trial-{best}.yaml --out runs/trial-{best}" in readme
    assert f"tuner train trial-{best}/config.yaml --out runs/trial-{best}-exact" in readme
    assert f"| 1 | {best} | {frame['iwae_nll'].iloc[0]:.2f} | {frame['test_iwae_nll'].iloc[0]:.2f} |" in readme
    block = readme.split("```python\n")[1].split("```")[0]
    code = block + "print(tuple(logits.shape), tuple(mu.shape), config.model.latent)\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=exported, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **ONE_THREAD))
    assert proc.returncode == 0, proc.stderr
    latent = parse_config(trial_config(real.study.get_trials()[best])).model.latent
    assert proc.stdout.split("\n")[0] == f"(1, 16, 784) (1, 16, {latent}) {latent}"


def test_a_14_parameter_study_exports_rounded_settings_that_apply_with_tuned_marks(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/wide.db"
    study = build_wide_study(url)
    out = tmp_path / "best"
    proc = run_cli("export", "wide", "--storage", url, "--top", "12", "--out", str(out), "--by", "nll")
    assert proc.returncode == 0, proc.stderr
    assert f"exported 12 config(s), 0 checkpoint(s) and ranking.csv to {out}" in proc.stdout
    trials = {t.number: t for t in study.get_trials()}
    assert len(list(out.glob("trial-*.yaml"))) == 12
    for path in sorted(out.glob("trial-*.yaml")):
        t = trials[int(path.stem.removeprefix("trial-"))]
        stored = parse_config(trial_config(t))
        text = path.read_text()
        applies = settings_that_apply(stored)
        written = {f"{s}.{k}" for s, values in applies.items() if isinstance(values, dict) for k in values}
        loaded = load_config(path)  # what `tuner train` reads
        # only what applies, rounded to 4 significant digits, loading to the trial's config
        assert settings_that_apply(loaded) == rounded(applies) == yaml.safe_load(text)
        for section, values in applies.items():
            for key, value in values.items() if isinstance(values, dict) else ():
                got = getattr(getattr(loaded, section), key)
                if isinstance(value, float):
                    assert got == pytest.approx(value, rel=5e-4, abs=0) and got == float(f"{got:.4g}")
        assert ("momentum:" in text) == (stored.optim.name == "sgd")
        assert ("betas:" in text) == (stored.optim.name != "sgd")
        assert ("flow_steps:" in text) == (stored.model.posterior == "iaf")
        assert ("prior_components:" in text) == (stored.model.prior in ("mog", "vamp"))
        assert not any(word in text for word in ("latent2:", "cycles:", "min_lr_ratio:", "step_gamma:", "channels:"))
        # every searched value that applies is marked, nothing else is
        marked = {line for line in text.splitlines() if line.endswith("  # tuned")}
        assert len(marked) == len(set(t.params) & written)
        for name in set(t.params) & written:
            assert any(line.startswith(f"  {name.split('.')[1]}: ") for line in marked), name
        assert "# floats rounded to 4 significant digits" in text
        assert "# searched, but not read by this trial (left out): kl.warmup_epochs" in text  # constant KL
    ranking = pd.read_csv(out / "ranking.csv")
    assert ranking["params.optim.lr"].tolist() == [trials[n].params["optim.lr"] for n in ranking["trial"]]  # exact


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
