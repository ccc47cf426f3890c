"""An exported trial config as a person reads it: only the settings that act on the trial, floats
rounded to 4 significant digits, and each searched value marked ``# tuned``.

A trial's stored config is fully resolved: every field of TrainConfig, whether the trial's model
family, optimizer and schedules read it or not (``optim.momentum`` beside ``adamw``,
``model.flow_steps`` beside a Gaussian posterior), and floats at full precision (a sampled learning
rate of 0.00011968245937). Both hide what was chosen. :func:`settings_that_apply` keeps the fields
the code reads for this config; each rule in ``_APPLIES_WHEN`` names the code that reads the field.
A dropped field loads back as its default, which that code does not read either, so the loaded
config trains exactly as the trial did (up to the rounding): tests/test_exported_config.py trains
both kinds of config and compares them bit for bit.

Rounding changes a float by at most 0.05% of itself (4 significant digits); where that would
leave the config invalid (a beta2 of 0.99996 rounds to 1), that float keeps more digits.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Collection
from typing import Any

import yaml

from tuner.errors import TunerError
from tuner.spec import TrainConfig, parse_config

__all__ = ["DIGITS", "exported_yaml", "rounded", "settings_that_apply"]

DIGITS = 4  # significant digits of an exported float


def _elbo(c: TrainConfig) -> bool:
    return c.train.objective == "elbo"


def _kl_term(c: TrainConfig) -> bool:
    """The -ELBO's KL term is in the loss (kl.divergence 'mmd' replaces it: tuner.vae.remedies.apply)."""
    return _elbo(c) and c.kl.divergence == "kl"


# "section.field" -> when this config's code reads it; a field not listed is read by every config
_APPLIES_WHEN: dict[str, Callable[[TrainConfig], bool]] = {
    # model sizes of one family (tuner.vae.population.PopulationShape.of, tuner.vae.engine slot init)
    "model.channels": lambda c: c.model.arch == "conv",
    "model.flow_steps": lambda c: c.model.posterior == "iaf",
    "model.prior_components": lambda c: c.model.prior in ("mog", "vamp"),
    "model.diffusion_steps": lambda c: c.model.prior == "diffusion",
    "model.diffusion_hidden": lambda c: c.model.prior == "diffusion",
    "model.latent2": lambda c: c.model.hierarchy == "ladder",
    # the optimizer's own constants (tuner.vae.optim: _sgd reads momentum, _adam betas and eps)
    "optim.betas": lambda c: c.optim.name != "sgd",
    "optim.eps": lambda c: c.optim.name != "sgd",
    "optim.momentum": lambda c: c.optim.name == "sgd",
    # the learning-rate decay's own constants (tuner.vae.schedules.learning_rate)
    "optim.min_lr_ratio": lambda c: c.optim.decay == "cosine",
    "optim.step_epochs": lambda c: c.optim.decay == "step",
    "optim.step_gamma": lambda c: c.optim.decay == "step",
    # the KL schedule's constants (schedules.kl_weight, kl_capacity); the iwae objective's loss reads
    # the weight only, never the capacity target nor free bits (tuner.vae.models.VAE.forward)
    "kl.warmup_epochs": lambda c: c.kl.schedule in ("linear", "sigmoid") or (c.kl.schedule == "capacity" and _kl_term(c)),
    "kl.cycles": lambda c: c.kl.schedule == "cyclical",
    "kl.ratio": lambda c: c.kl.schedule == "cyclical",
    "kl.capacity": lambda c: c.kl.schedule == "capacity" and _kl_term(c),
    "kl.free_bits": _kl_term,
    # the collapse remedies (tuner.vae.remedies.apply): a default ('kl', alpha 0) is what the field's
    # absence loads back, so it is written only where it acts
    "kl.divergence": lambda c: c.kl.divergence != "kl",
    "kl.mmd_weight": lambda c: c.kl.divergence == "mmd",
    "kl.aux_weight": lambda c: c.kl.aux_weight > 0,
    "model.mixture": lambda c: c.model.mixture > 1,  # 1, the plain encoder, is what absence loads
    "model.ortho_weight": lambda c: c.model.ortho_weight > 0,
    # draws per example of the iwae loss (PopulationShape.of); the gaps' optimizer (tuner.vae.gaps)
    "train.k": lambda c: c.train.objective == "iwae",
    "train.gap_steps": lambda c: c.train.gap_examples > 0,
    "train.gap_lr": lambda c: c.train.gap_examples > 0,
    # aggressive encoder training (tuner.vae.aggressive): 0, its absence, is off
    "train.aggressive_epochs": lambda c: c.train.aggressive_epochs > 0,
}


def settings_that_apply(config: TrainConfig) -> dict[str, Any]:
    """The config as plain sections (``model_dump(mode="json")``) less the fields its model family,
    optimizer, schedules and objective never read (``_APPLIES_WHEN``). Pure: no I/O."""
    raw = config.model_dump(mode="json")
    for path, applies in _APPLIES_WHEN.items():
        if not applies(config):
            section, field = path.split(".")
            del raw[section][field]
    return raw


def _float_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Keys (and list indices) to every float in nested sections and lists."""
    if isinstance(value, float):
        return [path]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [p for k, v in items for p in _float_paths(v, (*path, k))]


def _valid(raw: dict[str, Any]) -> bool:
    try:
        parse_config(raw)
    except TunerError:
        return False
    return True


def rounded(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` (a valid config's sections) with every float at DIGITS significant digits, or at the
    fewest more that keep the config valid (model.dropout 0.99996 would round to 1.0, which must
    stay below 1: it keeps 5). data.split is kept exact: its fractions decide which examples are
    test examples, and a rounded one could move an example across splits. Each float is rounded in
    turn and kept only where the whole config still validates, so the result always loads."""
    out = copy.deepcopy(raw)
    for path in _float_paths(raw):
        if path[:2] == ("data", "split"):  # which examples are test examples: kept as stored
            continue
        *parents, last = path
        holder = functools.reduce(lambda node, key: node[key], parents, out)
        exact = holder[last]
        for digits in range(DIGITS, 18):  # 17 significant digits hold any float exactly
            holder[last] = float(f"{exact:.{digits}g}")
            if _valid(out):
                break
        else:
            holder[last] = exact
    return out


def exported_yaml(raw: dict[str, Any], tuned: Collection[str], header: list[str]) -> str:
    """``raw`` (sections of plain values) as YAML, one setting a line, ``# tuned`` after each
    setting whose dotted path is in ``tuned``; ``header`` lines first, as comments. Loads back to ``raw``."""
    lines = [f"# {line}" if line else "#" for line in header]

    def line(key: str, value: Any, path: str, indent: str) -> str:
        # flow style and no width limit: one line per setting, so a comment can follow it
        text = yaml.safe_dump({key: value}, default_flow_style=True, width=2**31 - 1, sort_keys=False)
        text = text.strip().removeprefix("{").removesuffix("}")
        return f"{indent}{text}" + ("  # tuned" if path in tuned else "")

    for key, value in raw.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [line(k, v, f"{key}.{k}", "  ") for k, v in value.items()]
        else:
            lines.append(line(key, value, key, ""))
    return "\n".join(lines) + "\n"
