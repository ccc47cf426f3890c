"""`tuner confirm` on a real tiny study: the top trials retrained with fresh seeds on the same split,
each rerun stored on the study as it finishes, summaries in the ranking (``--by confirmed``, a note
where a single-seed rank does not hold) and in export; reruns add seeds and never duplicate,
survive an interrupt, and work against PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import create_trial
from test_ranking import HEALTHY_A, HEALTHY_B, Built, build_study, cli
from test_report import sections

from tuner.results.confirm import ATTR_PREFIX, Rerun, confirm_study, confirmed, replicate_seed, reruns, store_rerun
from tuner.results.export import backup_study, export_top
from tuner.results.ranking import ranking_frame
from tuner.results.retrain import train_reruns
from tuner.spec import parse_config
from tuner.store.attrs import trial_config
from tuner.study.strategy import collapse_constraint_attrs


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, small_npz: Path) -> Built:
    return build_study(tmp_path_factory.mktemp("confirm"), small_npz, "conf", [HEALTHY_A, HEALTHY_B])


def test_a_rerun_with_the_trials_own_seed_scores_what_the_worker_stored(built: Built) -> None:
    t = built.study.get_trials()[0]
    config = parse_config(trial_config(t))
    [(trial, replicate, seed, scores)] = list(train_reruns([(0, 0, config)], "cpu"))
    assert (trial, replicate, seed) == (0, 0, config.seed)
    assert scores["test_iwae_nll"] == pytest.approx(t.user_attrs["test_iwae_nll"], abs=0.05)
    assert scores["epochs"] == t.user_attrs["epochs"]


def test_confirm_stores_each_rerun_adds_seeds_and_resumes(built: Built, capsys, monkeypatch) -> None:
    study = optuna.load_study(study_name=built.name, storage=built.url)
    lines: list[str] = []

    def interrupt_after_one(line: str) -> None:
        lines.append(line)
        if line.startswith("confirm: trial ") and " seed " in line:
            raise KeyboardInterrupt  # Ctrl-C after the first rerun was stored

    with pytest.raises(KeyboardInterrupt):
        confirm_study(study, top=2, seeds=2, device="cpu", log=interrupt_after_one)
    assert lines[0].endswith(": 4 rerun(s) to train (0 stored)")
    assert sum(len(r) for r in reruns(study).values()) == 1
    code, out, err = cli(capsys, monkeypatch, "confirm", built.name, "--storage", built.url, "--top", "2",
                         "--seeds", "2", "--device", "cpu")
    assert code == 0, err
    assert ": 3 rerun(s) to train (1 stored)" in err
    stored = reruns(study)
    trials = {t.number: t for t in study.get_trials()}
    assert sorted(stored) == [0, 1] and all(len(r) == 2 for r in stored.values())
    for number, runs in stored.items():
        own = trials[number].user_attrs["seed"]
        assert [r.seed for r in runs] == [replicate_seed(own, 0), replicate_seed(own, 1)]
        assert own not in [r.seed for r in runs] and runs[0].seed != runs[1].seed
        assert all(r.epochs == 3 and 0 < r.test_iwae_nll < 1000 for r in runs)
    summary = confirmed(study)
    for number in (0, 1):
        assert f"trial {number}: {summary[number].text}" in out
    # a third seed: one more rerun per trial, the stored ones untouched
    before = reruns(study)
    code, out, err = cli(capsys, monkeypatch, "confirm", built.name, "--storage", built.url, "--top", "2",
                         "--seeds", "3", "--device", "cpu")
    assert code == 0 and ": 2 rerun(s) to train (4 stored)" in err
    after = reruns(optuna.load_study(study_name=built.name, storage=built.url))
    assert all(after[t][:2] == runs for t, runs in before.items()) and sum(map(len, after.values())) == 6
    system = study._storage.get_study_system_attrs(study._study_id)  # programs' attrs, off the dashboard's page
    assert sum(k.startswith(ATTR_PREFIX) for k in system) == 6 and not any("confirm" in k for k in study.user_attrs)
    # the ranking and the export read them
    frame = ranking_frame(study, by="confirmed")
    means = {n: c.nll_mean for n, c in confirmed(study).items()}
    assert list(frame["trial"]) == sorted(means, key=means.get)
    assert list(frame["confirmed_n"]) == [3, 3]
    result = export_top(built.url, built.name, built.art.parent / "export", artifacts=built.art)
    best = min(means, key=means.get)
    assert result.configs[0].name == f"trial-{best}.yaml"
    assert f"# confirmed over seeds (test iwae_nll): {confirmed(study)[best].text}" in result.configs[0].read_text()
    # and the report draws them with error bars
    page = built.art.parent / "report.html"
    code, _, err = cli(capsys, monkeypatch, "report", built.name, "--storage", built.url, "--artifacts",
                       str(built.art), "--out", str(page))
    assert code == 0, err
    section = sections(page.read_text())["confirmed"]
    assert 'id="fig-confirmed"' in section and '"error_y"' in section and "mean over seeds" in section
    assert "in validation rank order" in section


def test_confirm_runs_against_postgres(built: Built, pg_url: str, capsys, monkeypatch) -> None:
    backup_study(built.name, built.url, pg_url)  # the study attrs (reruns stored so far) come along
    study = optuna.load_study(study_name=built.name, storage=pg_url)
    best = ranking_frame(study)["trial"].iloc[0]
    n = len(reruns(study).get(best, []))
    code, _, err = cli(capsys, monkeypatch, "confirm", built.name, "--storage", pg_url, "--top", "1",
                       "--seeds", str(n + 1), "--device", "cpu")
    assert code == 0 and f": 1 rerun(s) to train ({n} stored)" in err, err
    assert len(reruns(optuna.load_study(study_name=built.name, storage=pg_url))[best]) == n + 1
    code, _, err = cli(capsys, monkeypatch, "confirm", "nope", "--storage", pg_url)
    assert code == 2 and "no study 'nope'" in err and len(err.strip().splitlines()) == 1


def _rerun(trial: int, i: int, nll: float) -> Rerun:
    # recon 90 + i, KL 10 - i, active units 4 + i, seed 2 of trial 0 collapsed
    return Rerun(trial, i, 100 + i, nll, 90.0 + i, 10.0 - i, 4 + i, trial == 0 and i == 2, 3)


def test_ranking_notes_a_winner_that_seeds_do_not_confirm() -> None:
    study = optuna.create_study()
    for value in (100.0, 101.0, 102.0):  # validation order: trials 0, 1, 2
        study.add_trial(create_trial(value=value, user_attrs={"iwae_nll": value, "collapsed": False},
                                     system_attrs=collapse_constraint_attrs(False)))
    for i, nll in enumerate((103.0, 103.4, 102.6)):  # trial 0: 103.0 ± 0.4, as an older tuner stored it
        study.set_user_attr(f"tuner_confirm:0:{i}", json.dumps(_rerun(0, i, nll).__dict__))
    for i, nll in enumerate((101.0, 101.2, 100.8)):  # trial 1: 101.0 ± 0.2: better beyond the sds
        store_rerun(study, _rerun(1, i, nll))
    frame = ranking_frame(study)
    assert list(frame["trial"]) == [0, 1, 2]
    assert frame["confirm_note"].iloc[0] == "worse than trial 1 over seeds" and frame["confirm_note"][1:].isna().all()
    assert frame["confirmed_nll"].tolist()[:2] == pytest.approx([103.0, 101.0]) and frame["confirmed_sd"][0] == pytest.approx(0.4)
    # the other test metrics over seeds: means of recon, KL and active units, and the collapse rate
    assert frame["confirmed_recon"].tolist()[:2] == pytest.approx([91.0, 91.0])
    assert frame["confirmed_kl"][0] == pytest.approx(9.0) and frame["confirmed_active_units"][1] == pytest.approx(5.0)
    assert frame["confirmed_collapse_rate"].tolist()[:2] == pytest.approx([1 / 3, 0.0])
    assert frame[["confirmed_recon", "confirmed_collapse_rate"]].iloc[2].isna().all()  # trial 2: never confirmed
    by_confirmed = ranking_frame(study, by="confirmed")
    assert list(by_confirmed["trial"]) == [1, 0, 2]  # never confirmed: last
    assert by_confirmed["confirm_note"].isna().all()
