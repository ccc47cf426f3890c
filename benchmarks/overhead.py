"""The tuner's overhead: the same N trainings run bare vs through `tuner run` (SQLite, PostgreSQL).

    python benchmarks/overhead.py [--trials 8] [--epochs 5] [--hidden 256] [--rounds 3] [--no-postgres] [--profile]

Target: the tuner's own work (ask, sampling, report, prune check, checkpoint, final-metric attrs,
tell, stale-trial checks) stays under 2% of the worker's wall time.

Each round runs, back to back for every store: `tuner run SPEC --workers 1` in a subprocess (a random
sampler, no pruner, N trials of E epochs, one slot on the CPU), then *bare*: this process retrains
every complete trial's stored config (user attr ``config``) with ``Population.for_configs`` and
``run_epoch`` until done and evaluates it on val and test (``metrics.evaluate``, as the worker does)
with no Optuna, store or checkpoint. Tuner wall = the first trial's ``datetime_start`` to the last
trial's ``datetime_complete`` (the store's timestamps): process start-up (imports, study creation,
data load) is not per-trial overhead and is printed apart. The space leaves latent and hidden sizes
fixed, so the worker's population has the very shape of the bare one (no masking cost). Medians
over rounds are printed. ``--profile`` also runs the worker in this process under cProfile and
prints where its wall time goes (cProfile inflates Python-heavy code such as Optuna and SQLAlchemy).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import optuna
import torch
import yaml
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuner import metrics  # noqa: E402
from tuner.data import Splits, load_splits  # noqa: E402
from tuner.engine import Population  # noqa: E402
from tuner.spec import DataConfig, TrainConfig, parse_config  # noqa: E402
from tuner.study import CREATED_ATTR  # noqa: E402

TARGET = 0.02  # overhead as a fraction of the worker's wall time
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=5"


def spec_dict(name: str, trials: int, epochs: int, hidden: int) -> dict[str, Any]:
    """A fixed small study: sizes fixed (one population shape), lr/beta/warmup searched at random."""
    return {
        "study": name,
        "base": {
            "data": {"dataset": "mnist5k"},
            "model": {"arch": "mlp", "latent": 16, "hidden": hidden, "depth": 2},
            "optim": {"name": "adam", "batch_size": 64},
            "kl": {"schedule": "linear"},
            "train": {"iwae_k": 50},
        },
        "space": {
            "optim.lr": {"type": "float", "low": 3e-4, "high": 3e-3, "log": True},
            "kl.beta": {"type": "float", "low": 0.5, "high": 2.0, "log": True},
            "kl.warmup_epochs": {"type": "float", "low": 0.0, "high": 3.0, "step": 0.5},
        },
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "objective": "iwae_nll",
        "budget": {"trials": trials, "epochs": epochs},
        "workers": {"count": 1, "slots": 1, "device": "cpu"},
    }


# ------------------------------------------------------------------------------------ stores
@contextmanager
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database as a storage URL; dropped afterwards."""
    import psycopg
    from psycopg import sql

    name = f"tuner_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextmanager
def store(kind: str, tmp: Path) -> Iterator[str]:
    if kind == "postgres":
        with postgres_url() as url:
            yield url
    else:
        yield f"sqlite:///{tmp / f'{uuid.uuid4().hex[:8]}.db'}"


# ------------------------------------------------------------------------------ measurements
@dataclass
class TunerRun:
    configs: list[TrainConfig]
    values: list[float]  # the tuner's objective (val IWAE NLL) per complete trial
    wall_s: float  # first trial start -> last trial complete
    trial_s: list[float]  # each trial's start -> complete
    gaps_s: list[float]  # last trial complete -> next trial start
    startup_s: float  # process start -> first trial start (imports, study, data)
    tail_s: float  # last trial complete -> process exit


