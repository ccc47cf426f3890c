"""The tuner's overhead: the same N trainings run bare vs through `tuner run` (SQLite, PostgreSQL).

    python benchmarks/overhead.py [--trials 8] [--epochs 5] [--hidden 256] [--rounds 3] [--no-postgres] [--profile]

Target: the tuner's bookkeeping (the issue's list: ask, sampling, report, prune check, attrs, tell,
trial counts, heartbeats, stale-trial checks, the loop) stays under 2% of the worker's wall time.
Its other own work, the per-epoch checkpoints (kill -9 loses at most an epoch) and the images, is
measured and printed beside it, with the checkpoint writes of the background thread counted by the
CPU time they take from training. Two measurements, same run:

1. Tuner vs bare wall. Each round runs, for every store, *bare* (this process retrains the configs
   of the previous tuner run, the same ones: the sampler is seeded, with ``Population.for_configs`` + ``run_epoch``
   until done and evaluates them on val and test, ``metrics.evaluate`` and ``gaps.trial_gaps``, as
   the worker does, with no Optuna, store, checkpoint or image), then `tuner run SPEC --workers 1`
   in a subprocess (random sampler, no pruner, N trials of E epochs, one slot on the CPU), then
   bare again on its configs (the first round, with no run before it: bare twice after it). Tuner wall = the first trial's ``datetime_start`` to the last trial's
   ``datetime_complete`` (the store's timestamps): process start-up (imports, study, data) is
   printed apart. The two bare runs around it give the noise: this machine's speed drifts by 10-20%
   between identical runs minutes apart, so (1) resolves nothing finer than that spread.
2. Own work. The worker runs once more per store in this process with a timer around each of its
   phases (outermost call only, main thread), in the same interval as its compute (train +
   validate, final metrics, the gaps, the best-weights copy and the weights' init, which the bare
   run does in ``Population.for_configs``), so load from other processes skews it far less than (1).

The verdict is (2)'s bookkeeping. ``--profile`` adds a cProfile of the own-work phases (compute
excluded; cProfile inflates Python-heavy code).
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
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stores import store  # noqa: E402  (benchmarks/stores.py, beside this script)
from tuner import gaps, metrics  # noqa: E402
from tuner.data import Splits, load_splits  # noqa: E402
from tuner.engine import Population  # noqa: E402
from tuner.spec import DataConfig, TrainConfig, parse_config  # noqa: E402
from tuner.study import CREATED_ATTR  # noqa: E402

TARGET = 0.02  # the tuner's own work as a fraction of the worker's wall time


def spec_dict(name: str, trials: int, epochs: int, hidden: int) -> dict[str, Any]:
    """A fixed small study: sizes fixed (one population shape), lr/beta/warmup searched at random."""
    return {
        "study": name,
        "base": {
            "data": {"dataset": "mnist5k"},
            "model": {"arch": "mlp", "latent": 16, "hidden": hidden, "depth": 2},
            "optim": {"name": "adam", "batch_size": 64},
            "kl": {"schedule": "linear"},
            "train": {"iwae_k": 50, "gap_examples": 32, "gap_steps": 50},  # final metrics and gaps kept small
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


def cpu_pressure_s() -> float | None:
    """Seconds some task on this machine waited for a CPU (Linux PSI), or None where unknown."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return None
    return int(line.rsplit("total=", 1)[1]) / 1e6


# ------------------------------------------------------------------------- 1. tuner vs bare
@dataclass
class TunerRun:
    configs: list[TrainConfig]
    values: list[float]  # the tuner's objective (val IWAE NLL) per complete trial
    wall_s: float  # first trial start -> last trial complete
    trial_s: list[float]  # each trial's start -> complete
    gaps_s: list[float]  # a trial's complete -> the next one's start
    startup_s: float  # launch -> first trial start (imports, study, data)
    exit_s: float  # last trial complete -> launcher exit


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
    return TunerRun(
        configs=[parse_config(t.user_attrs["config"], source=f"trial {t.number} config") for t in done],
        values=[t.value for t in done],
        wall_s=ends[-1] - starts[0],
        trial_s=[e - s for s, e in zip(starts, ends)],
        gaps_s=[s - e for e, s in zip(ends[:-1], starts[1:])],
        startup_s=starts[0] - min(began, float(study.user_attrs.get(CREATED_ATTR, began))),
        exit_s=ended - ends[-1],
    )


