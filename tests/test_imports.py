"""The GPU machine has torch and numpy but no pydantic, yaml, optuna or mlxtend: the engine,
models, metrics and the throughput benchmark must import there. Simulated by blocking imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'pydantic', 'yaml', 'optuna', 'mlxtend', 'pandas', 'typer', 'rich', 'sqlalchemy'}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""


def test_engine_models_metrics_import_with_torch_and_numpy_alone() -> None:
    code = BLOCK + (
        "import tuner.engine, tuner.models, tuner.metrics, tuner.schedules, tuner.optim, tuner.noise\n"
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('throughput', r'{ROOT / 'benchmarks' / 'throughput.py'}')\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "import pydantic\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    # everything imported; only the final, deliberate `import pydantic` failed
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "ImportError: blocked: pydantic", proc.stderr