def run_tuner(spec: dict[str, Any], url: str, tmp: Path) -> TunerRun:
    """`tuner run` in a subprocess; times from the trials' timestamps in the store."""
    path = tmp / f"{spec['study']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "-m", "tuner", "run", str(path), "--workers", "1", "--storage", url,
           "--artifacts", str(tmp / "artifacts")]
    began = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
    ended = time.time()
    if proc.returncode != 0:
        logs = sorted((tmp / "artifacts" / spec["study"] / "workers").glob("*.log"))
        tail = logs[-1].read_text()[-2000:] if logs else ""
        sys.exit(f"tuner run failed ({proc.returncode}):\n{proc.stderr[-2000:]}\n{tail}")
    study = optuna.load_study(study_name=spec["study"], storage=url)
    done = sorted((t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE),
                  key=lambda t: t.datetime_start)
    if len(done) != spec["budget"]["trials"]:
        sys.exit(f"expected {spec['budget']['trials']} complete trials, found {len(done)}")
    starts = [t.datetime_start.timestamp() for t in done]
    ends = [t.datetime_complete.timestamp() for t in done]
    created = float(study.user_attrs.get(CREATED_ATTR, began))
    return TunerRun(
        configs=[parse_config(t.user_attrs["config"], source=f"trial {t.number} config") for t in done],
        values=[t.value for t in done],
        wall_s=ends[-1] - starts[0],
        trial_s=[e - s for s, e in zip(starts, ends)],
        gaps_s=[s - e for e, s in zip(ends[:-1], starts[1:])],
        startup_s=starts[0] - min(began, created),
        tail_s=ended - ends[-1],
    )


def train_bare(config: TrainConfig, splits: Splits) -> float:
    """One trial's compute with no tuner around it: train epoch by epoch, then the final metrics
    the worker computes (best-epoch weights, val and test). Returns the val IWAE NLL."""
    pop = Population.for_configs([config], splits)
    while pop.running():
        pop.run_epoch()
    state = pop.state[0]
    model = pop.slot_model(0, best=config.train.restore_best and state.best_epoch > 0)
    k, seed = config.train.iwae_k, config.seed
    val = metrics.evaluate(model, splits.val, k=k, seed=seed).slot(0)
    metrics.evaluate(model, splits.test, k=k, seed=seed).slot(0)
    return float(val["iwae_nll"])


def run_bare(configs: list[TrainConfig], splits: Splits) -> tuple[float, list[float], list[float]]:
    """(total wall s, wall s per trial, val IWAE NLL per trial)."""
    walls, values = [], []
    for config in configs:
        start = time.perf_counter()
        values.append(train_bare(config, splits))
        walls.append(time.perf_counter() - start)
    return sum(walls), walls, values


# ----------------------------------------------------------------------------------- profile
# (label, owner, attribute): the worker's phases, timed on its main thread. Exclusive: a call made
# inside another timed call counts for the outer one only, so the phases add up to the worker's wall.
def _phases() -> list[tuple[str, Any, str]]:
    import tuner.metrics
    import tuner.space
    import tuner.worker
    from optuna.storages import RDBStorage

    phases = [
        ("compute: train + validate", Population, "run_epoch"),
        ("compute: final metrics", tuner.metrics, "evaluate"),
        ("compute: best-weights copy", Population, "slot_model"),
        ("assign slot (init weights)", Population, "assign"),
        ("checkpoint: slot_checkpoint", Population, "slot_checkpoint"),
        ("checkpoint: save_atomic", tuner.worker, "save_atomic"),
        ("study.ask", optuna.Study, "ask"),
        ("space.sample (suggest_*)", tuner.space, "sample"),
        ("storage.get_trial (resume)", RDBStorage, "get_trial"),
        ("trial.set_user_attr", optuna.Trial, "set_user_attr"),
        ("trial.report", optuna.Trial, "report"),
        ("trial.should_prune", optuna.Trial, "should_prune"),
        ("mark_collapse (set_constraint)", optuna.Trial, "set_constraint"),
        ("study.tell", optuna.Study, "tell"),
        ("record_heartbeat", RDBStorage, "record_heartbeat"),
        ("fail_stale_trials", tuner.worker, "fail_stale_trials"),
        ("study_counts (get_trials)", tuner.worker, "study_counts"),
    ]
    return [p for p in phases if hasattr(p[1], p[2])]  # a phase the worker no longer has is left out


