"""A search race: which setup finds the best VAE in the same wall time, over repeats with other seeds.

    python benchmarks/search_race.py [--spec studies/mnist.yaml] [--seconds 1200] [--repeats 3 | --seeds 1,2]
                                     [--workers 2] [--target 105.5] [--arms tuner,plain-same,plain-textbook]
                                     [--json race.json] [--keep DIR]

Arms, run one after another (each gets the whole machine for ``--seconds``), each ``--repeats``
times with sampler seed 0, 1, ...:

* ``tuner``: ``tuner run SPEC`` with the spec's budget replaced by the wall time (``budget.timeout``),
  its sampler seeded by the repeat, ``--workers`` processes.
* ``plain-same``: the textbook Optuna loop on the **same space** as the spec: ``--workers`` processes
  each calling ``study.optimize`` (TPE seeded by the repeat, MedianPruner, one trial at a time per
  process), the spec's params sampled with ``trial.suggest_*`` and trained one trial per process by
  tuner's engine (a textbook nn.Module loop cannot express every entry of the space: KL cycles,
  free bits, LR warmup); the validation -ELBO reported each epoch; the value is the validation IWAE
  NLL. What it isolates: the orchestration (pruner, enqueued base config, populations, asking).
* ``plain-textbook``: ``benchmarks/plain_optuna.py``'s loop: its own nn.Module MLP VAE and DataLoader
  on its small textbook space (latent, hidden, lr, beta, KL warmup).

Every complete trial stores its test IWAE NLL (K = the spec's ``train.iwae_k``, 200 for mnist.yaml);
the score of a run is that of its best trial **by validation** among the trials finished within the
wall time (the test split never chooses). Time to target: seconds from launch until the running
best-by-validation trial's test NLL first reaches ``--target``. A table on stdout, every run in the
JSON file. ``--keep DIR`` runs in DIR and keeps every run's SQLite study there (``<arm>-<seed>.db``,
study ``race``) with the tuner's artifacts, so ``tuner confirm`` or ``tuner rank`` can read them after.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from optuna.trial import FrozenTrial, TrialState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from tuner.study import space  # noqa: E402
from tuner.study.spec import StudySpec, load_study_spec, parse_study_spec  # noqa: E402
from tuner.vae import metrics  # noqa: E402
from tuner.vae.data import load_splits  # noqa: E402
from tuner.vae.engine import Population  # noqa: E402

import plain_optuna  # noqa: E402  (benchmarks/plain_optuna.py: the textbook loop)

ARMS = ("tuner", "plain-same", "plain-textbook")


# ------------------------------------------------------------------------------- plain arms
def same_space_objective(spec: StudySpec, seed: int):
    """The spec's space, suggested by the trial; one trial trained alone by tuner's engine."""
    splits = load_splits(spec.base.data, spec.base.optim.batch_size)

    def objective(trial: optuna.Trial) -> float:
        config = spec.train_config(space.sample(trial, spec), seed=1000 * seed + trial.number)
        pop = Population.for_configs([config], splits)
        while pop.running():
            for r in pop.run_epoch():
                trial.report(r.val_neg_elbo, r.epoch)
            if pop.running() and trial.should_prune():
                raise optuna.TrialPruned()
        if not math.isfinite(pop.state[0].best_val):
            raise optuna.TrialPruned("diverged")
        model = pop.finished_model([0])
        k = config.train.iwae_k
        trial.set_user_attr("test_iwae_nll", metrics.evaluate(model, splits.test, k=k, seed=config.seed).slot(0)["iwae_nll"])
        return metrics.evaluate(model, splits.val, k=k, seed=config.seed).slot(0)["iwae_nll"]

    return objective


def textbook_objective(spec: StudySpec):
    """plain_optuna.py's objective (its space, model and loop) on the spec's data and split and up
    to its epochs, the test IWAE NLL stored beside its value."""
    splits = load_splits(spec.base.data, plain_optuna.BATCH)
    epochs, iwae_k = spec.budget.epochs, spec.base.train.iwae_k
    return plain_optuna.make_objective(splits.train, splits.val, epochs, k=iwae_k, test=splits.test)


def arm_worker(args: argparse.Namespace) -> None:
    """One plain process: join the arm's study and optimize until the shared deadline."""
    torch.set_num_threads(1)
    torch.manual_seed(args.seed * 100 + args.index)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = parse_study_spec(json.loads(Path(args.spec_json).read_text()))
    objective = (same_space_objective(spec, args.seed) if args.arm == "plain-same"
                 else textbook_objective(spec))
    storage = optuna.storages.RDBStorage(args.storage, engine_kwargs={"connect_args": {"timeout": 60}})
    study = optuna.load_study(study_name="race", storage=storage,
                              sampler=optuna.samplers.TPESampler(seed=args.seed * 100 + args.index),
                              pruner=optuna.pruners.MedianPruner())
    study.optimize(objective, timeout=max(0.0, args.deadline - time.time()), catch=(RuntimeError,))