def train_bare(config: TrainConfig, splits: Splits) -> float:
    """One trial's compute with no tuner around it: train epoch by epoch, then the final metrics
    the worker computes (best-epoch weights, val and test, the gaps). Returns the val IWAE NLL."""
    pop = Population.for_configs([config], splits)
    while pop.running():
        pop.run_epoch()
    state = pop.state[0]
    model = pop.slot_model(0, best=config.train.restore_best and state.best_epoch > 0)
    k, seed = config.train.iwae_k, config.seed
    val = metrics.evaluate(model, splits.val, k=k, seed=seed).slot(0)
    metrics.evaluate(model, splits.test, k=k, seed=seed).slot(0)
    gaps.trial_gaps(model, splits.test, config)
    return float(val["iwae_nll"])


def run_bare(configs: list[TrainConfig], splits: Splits) -> tuple[list[float], list[float]]:
    """(wall s per trial, val IWAE NLL per trial)."""
    walls, values = [], []
    for config in configs:
        start = time.perf_counter()
        values.append(train_bare(config, splits))
        walls.append(time.perf_counter() - start)
    return walls, values


# --------------------------------------------------------------------------- 2. own work
COMPUTE, STORE, CHECKPOINT, IMAGES = "compute", "store", "checkpoint", "images"  # the phases' categories
BACKGROUND = "checkpoint: write (background thread, CPU)"


def _phases(worker: Any) -> list[tuple[str, str, Any, str]]:
    """(category, label, owner, attribute) of each phase of the worker loop; compute is the bare work."""
    import tuner.gaps
    import tuner.metrics
    import tuner.space
    import tuner.worker

    phases = [
        (COMPUTE, "compute: train + validate", Population, "run_epoch"),
        (COMPUTE, "compute: final metrics", tuner.metrics, "evaluate"),
        (COMPUTE, "compute: gaps", tuner.gaps, "trial_gaps"),
        (COMPUTE, "compute: best-weights copy", Population, "slot_model"),
        (COMPUTE, "compute: init weights (assign)", Population, "assign"),
        (IMAGES, "images: render + save", type(worker), "_save_images"),
        (CHECKPOINT, "checkpoint: copy (slot_checkpoint)", Population, "slot_checkpoint"),
        (CHECKPOINT, "checkpoint: wait for the writer", tuner.worker._CheckpointWriter, "flush"),
        (STORE, "study.ask", optuna.Study, "ask"),
        (STORE, "space.sample (suggest_*)", tuner.space, "sample"),
        (STORE, "spec.train_config (pydantic)", type(worker.spec), "train_config"),
        (STORE, "storage.get_trial (retry check)", type(worker.storage), "get_trial"),
        (STORE, "set_trial_attrs (one transaction)", tuner.worker, "set_trial_attrs"),
        (STORE, "trial.set_user_attr", optuna.Trial, "set_user_attr"),
        (STORE, "trial.report", optuna.Trial, "report"),
        (STORE, "trial.should_prune", optuna.Trial, "should_prune"),
        (STORE, "config_to_yaml (config hash)", tuner.worker, "config_to_yaml"),
        (STORE, "study.tell", optuna.Study, "tell"),
        (STORE, "record_heartbeat", type(worker.storage), "record_heartbeat"),
        (STORE, "fail_stale_trials", tuner.worker, "fail_stale_trials"),
        (STORE, "study_counts", tuner.worker, "study_counts"),
    ]
    return [p for p in phases if hasattr(p[2], p[3])]  # a phase the worker no longer has is left out


