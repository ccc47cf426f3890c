"""`tuner train` end to end through the real console script: the run folder, its reload, and bad
input (one line on stderr, exit 2, nothing written)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from tuner.spec import config_to_yaml
from tuner.train import load_run
from tuner.vae import metrics
from tuner.vae.data import load_splits

TUNER = shutil.which("tuner") or str(Path(sys.executable).with_name("tuner"))


def tuner(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TUNER, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, small_npz: Path) -> Path:
    """One real `tuner train` run of a tiny config (2 epochs), shared by the tests below."""
    root = tmp_path_factory.mktemp("train")
    cfg = {
        "seed": 4, "data": {"dataset": f"npz:{small_npz}"},
        "model": {"latent": 8, "hidden": 64, "depth": 1}, "optim": {"batch_size": 64},
        "kl": {"schedule": "linear", "warmup_epochs": 1}, "train": {"epochs": 5, "iwae_k": 50},
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    proc = tuner("train", root / "tiny.yaml", "--out", root / "run", "--epochs", "2", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "test: iwae_nll" in proc.stdout
    return root / "run"


def test_run_folder_holds_everything(trained: Path) -> None:
    names = {p.name for p in trained.iterdir()}
    assert names == {"config.yaml", "metrics.json", "history.csv", "checkpoint.pt", "reconstructions.png", "samples.png"}
    m = json.loads((trained / "metrics.json").read_text())
    for key in ("neg_elbo", "recon", "kl", "iwae_nll", "iwae_k", "active_units", "mutual_info", "kl_per_dim",
                "collapsed", "best_epoch", "epochs", "wall_s"):
        assert key in m
    assert m["epochs"] == 2 and m["iwae_k"] == 50 and len(m["kl_per_dim"]) == 8
    assert m["iwae_nll"] <= m["neg_elbo"] + 0.5  # IWAE is the tighter bound (single-sample ELBO is noisy)
    assert m["neg_elbo"] == pytest.approx(m["recon"] + m["kl"], rel=1e-5)
    # --epochs overrides the config, and the written config says so: it reruns as trained
    assert yaml.safe_load((trained / "config.yaml").read_text())["train"]["epochs"] == 2
    history = pd.read_csv(trained / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    assert history["val_neg_elbo"].iloc[1] < history["val_neg_elbo"].iloc[0]
    assert list(history["kl_weight"]) == pytest.approx([1.0, 1.0])
    recon, samples = Image.open(trained / "reconstructions.png"), Image.open(trained / "samples.png")
    assert recon.mode == "L" and samples.size[0] > 28 * 8


def test_checkpoint_loads_weights_only_and_reruns(trained: Path) -> None:
    ckpt = torch.load(trained / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["status"] == "finished"
    config, model = load_run(trained)
    m = json.loads((trained / "metrics.json").read_text())
    splits = load_splits(config.data, config.optim.batch_size)
    again = metrics.evaluate(model, splits.test, k=config.train.iwae_k, seed=config.seed).slot(0)
    assert again["iwae_nll"] == pytest.approx(m["iwae_nll"], abs=1e-4)
    assert again["active_units"] == m["active_units"]


def test_same_config_same_numbers(trained: Path, tmp_path: Path) -> None:
    proc = tuner("train", trained / "config.yaml", "--out", tmp_path / "again", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    a = json.loads((trained / "metrics.json").read_text())
    b = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert b["iwae_nll"] == pytest.approx(a["iwae_nll"], abs=1e-4)


@pytest.mark.parametrize(
    ("edit", "phrase"),
    [
        ({"data": {"dataset": "cifar"}}, "mnist5k"),
        ({"data": {"dataset": "npz:/no/such/file.npz"}}, "does not exist"),
        ({"model": {"latnet": 4}}, "unknown key 'model.latnet'"),
        ({"optim": {"batch_size": 100000}}, "batch"),
        ({"model": {"arch": "conv"}, "data": {"dataset": "npz:FLAT"}}, "divide by 4"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(edit, phrase, tmp_path: Path, small_npz: Path) -> None:
    import numpy as np

    flat = tmp_path / "flat.npz"
    np.savez(flat, x=np.random.default_rng(0).random((300, 10)).astype(np.float32))
    cfg = {"data": {"dataset": f"npz:{small_npz}"}, "train": {"epochs": 1}}
    for section, values in edit.items():
        values = {k: (f"npz:{flat}" if v == "npz:FLAT" else v) for k, v in values.items()}
        cfg[section] = {**cfg.get(section, {}), **values}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    proc = tuner("train", tmp_path / "bad.yaml", "--out", tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_bad_device_missing_config_and_unwritable_out(tmp_path: Path, tiny) -> None:
    (tmp_path / "c.yaml").write_text(config_to_yaml(tiny()))
    proc = tuner("train", tmp_path / "c.yaml", "--out", tmp_path / "o", "--device", "cuda:7")
    assert proc.returncode == 2 and "CUDA device" in proc.stderr and not (tmp_path / "o").exists()
    proc = tuner("train", tmp_path / "missing.yaml", "--out", tmp_path / "o")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    (tmp_path / "file").write_text("")
    proc = tuner("train", tmp_path / "c.yaml", "--out", tmp_path / "file" / "run")
    assert proc.returncode == 2 and "not a writable folder" in proc.stderr
    proc = tuner("train", tmp_path / "c.yaml", "--out", tmp_path / "o", "--epochs", "0")
    assert proc.returncode == 2
