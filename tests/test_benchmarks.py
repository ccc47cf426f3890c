"""The benchmarks run end to end on tiny budgets (real `tuner run`, real SQLite and PostgreSQL
stores) and print tables whose numbers parse and add up."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import optuna
import yaml
from stores import bench_databases  # benchmarks/stores.py (tests/conftest.py puts it on the path)

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, timeout: float = 120) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def table(out: str, header: str) -> dict[str, list[str]]:
    """The rows (first word -> the others) under the line whose first words are `header`, up to
    the first blank or indented line."""
    lines, words = out.splitlines(), header.split()
    start = next(i for i, line in enumerate(lines) if line.split()[: len(words)] == words)
    rows = {}
    for line in lines[start + 1 :]:
        if not line.strip() or line.startswith(" "):
            break
        first, *rest = line.split()
        rows[first] = rest
    return rows


def test_overhead_prints_tuner_and_bare_walls_and_the_training_threads_split() -> None:
    before = bench_databases()
    out = run_script("overhead.py", "--trials", "2", "--epochs", "1", "--hidden", "32", "--rounds", "1",
                     "--slots", "2", timeout=400)
    rows = table(out, "store trials")
    assert set(rows) == {"sqlite", "postgres"}
    for store, (trials, tuner_s, bare_s, overhead, noise) in rows.items():
        tuner_s, bare_s, overhead, noise = float(tuner_s), float(bare_s), float(overhead), float(noise)
        assert int(trials) == 2 and tuner_s > 0 and bare_s > 0 and noise >= 0, store
        assert math.isclose(overhead, 100 * (tuner_s - bare_s) / tuner_s, abs_tol=5.0), store  # medians of 1
    breakdown = table(out, "store extra_ms")
    assert set(breakdown) == {"sqlite", "postgres"}
    for extra, in_trial, between, startup, exit_s in breakdown.values():
        assert math.isclose(float(extra), float(in_trial) + float(between), abs_tol=1.0)
        assert float(startup) > 0 and float(exit_s) >= 0
    # (2): per store and slot count, the training thread's phases add up to (almost) its wall
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("store") and "compute_%" in line)
    header = lines[start].split()
    splits = [dict(zip(header, line.split())) for line in lines[start + 1 : start + 3]]
    assert [(r["store"], r["slots"]) for r in splits] == [("sqlite", "2"), ("postgres", "2")]
    phases = [h for h in header if h.endswith("_%")]
    assert phases == ["compute_%", "bookkeeping_%", "store_wait_%", "checkpoints_%", "evaluation_%", "idle_%"]
    for r in splits:
        total = sum(float(r[p]) for p in phases)
        assert 95.0 <= total <= 100.5, r  # the loop's own few lines are in no phase
        assert float(r["compute_%"]) > 0 and int(r["model_epochs"]) == 2
        assert r["verdict"] == ("pass" if float(r["bookkeeping_%"]) + float(r["store_wait_%"]) < 1 else "FAIL")
        assert float(r["ckpt_B/epoch"]) > 0 and float(r["bound_B/epoch"]) > 0
    assert any(line.startswith("  the other threads' busy time") and "bookkeeper" in line for line in lines)
    # the bare retraining is the very compute of the tuner's trials: same objective values
    reproduced = next(line for line in lines if line.startswith("bare retraining reproduces"))
    assert float(reproduced.split(" to ")[1].split()[0]) < 1e-3
    assert bench_databases() == before  # the PostgreSQL database was dropped


def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path: Path) -> None:
    """The GPU check's own code paths, shrunk to a CPU smoke test (--quick): every part present."""
    import json

    out = tmp_path / "gpu_check.json"
    run_script("gpu_check.py", "--quick", "--minutes", "0.2", "--out", str(out), timeout=400)
    result = json.loads(out.read_text())
    assert result["quick"] and result["device"].startswith("CPU")
    (row,) = result["engine"]["shapes"].values()
    assert row["plain_loop"] > 0 and row["pop2_default"] > 0 and row["pop2_eager_fp32"] > 0
    (eq,) = result["equivalence"]  # fp32 only on a CPU
    assert eq["slot_vs_alone_max_abs_nats"] == 0.0 and eq["resumed_vs_unbroken_max_abs_nats"] == 0.0  # CPU: exact
    assert eq["within_tolerance"] and eq["precision"] == "fp32"
    e2e = result["end_to_end"]
    assert e2e["trials_finished"] >= 1 and e2e["model_epochs_per_s"] > 0, e2e
    assert e2e["device_busy_fraction"] is None  # CUDA events only on a GPU
    assert e2e["checkpoint_bytes_left"] <= e2e["checkpoint_bytes_written"]
    assert e2e["checkpoints_left"] <= 10 + 2  # keep_top + the slots that may still hold a trial
    assert set(e2e["training_thread_s"]) >= {"compute", "bookkeeping"}


def test_search_race_scores_every_arm_on_the_same_split(tmp_path: Path, small_npz: Path) -> None:
    spec = yaml.safe_load((ROOT / "studies" / "mnist.yaml").read_text())
    spec["base"].update(data={"dataset": f"npz:{small_npz}"}, model={"arch": "mlp", "hidden": 32},
                        train={"iwae_k": 5})
    spec["space"] = {k: v for k, v in spec["space"].items() if k not in ("model.hidden", "model.depth")}
    spec["budget"]["epochs"], spec["enqueue"] = 1, []  # (its listed config names the entries left out here)
    path = tmp_path / "race.yaml"
    path.write_text(yaml.safe_dump(spec))
    keep = tmp_path / "keep"
    out = run_script("search_race.py", "--spec", str(path), "--seconds", "25", "--repeats", "1", "--workers", "1", "--target", "1000",
                     "--json", str(tmp_path / "race.json"), "--keep", str(keep), timeout=240)
    rows = table(out, "arm test_nll")
    assert set(rows) == {"tuner", "plain-same", "plain-textbook"}
    runs = json.loads((tmp_path / "race.json").read_text())["runs"]
    assert [r["arm"] for r in runs] == ["tuner", "plain-same", "plain-textbook"]
    for r in runs:
        row = rows[r["arm"]]
        assert r["trials"] >= r["complete"] >= 1 and r["epochs"] >= r["trials"], r  # 1 epoch each
        assert row[0] == f"{r['test_nll']:.2f}±0.00" and 0 < r["test_nll"] < 1000 and r["reached_s"] <= r["wall_s"]
        assert row[2] == "1/1"  # every arm reached the (loose) target
    # --keep kept each run's study for `tuner confirm` / `tuner rank`, and refuses to mix a rerun into them
    for arm in ("tuner", "plain-same", "plain-textbook"):
        trials = optuna.load_study(study_name="race", storage=f"sqlite:///{keep / f'{arm}-0.db'}").get_trials()
        assert len(trials) >= next(r["trials"] for r in runs if r["arm"] == arm)
    again = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "search_race.py"), "--spec", str(path), "--keep", str(keep),
                            "--seeds", "0"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert again.returncode != 0 and "already holds tuner-0.db" in again.stderr and not again.stdout.count("seed 0:")