@contextmanager
def _timed(phases: list[tuple[str, Any, str]], profiler: cProfile.Profile | None) -> Iterator[dict[str, list[float]]]:
    """Wrap each phase with a main-thread, outermost-only timer; with a profiler, profile only
    the non-compute phases (the tuner's own work)."""
    import threading

    main, depth = threading.main_thread().ident, [0]
    spent: dict[str, list[float]] = {label: [0, 0.0] for label, _, _ in phases}
    saved = [(owner, name, getattr(owner, name)) for _, owner, name in phases]

    def wrap(label: str, fn: Any) -> Any:
        compute = label.startswith("compute")

        def timed(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != main or depth[0]:
                return fn(*args, **kwargs)
            depth[0] += 1
            if profiler is not None and compute:
                profiler.disable()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label][0] += 1
                spent[label][1] += time.perf_counter() - start
                if profiler is not None and compute:
                    profiler.enable()
                depth[0] -= 1

        return timed

    for (label, owner, name), (_, _, fn) in zip(phases, saved):
        setattr(owner, name, wrap(label, fn))
    try:
        yield spent
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def _in_process_worker(spec: dict[str, Any], url: str, tmp: Path, profiler: cProfile.Profile | None):
    from tuner.study import create_or_resume
    from tuner.study_spec import parse_study_spec
    from tuner.worker import Worker

    create_or_resume(parse_study_spec({**spec, "storage": url}), url)
    worker = Worker(url, spec["study"], artifacts=tmp / "artifacts", log=lambda line: None)
    with _timed(_phases(), profiler) as spent:
        start = time.perf_counter()
        if profiler is not None:
            profiler.runcall(worker.run)
        else:
            worker.run()
        total = time.perf_counter() - start
    return total, spent


def profile_worker(kind: str, spec: dict[str, Any], tmp: Path, top: int = 12) -> None:
    """Run the worker in this process: its wall by phase (timers), then a cProfile of its own work."""
    n = spec["budget"]["trials"]
    with store(kind, tmp) as url:
        total, spent = _in_process_worker(spec, url, tmp, None)
    compute = sum(s for label, (_, s) in spent.items() if label.startswith("compute"))
    print(f"  worker.run {total:.2f} s for {n} trials; compute {compute:.2f} s; "
          f"tuner's own work {100 * (total - compute) / total:.2f}% of the worker's wall")
    print(f"  {'phase (exclusive, main thread)':<34}{'calls':>7}{'s':>9}{'%':>7}{'ms/trial':>10}")
    rows = list(spent.items()) + [("other (loop, logging, ...)", [0, total - sum(s for _, s in spent.values())])]
    for label, (calls, seconds) in rows:
        print(f"  {label:<34}{calls:>7}{seconds:>9.3f}{100 * seconds / total:>7.2f}{1000 * seconds / n:>10.1f}")
    profiler = cProfile.Profile()
    with store(kind, tmp) as url:
        _in_process_worker({**spec, "study": spec["study"] + "-cprofile"}, url, tmp, profiler)
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    print(f"  top {top} functions by own time in the tuner's own work (cProfile, compute excluded; inflated):")
    for (file, line, func), (_, calls, own, cum, _) in sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]:
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}({func})" if line else func
        print(f"    {1000 * own / n:8.1f} ms/trial own {1000 * cum / n:8.1f} cum {calls // n:>6} calls/trial  {where[-64:]}")


