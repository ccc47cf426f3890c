"""The worker as a pipeline, with real stores and real training: every Optuna call off the training
thread, checkpoints on the cadence and only the study's top K left behind, artifacts keyed by the
study's identity, populations by size bucket, and an out-of-memory error that halves the slots and
hands trials back instead of killing the worker."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState
from test_worker import by_state, checkpoint_file, study_yaml

import tuner.study.bookkeeper
from tuner.spec import parse_config
from tuner.store.attrs import trial_config
from tuner.store.budget_lock import budget_lock
from tuner.store.checkpoints import config_hash, top_trials
from tuner.store.urls import open_storage
from tuner.study.memory import next_pow2
from tuner.study.open import ID_ATTR, create_or_resume
from tuner.study.spec import parse_study_spec
from tuner.study.worker import Worker
from tuner.vae.engine import Population


def make_study(tmp_path: Path, npz: Path, name: str, url: str, **over: Any) -> optuna.Study:
    return create_or_resume(parse_study_spec(yaml.safe_load(study_yaml(tmp_path, npz, name, url, **over).read_text())))


def test_every_store_call_runs_off_the_training_thread(tmp_path: Path, small_npz: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path}/t.db"
    make_study(tmp_path, small_npz, "threads", url, budget={"trials": 4, "epochs": 2},
               pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0})
    seen: dict[str, set[str]] = {}

    def spy(owner: Any, name: str) -> None:
        original = getattr(owner, name)

        def called(*args: Any, **kwargs: Any) -> Any:
            seen.setdefault(name, set()).add(threading.current_thread().name)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, called)

    for owner, name in ((optuna.Study, "ask"), (optuna.Study, "tell"), (optuna.Trial, "report"),
                        (optuna.Trial, "should_prune"), (tuner.study.bookkeeper, "set_trial_attrs")):
        spy(owner, name)
    summary = Worker(url, "threads", slots=2, device="cpu", artifacts=tmp_path / "art", log=lambda s: None).run()
    assert summary.complete + summary.pruned == 4
    assert set(seen) == {"ask", "tell", "report", "should_prune", "set_trial_attrs"}
    assert all(threads == {"tuner-bookkeeper"} for threads in seen.values()), seen
    # the training thread's own bookkeeping is small next to its compute (the 1% goal is a benchmark's)
    assert summary.phases["compute"] > 5 * summary.phases.get("bookkeeping", 0.0)


def test_checkpoints_on_the_cadence_and_only_the_top_k_left(tmp_path: Path, small_npz: Path) -> None:
    url = f"sqlite:///{tmp_path}/k.db"
    study = make_study(tmp_path, small_npz, "keep", url, budget={"trials": 6, "epochs": 6},
                       checkpoints={"every_epochs": 4, "keep_top": 2})
    w = Worker(url, "keep", slots=2, device="cpu", artifacts=tmp_path / "art", log=lambda s: None)
    summary = w.run()
    ts = study.get_trials()
    assert len(by_state(ts, TrialState.COMPLETE)) == 6
    # one cadence checkpoint per trial (epoch 4 of 6), plus the final one of each trial that ranked
    # among the best 2 when it was told (the first two always do)
    assert 6 + 2 <= summary.checkpoint_files <= 6 + 6
    key = study.user_attrs[ID_ATTR]
    folder = tmp_path / "art" / key
    kept = sorted(int(p.parent.name) for p in folder.glob("*/checkpoint.pt"))
    assert kept == sorted(top_trials(ts, 2))  # nothing else left on disk
    assert not (tmp_path / "art" / "keep").exists()  # keyed by identity, not by name
    for number in kept:
        t = ts[number]
        ckpt = torch.load(checkpoint_file(tmp_path / "art", url, "keep", number), weights_only=True)
        config = parse_config(trial_config(t))
        assert (ckpt["study_id"], ckpt["trial"], ckpt["config_hash"]) == (key, number, config_hash(config))
        assert ckpt["format"] == 2 and ckpt["status"] == "finished" and ckpt["epoch"] == 6
        latent, hidden = config.model.latent, config.model.hidden
        # true size: the slot's own latent, not the population's bucket
        assert tuple(ckpt["model"]["enc_mu.weight"].shape) == (hidden, latent)
        assert tuple(ckpt["optimizer"]["exp_avg.0"]["dec_hidden.0.weight"].shape) == (latent, hidden)
        assert t.user_attrs["precision"] == "fp32"
        assert f"latent<={next_pow2(latent)} hidden<=32" in t.user_attrs["population"]
    # what a checkpoint costs per model-epoch stays within a checkpoint's size over the cadence (+ the finals)
    assert summary.checkpoint_bytes / summary.model_epochs <= summary.checkpoint_bytes / summary.checkpoint_files
    assert summary.padding and all(0 < v <= 1 for v in summary.padding.values())


def test_a_foreign_checkpoint_is_ignored_with_one_warning(tmp_path: Path, small_npz: Path) -> None:
    """Two studies of one name in two stores, one artifact root: their files never mix. A retry whose
    predecessor's folder holds another study's checkpoint starts fresh, with one warning line."""
    art = tmp_path / "art"
    a = make_study(tmp_path, small_npz, "same", f"sqlite:///{tmp_path}/a.db", budget={"trials": 1, "epochs": 2})
    Worker(f"sqlite:///{tmp_path}/a.db", "same", slots=1, device="cpu", artifacts=art, log=lambda s: None).run()
    url = f"sqlite:///{tmp_path}/b.db"
    b = make_study(tmp_path, small_npz, "same", url, budget={"trials": 1, "epochs": 2})
    assert a.user_attrs[ID_ATTR] != b.user_attrs[ID_ATTR]
    storage = open_storage(url)
    study = optuna.load_study(study_name="same", storage=storage)
    victim = study.ask()  # a trial of b whose worker died; its folder gets a's checkpoint
    target = art / b.user_attrs[ID_ATTR] / str(victim.number) / "checkpoint.pt"
    target.parent.mkdir(parents=True)
    target.write_bytes(checkpoint_file(art, f"sqlite:///{tmp_path}/a.db", "same", 0).read_bytes())
    with budget_lock(storage, "same"):
        assert storage.set_trial_state_values(victim._trial_id, TrialState.FAIL)
        storage.get_heartbeat_stale_trial_callback()(study, storage.get_trial(victim._trial_id))
    log: list[str] = []
    summary = Worker(url, "same", slots=1, device="cpu", artifacts=art, log=log.append).run()
    warnings = [line for line in log if line.startswith("warning: ignoring")]
    assert len(warnings) == 1 and a.user_attrs[ID_ATTR] in warnings[0], log
    assert summary.resumed == 0 and summary.complete == 1 and summary.model_epochs == 2


def test_out_of_memory_halves_the_slots_and_hands_trials_back(tmp_path: Path, small_npz: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path}/o.db"
    study = make_study(tmp_path, small_npz, "oom", url, budget={"trials": 6, "epochs": 3},
                       space={"model.latent": {"type": "fixed", "value": 4}})  # one population
    real_epoch, failed = Population.run_epoch, []

    def run_epoch(self: Population) -> Any:
        running = self.running()
        if self.slots == 4 and not failed and len(running) >= 3 and any(self.state[s].epoch for s in running):
            failed.append([self.state[s].epoch for s in running])  # as CUDA does: before the first update
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_epoch(self)

    monkeypatch.setattr(Population, "run_epoch", run_epoch)
    log: list[str] = []
    w = Worker(url, "oom", slots=4, device="cpu", artifacts=tmp_path / "art", log=log.append)
    summary = w.run()
    (epochs,) = failed  # the epochs the slots had trained, in slot order: the last ones are evicted
    evicted = epochs[2:]
    lines = [line for line in log if line.startswith("out of device memory")]
    assert lines == [f"out of device memory: slots 4 -> 2, {len(evicted)} trial(s) handed back"], log
    assert w.slots == 2 and summary.handed_back == len(evicted)
    ts = study.get_trials()
    handed = by_state(ts, TrialState.FAIL)
    assert sorted(int(t.user_attrs["handed_back"].rsplit(" ", 1)[1]) for t in handed) == sorted(evicted)
    assert all("ran out of device memory at epoch" in t.user_attrs["handed_back"] for t in handed)
    assert len(by_state(ts, TrialState.COMPLETE)) == 6  # the budget, the handed-back trials' retries included
    retried = [t for t in ts if t.system_attrs.get("failed_trial") in {h.number for h in handed}]
    assert len(retried) == len(evicted) and all(t.state == TrialState.COMPLETE for t in retried)
    # each evicted trial that had trained resumed from the snapshot written when it was evicted
    assert summary.resumed == sum(e > 0 for e in evicted)
    for t in retried:
        assert sorted(t.intermediate_values) == [1, 2, 3]
