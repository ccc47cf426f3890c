"""What the engine's tests share: train a population to its end, read a slot's history, and the
resume check every family and remedy must pass (trained straight, or one epoch, saved through a
file, loaded into a wider population beside other runs and trained on: the same numbers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tuner.spec import TrainConfig
from tuner.vae.data import Splits
from tuner.vae.engine import Population


def run(pop: Population) -> None:
    while pop.running():
        pop.run_epoch()


def history(pop: Population, slot: int, key: str = "val_neg_elbo") -> list[float]:
    return [row[key] for row in pop.state[slot].history]


def straight_and_resumed(cfg: TrainConfig, others: list[TrainConfig], splits: Splits,
                         tmp_path: Path) -> tuple[Population, Population, dict[str, Any]]:
    """(straight, resumed, checkpoint): ``cfg`` trained alone to its end; and trained one epoch, its
    slot checkpoint saved to a file and loaded back into the last slot of a population of
    ``others + [cfg]`` (give one wider than cfg, so the slot's padding changes), trained to its end."""
    straight = Population.for_configs([cfg], splits)
    run(straight)
    first = Population.for_configs([cfg], splits)
    first.run_epoch()
    torch.save(first.slot_checkpoint(0), tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = Population.for_configs([*others, cfg], splits)
    resumed.load_slot_checkpoint(len(others), ckpt)
    assert resumed.state[len(others)].epoch == 1
    run(resumed)
    return straight, resumed, ckpt
