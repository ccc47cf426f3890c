"""The tuner's overhead: the same N trainings bare vs through `tuner run`, and where a worker's
training thread spends its wall (SQLite, PostgreSQL; 1 and 8 slots).

    python benchmarks/overhead.py [--trials 8] [--epochs 5] [--hidden 256] [--rounds 3] [--slots 1,8] [--no-postgres]

Target: the training thread spends under 1% of its wall on bookkeeping (queueing the epoch's
reports, placing asked trials, letting pruned ones go, and waiting for the bookkeeper thread: the
pipeline lets it wait only when that thread is more than an epoch behind). The store's own work
(ask, sampling, report, prune check, attrs, tell, counts, heartbeats), the final scores and the
checkpoint writes run on other threads; their busy time is printed beside the split. Two
measurements, same run:

1. Tuner vs bare wall. Each round runs, for every store, *bare* (this process retrains the configs
   of the previous tuner run, the same ones: the sampler is seeded, with ``Population.for_configs`` + ``run_epoch``
   until done and evaluates them on val and test, ``metrics.evaluate`` and ``gaps.trial_gaps``, as
   the worker does, with no Optuna, store, checkpoint or image), then `tuner run SPEC --workers 1`
   in a subprocess (random sampler, no pruner, N trials of E epochs, one slot on the CPU), then
   bare again on its configs (the first round, with no run before it: bare twice after it). Tuner wall = the first trial's ``datetime_start`` to the last trial's
   ``datetime_complete`` (the store's timestamps): process start-up (imports, study, data) is
   printed apart. The two bare runs around it give the noise: this machine's speed drifts by 10-20%
   between identical runs minutes apart, so (1) resolves nothing finer than that spread.
2. The split. One worker per store and slot count runs in this process; its training thread times
   its own phases (compute: train + validate + slot setup; bookkeeping; store wait; checkpoints: the
   snapshots and any wait for the writer; evaluation: handing finished slots over; idle: no trial
   to train, at the start and while the last trials are scored and told). Checkpoint bytes written
   per model-epoch are compared with their bound, a checkpoint's size over the cadence.

The verdict is (2)'s bookkeeping + store wait.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
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

from tuner.spec import DataConfig, TrainConfig, parse_config  # noqa: E402
from tuner.store.attrs import trial_config  # noqa: E402
from tuner.study.open import started_at  # noqa: E402
from tuner.vae import gaps, metrics  # noqa: E402
from tuner.vae.data import Splits, load_splits  # noqa: E402
from tuner.vae.engine import Population  # noqa: E402

BOOK_TARGET = 0.01  # the training thread's bookkeeping as a fraction of its wall time


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
        configs=[parse_config(trial_config(t), source=f"trial {t.number} config") for t in done],
        values=[t.value for t in done],
        wall_s=ends[-1] - starts[0],
        trial_s=[e - s for s, e in zip(starts, ends)],
        gaps_s=[s - e for e, s in zip(ends[:-1], starts[1:])],
        startup_s=starts[0] - min(began, started_at(study)),
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


# ------------------------------------------------------------------ 2. the training thread's split
PHASES = ("compute", "bookkeeping", "store wait", "checkpoints", "evaluation", "idle")
BOOKKEEPING = ("bookkeeping", "store wait")  # the training thread's share of the store work: the verdict


@dataclass
class Split:
    """One in-process worker run: the training thread's seconds per phase and what was written."""

    slots: int
    summary: Any  # tuner.study.worker.WorkerSummary

    def share(self, *phases: str) -> float:
        return sum(self.summary.phases.get(p, 0.0) for p in phases) / self.summary.wall_s

    def bytes_per_model_epoch(self) -> float:
        return self.summary.checkpoint_bytes / max(self.summary.model_epochs, 1)

    def bound(self, every_epochs: int) -> float:
        """The goal: a checkpoint's size (the mean file) over the cadence, per model-epoch."""
        return self.summary.checkpoint_bytes / max(self.summary.checkpoint_files, 1) / every_epochs


