"""Train many configs at once, as few populations as their shapes allow, and score each on test.

What `tuner confirm` trains its reruns with: configs of one population shape (and one data config)
share a population, every slot runs to its own end (epochs or patience), and each slot is scored on
the test split the way the worker scores a trial (its best-validation weights where it restores
them; IWAE NLL at its ``train.iwae_k``, with its own seed's noise) in the epoch it finishes, so a
caller can store it before the others end.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tuner.spec import TrainConfig
from tuner.vae import metrics
from tuner.vae.data import load_splits
from tuner.vae.device import resolve_device
from tuner.vae.engine import Population
from tuner.vae.population import PopulationShape

__all__ = ["train_reruns"]


def train_reruns(todo: list[tuple[int, int, TrainConfig]], device: str = "auto") -> Iterator[tuple[int, int, int, dict[str, Any]]]:
    """For (trial, replicate, config) items: yields (trial, replicate, seed, scores) as each slot
    finishes; scores: test_iwae_nll, recon, kl, active_units, collapsed, epochs."""
    dev = resolve_device(device)
    groups: dict[tuple[PopulationShape, str], list[tuple[int, int, TrainConfig]]] = {}
    for item in todo:
        groups.setdefault((PopulationShape.of(item[2]), item[2].data.model_dump_json()), []).append(item)
    for items in groups.values():
        configs = [config for _, _, config in items]
        splits = load_splits(configs[0].data, configs[0].optim.batch_size, dev)
        pop = Population.for_configs(configs, splits, dev)
        pending = set(range(len(items)))
        while pending:
            if pop.running():
                pop.run_epoch()
            ended = sorted(s for s in pending if pop.state[s].status != "running")
            if not ended:
                continue
            by_k: dict[int, list[int]] = {}  # one pass per IWAE sample count, as the worker scores
            for s in ended:
                by_k.setdefault(configs[s].train.iwae_k, []).append(s)
            for k, slots in by_k.items():
                test = metrics.evaluate(pop.finished_model(slots), splits.test, k=k,
                                        seed=[configs[s].seed for s in slots])
                for j, s in enumerate(slots):
                    trial, replicate, config = items[s]
                    scores = test.slot(j)
                    yield trial, replicate, config.seed, {
                        "test_iwae_nll": scores["iwae_nll"], "recon": scores["recon"], "kl": scores["kl"],
                        "active_units": scores["active_units"], "collapsed": scores["collapsed"],
                        "epochs": pop.state[s].epoch,
                    }
            pending -= set(ended)
