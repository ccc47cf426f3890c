"""benchmarks/storage_scale.py end to end in its quick mode (real SQLite and PostgreSQL stores, real
spawned worker processes): it prints its tables, their numbers parse and agree, no storage errors."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

from stores import bench_databases  # benchmarks/stores.py (tests/conftest.py puts it on the path)

ROOT = Path(__file__).resolve().parents[1]


def rows(out: str, header: str) -> list[list[str]]:
    """The rows (split in words) under the line whose first words are ``header``, up to a blank or indented line."""
    lines, words = out.splitlines(), header.split()
    start = next(i for i, line in enumerate(lines) if line.split()[: len(words)] == words)
    found = []
    for line in lines[start + 1:]:
        if not line.strip() or line.startswith(" "):
            break
        found.append(line.split())
    return found


def test_quick_mode_prints_the_scale_and_workers_tables_with_zero_errors() -> None:
    before = bench_databases()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "storage_scale.py"), "--quick"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout

    scale = rows(out, "backend  trials")
    cells = {(r[0], int(r[1]), r[2], r[3]): [float(x) for x in r[4:]] for r in scale}
    assert {k[0] for k in cells} == {"postgres", "sqlite"} and {k[1] for k in cells} == {10, 30}
    assert {k[2] for k in cells} == {"hyperband", "median"} and {k[3] for k in cells} == {"optuna", "tuner", "ratio"}
    for (backend, size, pruner, kind), values in cells.items():
        if kind == "ratio":  # tuner / optuna, column by column, from the printed (rounded) numbers
            ours, base = cells[(backend, size, pruner, "tuner")], cells[(backend, size, pruner, "optuna")]
            for i in (1, 2, 3):  # epoch median, p95, queries
                assert math.isclose(values[i], ours[i] / base[i], rel_tol=0.05, abs_tol=0.02), (backend, size, i)
            continue
        load_s, median, p95, queries, tell, epochs = values
        assert load_s > 0 and 0 < median <= p95 and queries >= 1 and tell > 0 and epochs >= 2, (backend, size, kind)
    for backend in ("postgres", "sqlite"):  # ours runs fewer statements per epoch than plain Optuna
        for pruner in ("hyperband", "median"):
            assert cells[(backend, 30, pruner, "tuner")][3] < cells[(backend, 30, pruner, "optuna")][3]

    verdicts = rows(out, "backend  pruner")
    assert len(verdicts) == 8 and all(r[-1] in ("pass", "FAIL") for r in verdicts)

    workers = {r[1]: r for r in rows(out, "workers storage")}
    assert set(workers) == {"optuna", "tuner", "ratio"}
    for kind in ("optuna", "tuner"):
        n, _, wall, trials, in_store, per_s, epochs_per_s, median, p95, errors = workers[kind]
        assert int(n) == 3 and int(errors) == 0, kind  # no storage error from any worker process
        assert int(trials) >= 1 and int(in_store) == int(trials), kind  # every trial a worker counted is stored
        assert math.isclose(float(per_s), int(trials) / float(wall), rel_tol=0.1, abs_tol=0.06), kind
        assert 0 < float(median) <= float(p95), kind
    assert "error x" not in out
    assert out.splitlines()[-1].startswith("load average") and "verdict:" in out.splitlines()[-1]
    assert bench_databases() == before  # the PostgreSQL databases were dropped