def timed_worker(spec: dict[str, Any], url: str, tmp: Path, slots: int) -> Split:
    """Create the study and run its worker in this process with ``slots`` slots."""
    from tuner.study.open import create_or_resume
    from tuner.study.spec import parse_study_spec
    from tuner.study.worker import Worker

    spec = {**spec, "study": f"{spec['study']}-{slots}", "workers": {**spec["workers"], "slots": slots}}
    create_or_resume(parse_study_spec({**spec, "storage": url}), url)
    worker = Worker(url, spec["study"], artifacts=tmp / "artifacts", log=lambda line: None)
    return Split(slots, worker.run())


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
    parser.add_argument("--slots", default="1,8", help="slot counts of the in-process workers of (2)")
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
    timed: dict[str, list[Split]] = {}
    slot_counts = [int(x) for x in args.slots.split(",")]
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
            for slots in slot_counts:
                with store(kind, tmp) as url:
                    split = timed_worker(spec_dict(f"overhead-timed-{kind}", n, args.epochs, args.hidden), url, tmp, slots)
                timed.setdefault(kind, []).append(split)
        pressure = cpu_pressure_s()
        load = "" if pressure is None or pressure0 is None else (
            f"; CPU pressure (some task waiting for a core) {100 * (pressure - pressure0) / (time.perf_counter() - began):.0f}%"
            " of the time")
        print(f"bare retraining reproduces the tuner's val IWAE NLL to {worst_diff:.1e} nats (same compute){load}")

        print()
        print(f"{'store':<10}{'trials':>7}{'tuner_wall_s':>14}{'bare_wall_s':>13}{'overhead_%':>12}{'noise_%':>9}")
        for kind, rounds in runs.items():
            print(f"{kind:<10}{n:>7}"
                  f"{statistics.median(r.tuner.wall_s for r in rounds):>14.2f}"
                  f"{statistics.median(r.bare_wall() for r in rounds):>13.2f}"
                  f"{100 * statistics.median(r.overhead() for r in rounds):>12.2f}"
                  f"{100 * statistics.median(r.noise() for r in rounds):>9.2f}")
        print("  (1): overhead_% (tuner wall - bare wall) / tuner wall, the bare wall the mean of the runs before and "
              "after;\n  noise_% how far those two differ (this machine drifts: (1) cannot resolve a few percent)")
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
        every = spec_dict("x", n, args.epochs, args.hidden).get("checkpoints", {}).get("every_epochs", 5)
        print("(2) the training thread's wall by phase (%), one in-process worker per store and slot count; "
              f"verdict: bookkeeping + store wait < {100 * BOOK_TARGET:g}%")
        print(f"{'store':<10}{'slots':>6}{'model_epochs':>13}{'wall_s':>8}"
              + "".join(f"{p.replace(' ', '_') + '_%':>15}" for p in PHASES)
              + f"{'verdict':>9}{'ckpt_B/epoch':>14}{'bound_B/epoch':>15}")
        for kind, splits in timed.items():
            for sp in splits:
                verdict = "pass" if sp.share(*BOOKKEEPING) < BOOK_TARGET else "FAIL"
                print(f"{kind:<10}{sp.slots:>6}{sp.summary.model_epochs:>13}{sp.summary.wall_s:>8.2f}"
                      + "".join(f"{100 * sp.share(p):>15.2f}" for p in PHASES)
                      + f"{verdict:>9}{sp.bytes_per_model_epoch():>14.0f}{sp.bound(every):>15.0f}")
        print("  the other threads' busy time (% of the worker's wall): "
              + "; ".join(f"{kind} x{sp.slots}: " + ", ".join(f"{t} {100 * v / sp.summary.wall_s:.1f}"
                                                          for t, v in sorted(sp.summary.threads.items()))
                          for kind, splits in timed.items() for sp in splits))
        print(f"  checkpoints: every {every} epochs and at the end of a kept trial; bound = a checkpoint's size / "
              f"{every} per model-epoch")


if __name__ == "__main__":
    main()