@contextmanager
def _timed(phases: list[tuple[str, str, Any, str]], profiler: cProfile.Profile | None) -> Iterator[dict[str, list[float]]]:
    """Time each phase on the main thread, outermost call only (a phase called inside another
    counts for the outer one), so the phases add up to at most the wall; and the CPU time of the
    checkpoint writes on the writer thread (``BACKGROUND``, apart from the wall). With a profiler,
    profile everything but the compute phases."""
    import tuner.worker

    main, depth = threading.main_thread().ident, [0]
    spent: dict[str, list[float]] = {label: [0, 0.0] for _, label, _, _ in phases}  # label -> [calls, s]
    spent[BACKGROUND] = [0, 0.0]
    patched = [(label, category == COMPUTE, owner, name) for category, label, owner, name in phases]
    saved = [(owner, name, getattr(owner, name)) for _, _, owner, name in patched]

    def wrap(label: str, compute: bool, fn: Any) -> Any:
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

    write = tuner.worker.save_atomic

    def background_write(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time()  # this thread's CPU: what the write takes from the training threads
        try:
            return write(*args, **kwargs)
        finally:
            spent[BACKGROUND][0] += 1
            spent[BACKGROUND][1] += time.thread_time() - start

    for (label, compute, owner, name), (_, _, fn) in zip(patched, saved):
        setattr(owner, name, wrap(label, compute, fn))
    tuner.worker.save_atomic = background_write
    try:
        yield spent
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
        tuner.worker.save_atomic = write


def timed_worker(
    spec: dict[str, Any], url: str, tmp: Path, profiler: cProfile.Profile | None = None
) -> tuple[float, dict[str, list[float]]]:
    """Create the study and run its worker in this process: (worker wall s, label -> [calls, s])."""
    from tuner.study import create_or_resume
    from tuner.study_spec import parse_study_spec
    from tuner.worker import Worker

    create_or_resume(parse_study_spec({**spec, "storage": url}), url)
    worker = Worker(url, spec["study"], artifacts=tmp / "artifacts", log=lambda line: None)
    with _timed(_phases(worker), profiler) as spent:
        start = time.perf_counter()
        if profiler is not None:
            profiler.runcall(worker.run)
        else:
            worker.run()
        wall = time.perf_counter() - start
    spent["other (loop, logging, ...)"] = [0, wall - sum(s for label, (_, s) in spent.items() if label != BACKGROUND)]
    return wall, spent


def own_work(wall: float, spent: dict[str, list[float]], category: str | None = None) -> float:
    """The tuner's own work as a fraction of the worker's wall: all of it (None: everything but
    compute, plus the background checkpoint writes' CPU), or one category's phases (the checkpoints'
    include those writes; "other", the loop itself, counts as store bookkeeping)."""
    if category is None:
        compute = sum(s for label, (_, s) in spent.items() if label.startswith("compute"))
        return (wall - compute + spent[BACKGROUND][1]) / wall
    prefix = {STORE: None, CHECKPOINT: "checkpoint", IMAGES: "images"}[category]
    if prefix is None:
        return sum(s for label, (_, s) in spent.items()
                   if not label.startswith(("compute", "checkpoint", "images"))) / wall
    return sum(s for label, (_, s) in spent.items() if label.startswith(prefix)) / wall


def print_profile(kind: str, spec: dict[str, Any], tmp: Path, trials: int, top: int = 12) -> None:
    """cProfile of one in-process worker run, compute phases excluded: the own work's top functions."""
    profiler = cProfile.Profile()
    with store(kind, tmp) as url:
        timed_worker(spec, url, tmp, profiler)
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    print(f"{kind}: top {top} functions by own time in the tuner's own work (cProfile, compute excluded):")
    for (file, line, func), (_, calls, own, cum, _) in sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]:
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}({func})" if line else func
        print(f"  {1000 * own / trials:7.1f} ms/trial own {1000 * cum / trials:7.1f} cum "
              f"{calls / trials:7.1f} calls/trial  {where[-60:]}")