# -------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256, help="MLP width (256: ~0.3 s/epoch on 2 cores)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per store; medians are printed")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--profile", action="store_true", help="also profile an in-process worker per store")
    args = parser.parse_args()
    stores = ["sqlite"] + ([] if args.no_postgres else ["postgres"])
    # the launcher gives its one worker every core: so does the bare run
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    splits = load_splits(DataConfig(), 1)
    print(f"CPU, {torch.get_num_threads()} threads; torch {torch.__version__}; optuna {optuna.__version__}")
    print(f"{args.trials} trials x {args.epochs} epochs, MLP VAE z16 h{args.hidden} depth 2 batch 64, "
          f"mnist5k, IWAE K=50 on val+test; {args.rounds} round(s) per store, medians")
    if args.no_postgres:
        print("postgres: skipped (--no-postgres)")
    runs: dict[str, list[tuple[TunerRun, float, list[float]]]] = {s: [] for s in stores}
    worst_diff = 0.0
    with tempfile.TemporaryDirectory(prefix="tuner-overhead-") as tmp_name:
        tmp = Path(tmp_name)
        for r in range(args.rounds):
            for kind in stores:  # each tuner run is followed at once by the bare run of its configs
                spec = spec_dict(f"overhead-{kind}-{r}", args.trials, args.epochs, args.hidden)
                with store(kind, tmp) as url:
                    tuner_run = run_tuner(spec, url, tmp)
                bare_s, bare_trial_s, values = run_bare(tuner_run.configs, splits)
                worst_diff = max(worst_diff, *(abs(a - b) for a, b in zip(values, tuner_run.values)))
                runs[kind].append((tuner_run, bare_s, bare_trial_s))
        print(f"bare retraining reproduces the tuner's val IWAE NLL to {worst_diff:.2e} nats (same compute)")
        print()
        print(f"{'store':<10}{'trials':>7}{'tuner_wall_s':>14}{'bare_wall_s':>13}{'overhead_%':>12}"
              f"{'target':>8}  verdict")
        breakdown = []
        for kind, results in runs.items():
            tuner_s = statistics.median(t.wall_s for t, _, _ in results)
            bare_s = statistics.median(b for _, b, _ in results)
            over = statistics.median((t.wall_s - b) / t.wall_s for t, b, _ in results)
            verdict = "pass" if over < TARGET else "FAIL"
            print(f"{kind:<10}{args.trials:>7}{tuner_s:>14.2f}{bare_s:>13.2f}{100 * over:>12.2f}"
                  f"{'< ' + format(100 * TARGET, 'g') + '%':>8}  {verdict}")
            in_trial = statistics.median(
                1000 * (sum(t.trial_s) - sum(bt)) / len(t.trial_s) for t, _, bt in results)
            gaps = statistics.median(1000 * sum(t.gaps_s) / len(t.trial_s) for t, _, _ in results)
            per_trial = statistics.median(1000 * (t.wall_s - b) / len(t.trial_s) for t, b, _ in results)
            startup = statistics.median(t.startup_s for t, _, _ in results)
            tail = statistics.median(t.tail_s for t, _, _ in results)
            breakdown.append((kind, per_trial, in_trial, gaps, startup, tail))
        print()
        print("where the extra time goes, per trial (medians; ms), and once per run (s, not in the wall above):")
        print(f"{'store':<10}{'extra_ms':>10}{'in_trial_ms':>13}{'between_ms':>12}{'startup_s':>11}{'exit_s':>8}")
        for kind, per_trial, in_trial, gaps, startup, tail in breakdown:
            print(f"{kind:<10}{per_trial:>10.1f}{in_trial:>13.1f}{gaps:>12.1f}{startup:>11.2f}{tail:>8.2f}")
        print("  in_trial: ask -> tell minus the bare trial (sampling, attrs, report, prune check, checkpoints, tell);")
        print("  between: tell -> next ask (stale-trial check, trial counts); startup: launch -> first trial")
        if args.profile:
            for kind in stores:
                print()
                print(f"profile ({kind}, in-process worker):")
                profile_worker(kind, spec_dict(f"overhead-profile-{kind}", args.trials, args.epochs, args.hidden), tmp)


if __name__ == "__main__":
    main()
