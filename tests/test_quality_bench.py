"""benchmarks/quality.py --families: one row per family and training objective with its NLL and both gaps
(a 1-epoch smoke run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quality_prints_a_row_per_family_with_nll_and_gaps() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--families", "gaussian", "--objectives", "elbo,iwae",
         "--k", "2", "--epochs", "1",
         "--device", "cpu"], capture_output=True, text=True, timeout=400, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("family "))
    columns = lines[header].split()[1:]
    assert columns[:1] == ["iwae_nll"] and {"amortization_gap", "approximation_gap"} <= set(columns)
    rows = {line.split()[0]: dict(zip(columns, map(float, line.split()[1:]))) for line in lines[header + 1:]}
    assert set(rows) == {"gaussian", "gaussian/iwae2"}
    for family, row in rows.items():
        assert 80 < row["iwae_nll"] < 300 and row["iwae_nll"] <= row["neg_elbo"] + 1.0, family
        assert row["amortization_gap"] > 0, family  # optimizing each posterior beats the encoder's guess
        assert abs(row["approximation_gap"]) < 50, family


def test_an_unknown_family_is_one_line_and_exit_2() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--families", "gaussian,nope"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "unknown ['nope']" in proc.stderr


def test_the_remedies_are_rows_of_families_and_mmd_refuses_the_iwae_objective() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from quality import family_config

    from tuner.spec import load_config

    base = load_config(ROOT / "configs" / "mnist-mlp.yaml")
    aux, mmd = family_config(base, "aux"), family_config(base, "mmd")
    assert aux.kl.aux_weight > 0 and aux.model == base.model and aux.kl.divergence == "kl"
    assert (mmd.kl.divergence, mmd.kl.aux_weight, mmd.model) == ("mmd", 0.0, base.model)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--families", "mmd",
                           "--objectives", "elbo,iwae"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "--families mmd replaces the -ELBO's KL term" in proc.stderr
