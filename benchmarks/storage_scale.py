"""The store at scale: per-epoch storage cost at 100 to 10,000 trials in one study, and 32 workers at once.

    python benchmarks/storage_scale.py [--sizes 100,1000,10000] [--backends postgres,sqlite]
        [--pruners hyperband,median] [--epochs 20] [--live 12] [--workers 32] [--seconds 20] [--quick]

No training: a synthetic trial is what a worker does with the store, in the worker's order: ask,
suggest the space, record a heartbeat, then per epoch ``trial.report(value, epoch)`` +
``trial.should_prune()`` (timed together: one *epoch*), then the end-of-trial user attrs and
``study.tell`` (timed apart). The curve is a noisy decay whose level depends on the params, so the
pruners prune as they would on real studies.

1. Scale. For each backend the study is filled to each size in turn (finished trials shaped like
   the worker's: params, an intermediate value per epoch, user attrs, Hyperband rung attrs; bulk
   inserted through Optuna's own tables, a few seconds per 10,000) and then ``--live`` synthetic
   trials run against it, with the spec's sampler (TPE) and each pruner, once through plain
   ``optuna.storages.RDBStorage(url)`` with Optuna's own pruner classes (row ``optuna``) and once as
   a worker opens the study (row ``tuner``: ``tuner.store.urls.open_storage`` and
   ``tuner.study.strategy.build_pruner``), interleaved in rounds so both see the same load.
   ``load_s``: a fresh storage's first ``get_trials`` (what a joining worker pays once).
   ``queries``: SQL statements per epoch.
2. Workers. ``--workers`` processes (spawn) run synthetic trials against one PostgreSQL study for
   ``--seconds`` each, first all on plain RDBStorage, then all on ours: storage errors (any
   exception out of a storage call; must be 0) and throughput.

Targets (issue 6): the median epoch under 10 ms and flat (10,000 trials / 100 trials <= 1.5) on
both stores; 32 workers with zero storage errors. PostgreSQL: a temporary database on
127.0.0.1:5432 (user postgres, trust auth), dropped afterwards. The machine's load is printed:
on a shared, loaded machine the absolute numbers are noisy, the ratios in one run much less so.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import multiprocessing as mp
import os
import random
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages._rdb import models
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stores import store  # noqa: E402  (benchmarks/stores.py, beside this script)

from tuner.store.attrs import set_trial_attrs  # noqa: E402
from tuner.store.cache import CachedStorage  # noqa: E402
from tuner.store.urls import open_storage  # noqa: E402
from tuner.study import strategy  # noqa: E402
from tuner.study.spec import StudySpec, parse_study_spec  # noqa: E402

TARGET_MS = 10.0  # median epoch (report + should_prune)
FLAT = 1.5  # median epoch at the largest size / at the smallest
STORAGES = ("optuna", "tuner")  # baseline first

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def plain_storage(url: str) -> optuna.storages.RDBStorage:
    """The baseline: Optuna's RDBStorage as its docs open it (psycopg 3 for postgres, as ours)."""
    return optuna.storages.RDBStorage(url.replace("{", "{{").replace("}", "}}"))


OPENERS: dict[str, Callable[[str], optuna.storages.BaseStorage]] = {"optuna": plain_storage, "tuner": open_storage}


def engine_of(storage: optuna.storages.BaseStorage) -> sqlalchemy.Engine:
    """The SQLAlchemy engine behind a storage (ours may wrap Optuna's RDBStorage)."""
    while not hasattr(storage, "engine"):
        storage = storage._backend  # type: ignore[attr-defined]
    return storage.engine  # type: ignore[attr-defined]


# ------------------------------------------------------------------------- synthetic trials
def spec_for(pruner: str, epochs: int) -> StudySpec:
    """The study spec the synthetic trials run under: the defaults (TPE, constant liar) + a pruner."""
    return parse_study_spec({
        "study": "scale",
        "space": {
            "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            "kl.beta": {"type": "float", "low": 0.25, "high": 4.0, "log": True},
            "model.latent": {"type": "int", "low": 2, "high": 64, "log": True},
        },
        "pruner": {"name": pruner},
        "budget": {"trials": 1_000_000, "epochs": epochs},
    })


