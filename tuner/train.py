"""Train one fully specified config into a run folder: the library behind `tuner train`.

A run folder reloads and reruns with no other input (STYLE rule 8):
``config.yaml`` (resolved config), ``metrics.json`` (test-split scores), ``history.csv`` (per epoch),
``checkpoint.pt`` (the slot checkpoint: weights, best weights, optimizer, clocks; weights_only),
``reconstructions.png`` and ``samples.png``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuner.atomic import save_atomic
from tuner.errors import TunerError
from tuner.spec import TrainConfig, config_to_yaml, load_config, parse_config
from tuner.vae import gaps, metrics
from tuner.vae.data import load_splits
from tuner.vae.device import resolve_device
from tuner.vae.engine import Population
from tuner.vae.images import render_images
from tuner.vae.models import VAE
from tuner.vae.population import EpochResult

__all__ = ["TrainResult", "load_run", "train_config"]


@dataclass
class TrainResult:
    out_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, float]]


def _writable_dir(out_dir: Path) -> Path:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise TunerError(f"--out '{out_dir}' is not a writable folder ({err.strerror}); choose another") from None
    return out_dir


def _sanity_batch(pop: Population, slot: int) -> None:
    """Fail before spending compute: one forward pass on a training batch must be finite."""
    with torch.no_grad():
        x = pop.splits.train[: pop.shape.batch_size].unsqueeze(0).expand(pop.slots, -1, -1)
        ones = torch.ones(pop.slots, device=pop.device)
        out = pop.model(x, pop.keys, ones, ones * 0, ones * 0)
    if not torch.isfinite(out.loss[slot]):
        raise TunerError("the first training batch gives a non-finite loss; check the data and model settings")


def write_images(model: VAE, x: torch.Tensor, out_dir: Path, seed: int, image_shape: tuple[int, int, int]) -> None:
    """Test reconstructions (inputs over outputs) and prior samples, as PNG grids."""
    for name, image in render_images(model, x, image_shape, seed, traversal=False).items():
        image.save(out_dir / name, format="PNG")


def train_config(
    config: TrainConfig, out_dir: str | Path, *, device: str = "auto",
    on_epoch: Callable[[EpochResult], None] | None = None, on_start: Callable[[], None] | None = None,
) -> TrainResult:
    """Train `config` alone (a population of one), evaluate it on the test split, write the run folder.

    on_start runs once every input check has passed (a progress bar starts there, so a bad input
    prints nothing but its one-line error); on_epoch runs after every epoch.
    """
    import pandas as pd  # here, not at the top: a worker imports this module on a host without pandas

    # every check that can fail on user input runs before the first file is written
    dev = resolve_device(device)
    splits = load_splits(config.data, config.optim.batch_size, dev)
    pop = Population.for_configs([config], splits, dev)
    _sanity_batch(pop, 0)
    out_dir = _writable_dir(Path(out_dir))
    (out_dir / "config.yaml").write_text(config_to_yaml(config))
    if on_start is not None:
        on_start()
    start = time.perf_counter()
    while pop.state[0].status == "running":
        for result in pop.run_epoch():
            if on_epoch is not None:
                on_epoch(result)
        save_atomic(pop.slot_checkpoint(0), out_dir / "checkpoint.pt")
    train_s = time.perf_counter() - start
    state = pop.state[0]
    model = pop.slot_model(0, best=config.train.restore_best and state.best_epoch > 0)
    evaluation = metrics.evaluate(model, splits.test, k=config.train.iwae_k, seed=config.seed)
    result = {
        "split": "test",
        **evaluation.slot(0),
        **gaps.trial_gaps(model, splits.test, config),  # {} when train.gap_examples is 0
        "best_epoch": state.best_epoch,
        "best_val_neg_elbo": state.best_val,
        "epochs": state.epoch,
        "status": state.status,
        "reason": state.reason,
        "train_s": round(train_s, 3),
        "wall_s": round(time.perf_counter() - start, 3),
        "device": str(dev),
        "seed": config.seed,
    }
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    pd.DataFrame(state.history).to_csv(out_dir / "history.csv", index=False)
    write_images(model, splits.test, out_dir, config.seed, splits.image_shape)
    return TrainResult(out_dir=out_dir, metrics=result, history=list(state.history))


def load_run(run_dir: str | Path, device: str = "cpu", best: bool = True) -> tuple[TrainConfig, VAE]:
    """Reload a run folder's config and model (its best weights by default) with no other input."""
    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    if parse_config(ckpt["config"]) != config:
        raise TunerError(f"{run_dir}: checkpoint.pt was not trained with config.yaml; restore the matching pair")
    splits = load_splits(config.data, config.optim.batch_size, resolve_device(device))
    pop = Population.for_configs([config], splits, resolve_device(device))
    pop.load_slot_checkpoint(0, ckpt)
    return config, pop.slot_model(0, best=best and config.train.restore_best and pop.state[0].best_epoch > 0)