# ------------------------------------------------------------------------------------ runs
def run_arm(arm: str, tmp: Path, spec_raw: dict[str, Any], seconds: float, workers: int,
            seed: int) -> tuple[float, float, list[FrozenTrial]]:
    """(launch time, wall s, trials) of one arm's run."""
    url = f"sqlite:///{tmp / f'{arm}-{seed}.db'}"
    started = time.time()
    if arm == "tuner":
        raw = {**spec_raw, "study": "race", "storage": url,
               "sampler": {**spec_raw.get("sampler", {}), "seed": seed},
               "budget": {**spec_raw.get("budget", {}), "trials": 100000, "timeout": seconds}}
        path = tmp / f"race-{seed}.yaml"
        path.write_text(yaml.safe_dump(raw))
        proc = subprocess.run([sys.executable, "-m", "tuner", "run", str(path), "--workers", str(workers),
                               "--artifacts", str(tmp / f"art-{seed}")], capture_output=True, text=True, cwd=tmp)
        if proc.returncode != 0:  # a failed worker is a result too: say so, keep its log, score the study
            logs = sorted((tmp / f"art-{seed}").glob("*/workers/*.log"))
            tails = "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text().splitlines()[-15:]) for p in logs)
            print(f"  tuner seed {seed}: tuner run exited {proc.returncode}:\n{proc.stderr[-1500:]}\n{tails}", flush=True)
    else:
        optuna.create_study(study_name="race", storage=url, direction="minimize")
        spec_json = tmp / "spec.json"
        spec_json.write_text(json.dumps(spec_raw))
        procs = [subprocess.Popen([sys.executable, __file__, "--arm-worker", arm, "--storage", url, "--seed", str(seed),
                                   "--index", str(i), "--deadline", str(started + seconds), "--spec-json", str(spec_json)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i in range(workers)]
        for p, out in [(p, p.communicate()[0]) for p in procs]:
            if p.returncode != 0:
                sys.exit(f"{arm} worker failed ({p.returncode}):\n{out[-2000:]}")
    wall = time.time() - started
    return started, wall, optuna.load_study(study_name="race", storage=url).get_trials(deepcopy=False)


def score(started: float, seconds: float, trials: list[FrozenTrial], target: float) -> dict[str, Any]:
    """The run's best-by-validation test NLL among trials finished within the wall time, the time
    its running value first reached ``target``, trials and model-epochs."""
    deadline = started + seconds
    done = sorted((t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                   and t.datetime_complete.timestamp() <= deadline), key=lambda t: t.datetime_complete)
    best_val, best_test, reached = math.inf, math.nan, None
    for t in done:
        if t.state == TrialState.COMPLETE and t.value is not None and t.value < best_val \
                and math.isfinite(t.user_attrs.get("test_iwae_nll", math.nan)):
            best_val, best_test = t.value, t.user_attrs["test_iwae_nll"]
            if reached is None and best_test <= target:
                reached = t.datetime_complete.timestamp() - started
    return {
        "test_nll": best_test, "val_nll": best_val if math.isfinite(best_val) else math.nan,
        "reached_s": reached, "trials": len(done), "complete": sum(t.state == TrialState.COMPLETE for t in done),
        "epochs": sum(len(t.intermediate_values) for t in done),
    }


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    return f"{statistics.fmean(values):.2f}±{statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "studies" / "mnist.yaml"), help="the tuner's study spec")
    parser.add_argument("--seconds", type=float, default=1200.0, help="wall time of each run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per arm (sampler seeds 0..R-1)")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated sampler seeds instead of 0..R-1 (e.g. 1,2 to add repeats to a run of seed 0)")
    parser.add_argument("--workers", type=int, default=2, help="processes per run (one per core)")
    parser.add_argument("--target", type=float, default=105.5, help="test NLL (nats) for the time-to-target column")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--json", default=None, help="write every run here (default: search_race.json in a temp dir)")
    parser.add_argument("--keep", default=None, help="run in this directory and keep its studies (default: a temp dir)")
    parser.add_argument("--arm-worker", choices=ARMS[1:], help=argparse.SUPPRESS)
    parser.add_argument("--storage", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--spec-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm_worker:
        args.arm = args.arm_worker
        arm_worker(args)
        return
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if unknown := [a for a in arms if a not in ARMS]:
        sys.exit(f"--arms: {unknown[0]!r} is not an arm; use {', '.join(ARMS)}")
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()] if args.seeds else list(range(args.repeats))
    except ValueError:
        sys.exit(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. --seeds 1,2")
    if not seeds:
        sys.exit("--seeds is empty; give at least one seed, e.g. --seeds 0")
    load_study_spec(args.spec)  # a bad spec fails here
    spec_raw = yaml.safe_load(Path(args.spec).read_text())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"race: {args.seconds:g} s per run, {args.workers} processes, seeds {','.join(map(str, seeds))} per arm; spec {args.spec} "
          f"({len(spec_raw['space'])} params, up to {spec_raw['budget']['epochs']} epochs); score: the best-by-validation "
          f"trial's test IWAE NLL (nats); target {args.target:g}", flush=True)
    runs: list[dict[str, Any]] = []
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        if taken := [f"{a}-{s}.db" for a in arms for s in seeds if (Path(args.keep) / f"{a}-{s}.db").exists()]:
            sys.exit(f"--keep {args.keep}: it already holds {taken[0]}; give an empty directory (a rerun would mix studies)")
    with (nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="tuner-race-")) as tmp_name:
        tmp = Path(tmp_name).resolve()
        for arm in arms:
            for seed in seeds:
                started, wall, trials = run_arm(arm, tmp, spec_raw, args.seconds, args.workers, seed)
                runs.append({"arm": arm, "seed": seed, "wall_s": round(wall, 1),
                             **score(started, args.seconds, trials, args.target)})
                r = runs[-1]
                print(f"  {arm} seed {seed}: test {r['test_nll']:.2f} (val {r['val_nll']:.2f}), {r['trials']} trials, "
                      f"{r['epochs']} epochs, target at {r['reached_s']} s", flush=True)
        out = Path(args.json) if args.json else tmp / "search_race.json"
        out.write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))
        print()
        print(f"{'arm':<16}{'test_nll':>13}{'worst':>8}{'reached':>8}{'to_target_s':>12}{'trials':>8}{'epochs':>8}")
        for arm in arms:
            mine = [r for r in runs if r["arm"] == arm]
            times = [r["reached_s"] for r in mine if r["reached_s"] is not None]
            worst = max((r["test_nll"] for r in mine), default=math.nan)
            print(f"{arm:<16}{_mean_sd([r['test_nll'] for r in mine]):>13}{worst:>8.2f}{len(times):>5}/{len(mine):<2}"
                  f"{(f'{max(times):.0f}' if len(times) == len(mine) else '-'):>12}"
                  f"{statistics.fmean(r['trials'] for r in mine):>8.1f}{statistics.fmean(r['epochs'] for r in mine):>8.1f}")
        print("  test_nll: mean±sd over repeats; worst: the worst repeat; reached: repeats that reached the target;")
        print("  to_target_s: the slowest repeat's time to it (- when one never did); trials, epochs: means per run")
        print(f"json: {out}" if args.json else "")


if __name__ == "__main__":
    main()