def suggest(trial: optuna.Trial) -> dict[str, float]:
    return {"optim.lr": trial.suggest_float("optim.lr", 1e-4, 1e-2, log=True),
            "kl.beta": trial.suggest_float("kl.beta", 0.25, 4.0, log=True),
            "model.latent": trial.suggest_int("model.latent", 2, 64, log=True)}


def curve(params: dict[str, float], step: int, rng: random.Random) -> float:
    """A synthetic validation -ELBO (nats): decays with epochs to a level set by the params."""
    level = 90 + 8 * (math.log10(params["optim.lr"]) + 2.5) ** 2 + 4 * math.log(params["kl.beta"]) ** 2
    level += 2 * abs(math.log2(params["model.latent"]) - 4)
    return level + 60 * math.exp(-step / 3) + rng.gauss(0, 0.5)


def end_attrs(trial_number: int, epochs: int) -> dict[str, Any]:
    """User attrs of the size and kind the worker leaves on a finished trial."""
    return {"seed": trial_number, "worker": f"bench:{os.getpid()}", "device": "cpu",
            "config": {"model": {"arch": "mlp", "latent": 16, "hidden": 256, "depth": 2},
                       "optim": {"name": "adam", "lr": 1e-3, "batch_size": 64}, "train": {"epochs": epochs}},
            "iwae_nll": 95.1, "neg_elbo": 99.0, "recon": 80.2, "kl": 18.8, "active_units": 12,
            "collapsed": False, "wall_s": 1.0, "config_hash": "0123456789abcdef", "epochs": epochs}


@dataclass
class Timings:
    epoch_ms: list[float] = field(default_factory=list)
    tell_ms: list[float] = field(default_factory=list)
    queries: int = 0
    trials: int = 0
    errors: list[str] = field(default_factory=list)


class QueryCounter:
    """Counts the SQL statements an engine runs while ``on``."""

    def __init__(self, engine: sqlalchemy.Engine) -> None:
        self.count, self.on = 0, False
        sqlalchemy.event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, *args: Any) -> None:
        self.count += self.on


def synthetic_trial(study: optuna.Study, epochs: int, rng: random.Random, timings: Timings,
                    counter: QueryCounter | None = None) -> None:
    """One trial as the worker runs it, minus the training. The end attrs: one transaction through
    ours (``tuner.store.attrs.set_trial_attrs``, as the worker), one ``set_user_attr`` each through plain
    Optuna."""
    trial = study.ask()
    params = suggest(trial)
    study._storage.record_heartbeat(trial._trial_id)  # the worker beats at once (then on a thread)
    pruned = False
    for step in range(epochs):
        value = curve(params, step, rng)
        if counter is not None:
            counter.on = True
        start = time.perf_counter()
        trial.report(value, step)
        pruned = trial.should_prune()
        timings.epoch_ms.append(1000 * (time.perf_counter() - start))
        if counter is not None:
            counter.on = False
        if pruned:
            break
    attrs = end_attrs(trial.number, step + 1)
    if isinstance(study._storage, CachedStorage):  # a worker's store
        set_trial_attrs(trial, attrs)
    else:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
    start = time.perf_counter()
    if pruned:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, curve(params, epochs, rng))
    timings.tell_ms.append(1000 * (time.perf_counter() - start))
    timings.trials += 1


def plain_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The baseline's pruner: Optuna's own class with the spec's settings (ours caches for median)."""
    p = spec.pruner
    if p.name in ("median", "percentile"):
        percentile = 50.0 if p.name == "median" else p.percentile
        return optuna.pruners.PercentilePruner(percentile, p.n_startup_trials, p.n_warmup_steps, p.interval_steps)
    return strategy.build_pruner(spec)  # hyperband, successive halving: Optuna's classes already


def open_study(kind: str, storage: optuna.storages.BaseStorage, name: str, spec: StudySpec, seed: int) -> optuna.Study:
    """The study as a worker loads it: the spec's sampler (seeded per worker) and pruner; the
    baseline (``optuna``) gets Optuna's own pruner class."""
    pruner = strategy.build_pruner(spec) if kind == "tuner" else plain_pruner(spec)
    return optuna.load_study(study_name=name, storage=storage, sampler=strategy.build_sampler(spec, worker=seed),
                             pruner=pruner)