# -------------------------------------------------------------------------------------- main
@dataclass
class Round:
    tuner: TunerRun
    bare_s: list[float]  # per trial, the bare run just after the tuner run (its configs)
    before_s: list[float]  # per trial, the bare run just before it (the same configs, or the first run's)

    def overhead(self) -> float:
        return (self.tuner.wall_s - self.bare_wall()) / self.tuner.wall_s

    def bare_wall(self) -> float:
        return (sum(self.bare_s) + sum(self.before_s)) / 2

    def noise(self) -> float:
        """How much two bare runs of the same work, a tuner run apart, differ: (1)'s resolution."""
        return abs(sum(self.bare_s) - sum(self.before_s)) / self.bare_wall()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256, help="MLP width (256: ~0.3 s/epoch on 2 cores)")
    parser.add_argument("--rounds", type=int, default=3, help="bare/tuner/bare rounds per store; medians are printed")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--profile", action="store_true", help="also cProfile the own work of a worker per store")
    args = parser.parse_args()
    stores = ["sqlite"] + ([] if args.no_postgres else ["postgres"])
    n = args.trials
    torch.set_num_threads(max(1, os.cpu_count() or 1))  # the launcher gives its one worker every core
    splits = load_splits(DataConfig(), 1)
    print(f"CPU, {torch.get_num_threads()} threads; torch {torch.__version__}; optuna {optuna.__version__}; "
          f"{n} trials x {args.epochs} epochs, MLP VAE z16 h{args.hidden} depth 2 batch 64, mnist5k, "
          f"IWAE K=50 on val+test; {args.rounds} round(s)")
    if args.no_postgres:
        print("postgres: skipped (--no-postgres)")
    runs: dict[str, list[Round]] = {s: [] for s in stores}
    timed: dict[str, tuple[float, dict[str, list[float]]]] = {}
    worst_diff = 0.0
    began, pressure0 = time.perf_counter(), cpu_pressure_s()
    with tempfile.TemporaryDirectory(prefix="tuner-overhead-") as tmp_name:
        tmp = Path(tmp_name)
        configs: list[TrainConfig] = []
        for r in range(args.rounds):
            for kind in stores:  # bare, the tuner run, bare on its configs: the two bare runs bracket it
                before_s = run_bare(configs, splits)[0] if configs else []
                with store(kind, tmp) as url:
                    tuner_run = run_tuner(spec_dict(f"overhead-{kind}-{r}", n, args.epochs, args.hidden), url, tmp)
                bare_s, values = run_bare(tuner_run.configs, splits)
                worst_diff = max(worst_diff, *(abs(a - b) for a, b in zip(values, tuner_run.values)))
                configs = tuner_run.configs
                runs[kind].append(Round(tuner_run, bare_s, before_s or run_bare(configs, splits)[0]))
        for kind in stores:
            with store(kind, tmp) as url:
                timed[kind] = timed_worker(spec_dict(f"overhead-timed-{kind}", n, args.epochs, args.hidden), url, tmp)
        pressure = cpu_pressure_s()
        load = "" if pressure is None or pressure0 is None else (
            f"; CPU pressure (some task waiting for a core) {100 * (pressure - pressure0) / (time.perf_counter() - began):.0f}%"
            " of the time")
        print(f"bare retraining reproduces the tuner's val IWAE NLL to {worst_diff:.1e} nats (same compute){load}")

        print()
        print(f"{'store':<10}{'trials':>7}{'bookkeeping_%':>15}{'target':>8}  {'verdict':<9}{'checkpoint_%':>13}"
              f"{'images_%':>10}{'own_all_%':>11}{'tuner_wall_s':>14}{'bare_wall_s':>13}{'overhead_%':>12}{'noise_%':>9}")
        for kind, rounds in runs.items():
            wall, spent = timed[kind]
            book = own_work(wall, spent, STORE)
            verdict = "pass" if book < TARGET else "FAIL"
            print(f"{kind:<10}{n:>7}{100 * book:>15.2f}{'< ' + format(100 * TARGET, 'g') + '%':>8}  {verdict:<9}"
                  f"{100 * own_work(wall, spent, CHECKPOINT):>13.2f}"
                  f"{100 * own_work(wall, spent, IMAGES):>10.2f}{100 * own_work(wall, spent):>11.2f}"
                  f"{statistics.median(r.tuner.wall_s for r in rounds):>14.2f}"
                  f"{statistics.median(r.bare_wall() for r in rounds):>13.2f}"
                  f"{100 * statistics.median(r.overhead() for r in rounds):>12.2f}"
                  f"{100 * statistics.median(r.noise() for r in rounds):>9.2f}")
        print("  (2), one timed in-process run: bookkeeping_% the store and Optuna work (the verdict), checkpoint_% "
              "the copies,\n  the waits and the writer thread's CPU, images_%, own_all_% all of it (1 - compute / wall, "
              "plus the writer's CPU)\n  (1): overhead_% (tuner wall - bare wall) / tuner wall, the bare wall the mean of "
              "the runs before and after; noise_% how far those two differ")
        for kind, rounds in runs.items():
            print(f"  {kind} overhead_% per round: " + " ".join(f"{100 * r.overhead():+.1f}" for r in rounds)
                  + "; noise_%: " + " ".join(f"{100 * r.noise():.1f}" for r in rounds))

        print()
        print("(1) the tuner's extra wall per trial (ms, medians) and once per run (s, not in the walls above):")
        print(f"{'store':<10}{'extra_ms':>10}{'in_trial_ms':>13}{'between_ms':>12}{'startup_s':>11}{'exit_s':>8}")
        for kind, rounds in runs.items():
            extra = statistics.median(1000 * (r.tuner.wall_s - r.bare_wall()) / n for r in rounds)
            in_trial = statistics.median(1000 * (sum(r.tuner.trial_s) - r.bare_wall()) / n for r in rounds)
            between = statistics.median(1000 * sum(r.tuner.gaps_s) / n for r in rounds)
            startup = statistics.median(r.tuner.startup_s for r in rounds)
            exit_s = statistics.median(r.tuner.exit_s for r in rounds)
            print(f"{kind:<10}{extra:>10.1f}{in_trial:>13.1f}{between:>12.1f}{startup:>11.2f}{exit_s:>8.2f}")
        print("  in_trial: ask -> tell minus the bare trial; between: tell -> next ask; startup: launch -> first trial")

        print()
        print("(2) the worker's wall by phase (ms per trial; exclusive, main thread; the writer thread's CPU apart):")
        print(f"{'phase':<38}" + "".join(f"{k + '_ms':>13}{'%':>7}" for k in stores) + f"{'calls/trial':>13}")
        labels = [label for label in timed[stores[0]][1] if label != BACKGROUND] + [BACKGROUND]
        for label in labels:
            cells = "".join(f"{1000 * timed[k][1][label][1] / n:>13.1f}{100 * timed[k][1][label][1] / timed[k][0]:>7.2f}"
                            for k in stores)
            print(f"{label:<38}{cells}{timed[stores[0]][1][label][0] / n:>13.1f}")
        cells = "".join(f"{1000 * own_work(*timed[k]) * timed[k][0] / n:>13.1f}{100 * own_work(*timed[k]):>7.2f}"
                        for k in stores)
        print(f"{'= own work (all but compute + writer)':<38}{cells}")

        if args.profile:
            for kind in stores:
                print()
                print_profile(kind, spec_dict(f"overhead-profile-{kind}", n, args.epochs, args.hidden), tmp, n)


if __name__ == "__main__":
    main()
