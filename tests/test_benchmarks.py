"""The benchmarks run end to end on tiny budgets (real `tuner run`, real SQLite and PostgreSQL
stores) and print tables whose numbers parse and add up."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

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


def test_overhead_prints_tuner_and_bare_walls_for_both_stores() -> None:
    before = bench_databases()
    out = run_script("overhead.py", "--trials", "2", "--epochs", "1", "--hidden", "32", "--rounds", "1", timeout=400)
    rows = table(out, "store trials")
    assert set(rows) == {"sqlite", "postgres"}
    own_all = {}
    for store, row in rows.items():
        trials, book, lt, target, verdict, checkpoint, images, own, tuner_s, bare_s, overhead, noise = row
        book, checkpoint, images, own_all[store] = float(book), float(checkpoint), float(images), float(own)
        tuner_s, bare_s, overhead, noise = float(tuner_s), float(bare_s), float(overhead), float(noise)
        assert int(trials) == 2 and tuner_s > 0 and bare_s > 0 and noise >= 0, store
        assert math.isclose(overhead, 100 * (tuner_s - bare_s) / tuner_s, abs_tol=5.0), store  # medians of 1
        assert 0 < book < 100 and checkpoint > 0 and images > 0, store
        assert math.isclose(own_all[store], book + checkpoint + images, abs_tol=0.05), store
        assert (lt, target) == ("<", "2%") and verdict == ("pass" if book < 2 else "FAIL")
    breakdown = table(out, "store extra_ms")
    assert set(breakdown) == {"sqlite", "postgres"}
    for extra, in_trial, between, startup, exit_s in breakdown.values():
        assert math.isclose(float(extra), float(in_trial) + float(between), abs_tol=1.0)
        assert float(startup) > 0 and float(exit_s) >= 0
    # the main thread's phases are exclusive: with "other" they add up to its wall; with the writer
    # thread's CPU, everything but compute is the own work of the main table
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("phase "))
    end = next(i for i, line in enumerate(lines) if line.startswith("= own work"))
    phases = {line.rsplit(None, 5)[0]: line.split()[-5:] for line in lines[start + 1 : end]}
    writer = phases.pop("checkpoint: write (background thread, CPU)")  # sqlite ms, %, postgres ms, %, calls
    assert float(writer[-1]) == 1.0  # one checkpoint per trial and epoch
    total = lines[end].split()
    for i, store in ((1, "sqlite"), (3, "postgres")):
        assert math.isclose(sum(float(row[i]) for row in phases.values()), 100.0, abs_tol=0.5), store
        assert math.isclose(float(total[-4 + i]), own_all[store], abs_tol=0.01), store
    # the bare retraining is the very compute of the tuner's trials: same objective values
    reproduced = next(line for line in lines if line.startswith("bare retraining reproduces"))
    assert float(reproduced.split(" to ")[1].split()[0]) < 1e-3
    assert bench_databases() == before  # the PostgreSQL database was dropped


def test_plain_optuna_prints_both_setups_on_the_same_budget() -> None:
    out = run_script("plain_optuna.py", "--seconds", "12", "--epochs", "1")
    rows = table(out, "setup")
    assert set(rows) == {"plain-optuna", "tuner"}
    for name, (strategy, trials, complete, pruned, epochs, best, late, wall) in rows.items():
        trials, complete, pruned, epochs = int(trials), int(complete), int(pruned), int(epochs)
        assert trials == complete + pruned and epochs >= trials and int(late) >= 0, name
        assert float(wall) >= 12.0, name  # each setup ran at least the wall time T
        assert math.isnan(float(best)) == (complete == 0), name
    assert strategy.startswith("tpe+hyperband")
    assert int(rows["plain-optuna"][1]) >= 1  # plain Optuna finishes 1-epoch trials within 12 s
    assert any(line.startswith("difference") for line in out.splitlines())