# ------------------------------------------------------------------------------ bulk filling
def fill(url: str, study_name: str, count: int, epochs: int, seed: int) -> None:
    """Append ``count`` finished trials to the study, straight into Optuna's tables (bulk inserts:
    ``study.add_trials`` takes ~25 ms a trial). Shaped like the worker's: 3 params, one intermediate
    value per epoch run, the end user attrs, the Hyperband rung attrs of the rungs passed; ~60%
    pruned at a rung of 1, 3 or 9 epochs, the rest complete."""
    rng = random.Random(seed)
    engine = sqlalchemy.create_engine(url)
    t = {name: getattr(models, name).__table__ for name in (
        "TrialModel", "TrialParamModel", "TrialValueModel", "TrialIntermediateValueModel",
        "TrialUserAttributeModel", "TrialSystemAttributeModel")}
    dists = {"optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
             "kl.beta": optuna.distributions.FloatDistribution(0.25, 4.0, log=True),
             "model.latent": optuna.distributions.IntDistribution(2, 64, log=True)}
    dist_json = {k: optuna.distributions.distribution_to_json(d) for k, d in dists.items()}
    finite = models.TrialIntermediateValueModel.TrialIntermediateValueType.FINITE
    with engine.begin() as db:
        study_id = db.execute(sqlalchemy.select(models.StudyModel.study_id).where(
            models.StudyModel.study_name == study_name)).scalar_one()
        first = db.execute(sqlalchemy.select(sqlalchemy.func.count()).select_from(t["TrialModel"]).where(
            t["TrialModel"].c.study_id == study_id)).scalar_one()
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        trials, children = [], []
        for i in range(count):
            params = {k: d.to_internal_repr(d.low * (d.high / d.low) ** rng.random()) for k, d in dists.items()}
            params["model.latent"] = float(round(params["model.latent"]))
            ran = epochs if rng.random() < 0.4 else min(epochs, rng.choice([1, 3, 9]))
            curve_ = [curve(params, s, rng) for s in range(ran)]
            state = TrialState.COMPLETE if ran == epochs else TrialState.PRUNED
            trials.append({"number": first + i, "study_id": study_id, "state": state,
                           "datetime_start": now - timedelta(seconds=ran), "datetime_complete": now})
            children.append((params, curve_, state, ran))
        ids = db.execute(sqlalchemy.insert(t["TrialModel"]).returning(
            t["TrialModel"].c.trial_id, sort_by_parameter_order=True), trials).scalars().all()
        rows: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        for trial_id, (params, curve_, state, ran) in zip(ids, children):
            for name, value in params.items():
                rows["TrialParamModel"].append({"trial_id": trial_id, "param_name": name, "param_value": value,
                                                "distribution_json": dist_json[name]})
            for step, value in enumerate(curve_):
                rows["TrialIntermediateValueModel"].append({
                    "trial_id": trial_id, "step": step, "intermediate_value": value, "intermediate_value_type": finite})
            if state == TrialState.COMPLETE:
                rows["TrialValueModel"].append({"trial_id": trial_id, "objective": 0, "value": curve_[-1],
                                                "value_type": models.TrialValueModel.TrialValueType.FINITE})
            for key, value in end_attrs(trial_id, ran).items():
                rows["TrialUserAttributeModel"].append(
                    {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)})
            for rung, at in enumerate(r for r in (1, 3, 9) if r <= ran and (r < ran or state == TrialState.COMPLETE)):
                rows["TrialSystemAttributeModel"].append({"trial_id": trial_id, "key": f"completed_rung_{rung}",
                                                          "value_json": json.dumps(curve_[at - 1])})
        for name, batch in rows.items():
            db.execute(sqlalchemy.insert(t[name]), batch)
    engine.dispose()


# ------------------------------------------------------------------------------------ 1. scale
@dataclass
class Cell:
    """One (backend, size, pruner, storage) measurement."""

    load_s: float
    timings: Timings

    def epoch(self, q: float) -> float:
        return percentile(self.timings.epoch_ms, q)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def measure_size(url: str, study_name: str, pruners: list[str], epochs: int, live: int, rounds: int,
                 seed: int) -> tuple[dict[str, float], dict[tuple[str, str], Timings]]:
    """(load s per storage, timings per pruner x storage) at the study's current size.

    Each storage is opened fresh (a worker joining the study) and serves every pruner, as one worker
    process serves its study; the storages take turns in ``rounds`` so both see the same load.
    """
    storages = {kind: OPENERS[kind](url) for kind in STORAGES}
    load_s, cells, counters = {}, {}, {}
    for kind, storage in storages.items():
        study = optuna.load_study(study_name=study_name, storage=storage)
        start = time.perf_counter()
        study.get_trials(deepcopy=False)  # a joining worker's first read: every trial
        load_s[kind] = time.perf_counter() - start
        counters[kind] = QueryCounter(engine_of(storage))
    for pruner in pruners:
        spec = spec_for(pruner, epochs)
        studies = {kind: open_study(kind, storage, study_name, spec, seed) for kind, storage in storages.items()}
        rng = random.Random(seed)
        for r in range(rounds):
            for kind in STORAGES if r % 2 == 0 else STORAGES[::-1]:
                cell, before = cells.setdefault((pruner, kind), Timings()), counters[kind].count
                for _ in range(max(1, live // rounds)):
                    synthetic_trial(studies[kind], epochs, rng, cell, counters[kind])
                cell.queries += counters[kind].count - before
    for storage in storages.values():
        engine_of(storage).dispose()
    return load_s, cells


def run_scale(args: argparse.Namespace, tmp: Path) -> dict[tuple[str, int, str, str], Cell]:
    results: dict[tuple[str, int, str, str], Cell] = {}
    for backend in args.backends:
        with store(backend, tmp, "scale-") as url:
            name = "scale"
            optuna.create_study(study_name=name, storage=plain_storage(url), direction="minimize")
            in_study = 0  # the live trials stay in the study: each size is topped up to the next
            for size in args.sizes:
                start = time.perf_counter()
                fill(url, name, size - in_study, args.epochs, seed=size)
                fill_s = time.perf_counter() - start
                start = time.perf_counter()
                load_s, cells = measure_size(url, name, args.pruners, args.epochs, args.live, args.rounds, seed=size)
                for (pruner, kind), timings in cells.items():
                    results[(backend, size, pruner, kind)] = Cell(load_s[kind], timings)
                print(f"  {backend}: filled to {size} trials in {fill_s:.1f} s, measured in "
                      f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
                in_study = size + sum(t.trials for t in cells.values())
    return results


# ---------------------------------------------------------------------------------- 2. workers
def worker_main(kind: str, url: str, study_name: str, pruner: str, epochs: int, seconds: float, seed: int,
                ready: Any, out: Any) -> None:
    """A synthetic worker process: joins, waits for the others, then runs trials for ``seconds``;
    every storage error is counted. Puts (start, end, timings) on ``out``."""
    warnings.simplefilter("ignore")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    timings, rng, study = Timings(), random.Random(seed), None
    try:
        study = open_study(kind, OPENERS[kind](url), study_name, spec_for(pruner, epochs), seed)
        study.get_trials(deepcopy=False)  # joining: the first read of every trial, before the clock starts
    except Exception as err:  # noqa: BLE001 - counted: a worker that cannot join is a storage error
        timings.errors.append(f"join: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
    ready.wait(timeout=900)  # all joined: they start together
    start = time.time()
    last_stale, deadline = time.monotonic(), time.monotonic() + seconds
    while study is not None and time.monotonic() < deadline:
        try:
            if time.monotonic() - last_stale > 5:
                optuna.storages.fail_stale_trials(study)  # as every worker does
                last_stale = time.monotonic()
            synthetic_trial(study, epochs, rng, timings)
        except Exception as err:  # noqa: BLE001 - the count is the point
            timings.errors.append(f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
            if len(timings.errors) == 1:
                traceback.print_exc()
    out.put((start, time.time(), timings))


def run_workers(args: argparse.Namespace, tmp: Path) -> dict[str, tuple[float, Timings, int]]:
    """(wall s from the common start to the last worker's end, merged timings, finished trials in the
    store) per storage kind."""
    results = {}
    ctx = mp.get_context("spawn")
    with store("postgres", tmp, "scale-") as url:
        for kind in STORAGES:
            name = f"workers-{kind}"
            optuna.create_study(study_name=name, storage=plain_storage(url), direction="minimize")
            fill(url, name, args.workers_fill, args.epochs, seed=1)
            out, ready = ctx.Queue(), ctx.Barrier(args.workers)
            procs = [ctx.Process(target=worker_main, args=(kind, url, name, args.workers_pruner, args.epochs,
                                                           args.seconds, 1000 + i, ready, out))
                     for i in range(args.workers)]
            for p in procs:
                p.start()
            merged, starts, ends = Timings(), [], []
            for _ in procs:
                start, end, timings = out.get(timeout=args.seconds + 900)
                starts.append(start)
                ends.append(end)
                merged.epoch_ms += timings.epoch_ms
                merged.tell_ms += timings.tell_ms
                merged.trials += timings.trials
                merged.errors += timings.errors
            for p in procs:
                p.join(timeout=60)
            study = optuna.load_study(study_name=name, storage=plain_storage(url))
            finished = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False)) - args.workers_fill
            engine_of(study._storage).dispose()
            results[kind] = (max(ends) - min(starts), merged, finished)
    return results


# -------------------------------------------------------------------------------------- output
def machine_load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min) {five:.1f} (5 min) on {os.cpu_count()} cores"


def print_scale(results: dict[tuple[str, int, str, str], Cell], args: argparse.Namespace) -> list[str]:
    """The scale table; returns the failed targets."""
    failed = []
    print(f"{'backend':<9}{'trials':>7} {'pruner':<10}{'storage':<8}{'load_s':>8}{'epoch_med_ms':>14}"
          f"{'epoch_p95_ms':>14}{'queries':>9}{'tell_med_ms':>13}{'epochs':>8}")
    for backend in args.backends:
        for size in args.sizes:
            for pruner in args.pruners:
                cells = {kind: results[(backend, size, pruner, kind)] for kind in STORAGES}
                for kind, c in cells.items():
                    t = c.timings
                    print(f"{backend:<9}{size:>7} {pruner:<10}{kind:<8}{c.load_s:>8.3f}{c.epoch(50):>14.2f}"
                          f"{c.epoch(95):>14.2f}{t.queries / max(1, len(t.epoch_ms)):>9.1f}"
                          f"{percentile(t.tell_ms, 50):>13.2f}{len(t.epoch_ms):>8}")
                base, ours = cells["optuna"], cells["tuner"]
                ratio = [ours.load_s / base.load_s, ours.epoch(50) / base.epoch(50), ours.epoch(95) / base.epoch(95),
                         (ours.timings.queries / max(1, len(ours.timings.epoch_ms)))
                         / max(1e-9, base.timings.queries / max(1, len(base.timings.epoch_ms))),
                         percentile(ours.timings.tell_ms, 50) / percentile(base.timings.tell_ms, 50)]
                print(f"{backend:<9}{size:>7} {pruner:<10}{'ratio':<8}{ratio[0]:>8.2f}{ratio[1]:>14.2f}"
                      f"{ratio[2]:>14.2f}{ratio[3]:>9.2f}{ratio[4]:>13.2f}{'':>8}")
    print("  epoch = trial.report + trial.should_prune; ratio = tuner / optuna (< 1: ours is faster); queries: SQL "
          "statements per epoch (BEGIN/COMMIT and pool pings not counted); load_s: a fresh storage's first get_trials")
    print()
    small, large = args.sizes[0], args.sizes[-1]
    print(f"{'backend':<9}{'pruner':<10}{'storage':<8}{'med_ms@' + str(small):>14}{'med_ms@' + str(large):>14}"
          f"{'growth':>8}{'target':>18}  verdict")
    for backend in args.backends:
        for pruner in args.pruners:
            for kind in STORAGES:
                lo = results[(backend, small, pruner, kind)].epoch(50)
                hi = max(results[(backend, size, pruner, kind)].epoch(50) for size in args.sizes)
                growth = results[(backend, large, pruner, kind)].epoch(50) / lo
                ok = hi < TARGET_MS and growth <= FLAT
                if kind == "tuner" and not ok:
                    failed.append(f"{backend}/{pruner}")
                print(f"{backend:<9}{pruner:<10}{kind:<8}{lo:>14.2f}"
                      f"{results[(backend, large, pruner, kind)].epoch(50):>14.2f}{growth:>8.2f}"
                      f"{f'<{TARGET_MS:g}ms, <={FLAT:g}x':>18}  {'pass' if ok else 'FAIL'}")
    print(f"  growth: median epoch at {large} trials / at {small}; the target holds for every size in between too")
    return failed


def print_workers(results: dict[str, tuple[float, Timings, int]], args: argparse.Namespace) -> list[str]:
    failed = []
    print(f"{'workers':<8}{'storage':<8}{'wall_s':>8}{'trials':>8}{'in_store':>9}{'trials_per_s':>14}"
          f"{'epochs_per_s':>14}{'epoch_med_ms':>14}{'epoch_p95_ms':>14}{'errors':>8}")
    for kind, (wall, t, finished) in results.items():
        print(f"{args.workers:<8}{kind:<8}{wall:>8.1f}{t.trials:>8}{finished:>9}{t.trials / wall:>14.1f}"
              f"{len(t.epoch_ms) / wall:>14.1f}{percentile(t.epoch_ms, 50):>14.2f}{percentile(t.epoch_ms, 95):>14.2f}"
              f"{len(t.errors):>8}")
        if kind == "tuner" and t.errors:
            failed.append(f"{args.workers} workers: {len(t.errors)} storage errors")
    base, ours = results["optuna"], results["tuner"]
    print(f"{args.workers:<8}{'ratio':<8}{'':>25}{(ours[1].trials / ours[0]) / (base[1].trials / base[0]):>14.2f}"
          f"{(len(ours[1].epoch_ms) / ours[0]) / (len(base[1].epoch_ms) / base[0]):>14.2f}"
          f"{percentile(ours[1].epoch_ms, 50) / percentile(base[1].epoch_ms, 50):>14.2f}"
          f"{percentile(ours[1].epoch_ms, 95) / percentile(base[1].epoch_ms, 95):>14.2f}")
    print(f"  PostgreSQL, one study pre-filled with {args.workers_fill} trials, pruner {args.workers_pruner}, "
          f"{args.seconds:g} s per storage; in_store: finished trials the store holds afterwards (= trials)")
    for kind, (_, t, _) in results.items():
        for error, n in collections.Counter(t.errors).most_common(5):
            print(f"  {kind} error x{n}: {error}")
    return failed


# ----------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000", help="study sizes (trials), ascending")
    parser.add_argument("--backends", default="postgres,sqlite")
    parser.add_argument("--pruners", default="hyperband,median")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per trial (max_resource of Hyperband)")
    parser.add_argument("--live", type=int, default=12, help="synthetic trials measured per size, pruner and storage")
    parser.add_argument("--rounds", type=int, default=2, help="turns the storages take (interleaved)")
    parser.add_argument("--workers", type=int, default=32, help="worker processes on one PostgreSQL study; 0: skip")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long the workers run, per storage")
    parser.add_argument("--workers-fill", type=int, default=1000, help="trials in the workers' study beforehand")
    parser.add_argument("--workers-pruner", default="hyperband")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, 4 workers for 2 s")
    args = parser.parse_args()
    if args.quick:  # a smoke test of every part: seconds on an idle machine
        args.sizes, args.epochs, args.live, args.rounds = "10,30", 4, 2, 2
        args.workers, args.seconds, args.workers_fill = min(args.workers, 3), 1.0, 10
    args.sizes = sorted(int(s) for s in str(args.sizes).split(","))
    args.backends = [b for b in args.backends.split(",") if b]
    args.pruners = [p for p in args.pruners.split(",") if p]
    unknown = (set(args.backends) - {"postgres", "sqlite"}) | (
        set(args.pruners) - {"hyperband", "median", "percentile", "successive_halving"})
    if unknown:
        parser.error(f"unknown backend or pruner {sorted(unknown)}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"optuna {optuna.__version__}, sqlalchemy {sqlalchemy.__version__}; {machine_load()} at start; "
          f"{args.epochs} epochs a trial, {args.live} live trials per cell, TPE sampler")
    failed = []
    with tempfile.TemporaryDirectory(prefix="tuner-scale-") as tmp_name:
        tmp = Path(tmp_name)
        scale = run_scale(args, tmp)
        print()
        failed += print_scale(scale, args)
        if args.workers > 0:
            workers = run_workers(args, tmp)
            print()
            failed += print_workers(workers, args)
    print()
    print(f"{machine_load()} at the end; verdict: " + ("pass" if not failed else "FAIL (" + ", ".join(failed) + ")"))


if __name__ == "__main__":
    main()
