"""The exported config: which settings apply to which family and schedule (the rule table, and
training itself: a config whose non-applying settings differ trains to the same bits), rounding
that always loads, and the `# tuned` marks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import merge

from tuner.results.exported_config import exported_yaml, rounded, settings_that_apply
from tuner.spec import TrainConfig, parse_config
from tuner.train import train_config

REMEDIES = ("kl.divergence", "kl.mmd_weight", "kl.aux_weight", "model.mixture", "model.ortho_weight",
            "train.aggressive_epochs")  # written only where they act
DIFFUSION = ("model.diffusion_steps", "model.diffusion_hidden")  # written only for model.prior diffusion
EVERY_FIELD = {f"{section}.{key}" for section, fields in TrainConfig().model_dump().items()
               if isinstance(fields, dict) for key in fields}


def dropped(config: TrainConfig) -> set[str]:
    kept = settings_that_apply(config)
    return {path for path in EVERY_FIELD if path.split(".")[1] not in kept[path.split(".")[0]]}


@pytest.mark.parametrize(("over", "left_out"), [
    ({}, {  # the defaults: mlp, gaussian posterior, normal prior, flat, adam, constant lr and KL, elbo, gaps on
        "model.channels", "model.flow_steps", "model.prior_components", "model.latent2", "optim.momentum",
        "optim.min_lr_ratio", "optim.step_epochs", "optim.step_gamma", "kl.warmup_epochs", "kl.cycles",
        "kl.ratio", "kl.capacity", "train.k", *REMEDIES, *DIFFUSION}),
    ({"model": {"arch": "conv", "posterior": "iaf", "prior": "vamp"}, "optim": {"name": "sgd", "decay": "cosine"},
      "kl": {"schedule": "cyclical"}, "train": {"objective": "iwae", "gap_examples": 0}}, {
        "model.latent2", "optim.betas", "optim.eps", "optim.step_epochs", "optim.step_gamma", "kl.warmup_epochs",
        "kl.capacity", "kl.free_bits", "train.gap_steps", "train.gap_lr", *REMEDIES, *DIFFUSION}),
    ({"model": {"hierarchy": "ladder"}, "optim": {"name": "adamw", "decay": "step"}, "kl": {"schedule": "capacity"}}, {
        "model.channels", "model.flow_steps", "model.prior_components", "optim.momentum", "optim.min_lr_ratio",
        "kl.cycles", "kl.ratio", "train.k", *REMEDIES, *DIFFUSION}),
    ({"model": {"prior": "mog"}, "kl": {"schedule": "capacity"}, "train": {"objective": "iwae"}}, {  # iwae: no target
        "model.channels", "model.flow_steps", "model.latent2", "optim.momentum", "optim.min_lr_ratio",
        "optim.step_epochs", "optim.step_gamma", "kl.warmup_epochs", "kl.cycles", "kl.ratio", "kl.capacity",
        "kl.free_bits", *REMEDIES, *DIFFUSION}),
    ({"kl": {"schedule": "sigmoid"}}, {
        "model.channels", "model.flow_steps", "model.prior_components", "model.latent2", "optim.momentum",
        "optim.min_lr_ratio", "optim.step_epochs", "optim.step_gamma", "kl.cycles", "kl.ratio", "kl.capacity",
        "train.k", *REMEDIES, *DIFFUSION}),
    # the MMD replaces the KL term: its shaping (free bits, capacity target and its warmup) is not read
    ({"kl": {"divergence": "mmd", "schedule": "capacity", "aux_weight": 2.0}}, {
        "model.channels", "model.flow_steps", "model.prior_components", "model.latent2", "optim.momentum",
        "optim.min_lr_ratio", "optim.step_epochs", "optim.step_gamma", "kl.warmup_epochs", "kl.cycles",
        "kl.ratio", "kl.capacity", "kl.free_bits", "train.k", "model.mixture", "model.ortho_weight",
        "train.aggressive_epochs", *DIFFUSION}),
    ({"model": {"mixture": 3}}, {  # a mixture posterior: its component count is written
        "model.channels", "model.flow_steps", "model.prior_components", "model.latent2", "optim.momentum",
        "optim.min_lr_ratio", "optim.step_epochs", "optim.step_gamma", "kl.warmup_epochs", "kl.cycles",
        "kl.ratio", "kl.capacity", "train.k", "kl.divergence", "kl.mmd_weight", "kl.aux_weight", "model.ortho_weight",
        "train.aggressive_epochs", *DIFFUSION}),
    # a diffusion prior: its steps and width, never the mixtures' component count
    ({"model": {"prior": "diffusion"}}, {
        "model.channels", "model.flow_steps", "model.prior_components", "model.latent2", "optim.momentum",
        "optim.min_lr_ratio", "optim.step_epochs", "optim.step_gamma", "kl.warmup_epochs", "kl.cycles",
        "kl.ratio", "kl.capacity", "train.k", *REMEDIES}),
])
def test_the_settings_left_out_per_family_and_schedule(over: dict, left_out: set[str]) -> None:
    config = parse_config(over)
    assert dropped(config) == left_out
    raw = settings_that_apply(config)
    # it loads: what is left out as its default, what is kept as it was
    back = parse_config(raw)
    assert settings_that_apply(back) == raw
    assert dropped(back) == left_out


def _changed_where_not_read(config: dict, changes: dict) -> tuple[TrainConfig, TrainConfig]:
    base, variant = parse_config(config), parse_config(merge(config, changes))
    assert base != variant and settings_that_apply(base) == settings_that_apply(variant)
    return base, variant


@pytest.mark.parametrize(("config", "changes"), [
    (  # adam, Gaussian posterior, normal prior, flat, constant lr and KL weight, -ELBO, no gaps
        {"optim": {"name": "adam"}, "kl": {"schedule": "constant", "beta": 0.8}, "train": {"gap_examples": 0}},
        {"model": {"channels": 7, "flow_steps": 5, "prior_components": 3, "latent2": 9},
         "optim": {"momentum": 0.3, "min_lr_ratio": 0.5, "step_epochs": 0.5, "step_gamma": 0.1},
         "kl": {"warmup_epochs": 3.0, "cycles": 2, "ratio": 0.3, "capacity": 9.0},
         "train": {"k": 7, "gap_steps": 3, "gap_lr": 0.5}},
    ),
    (  # sgd, IAF posterior, mixture prior, cosine decay, capacity schedule under the IWAE objective
        {"model": {"posterior": "iaf", "prior": "mog", "prior_components": 3},
         "optim": {"name": "sgd", "lr": 0.003, "decay": "cosine", "min_lr_ratio": 0.1},
         "kl": {"schedule": "capacity", "capacity": 5.0}, "train": {"objective": "iwae", "k": 2, "gap_examples": 0}},
        {"model": {"latent2": 9}, "optim": {"betas": [0.5, 0.6], "eps": 0.1, "step_epochs": 0.5, "step_gamma": 0.1},
         "kl": {"warmup_epochs": 0.5, "capacity": 50.0, "free_bits": 2.0, "cycles": 2, "ratio": 0.3}},
    ),
    (  # the MMD in place of the KL term, with an auxiliary decoder
        {"kl": {"divergence": "mmd", "mmd_weight": 50.0, "schedule": "capacity", "aux_weight": 1.5},
         "train": {"gap_examples": 0}},
        {"kl": {"warmup_epochs": 0.5, "capacity": 50.0, "free_bits": 2.0, "cycles": 2, "ratio": 0.3}},
    ),
])
def test_settings_left_out_change_nothing_in_training(tiny, tmp_path: Path, config: dict, changes: dict) -> None:
    """The rules checked against the code: two configs that differ only in settings left out train
    (2 epochs, real data) to the same history and the same test scores, bit for bit."""
    small = merge({"model": {"latent": 4, "hidden": 32}, "train": {"epochs": 2, "iwae_k": 5}}, config)
    base, variant = _changed_where_not_read(tiny(**small).model_dump(mode="json"), changes)
    scores = []
    for name, c in (("base", base), ("variant", variant)):
        result = train_config(c, tmp_path / name, device="cpu")
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        scores.append(({k: v for k, v in metrics.items() if k not in ("train_s", "wall_s")}, result.history))
    assert scores[0] == scores[1]
    assert scores[0][0]["epochs"] == 2 and 0 < scores[0][0]["iwae_nll"] < 600  # trained, finite


def test_rounding_keeps_4_digits_where_the_config_allows_it() -> None:
    config = parse_config({
        "data": {"split": [0.333333333, 0.333333333, 0.333333334]},
        "model": {"dropout": 0.999996},  # 4 or 5 digits round it to 1.0, which dropout must stay below
        "optim": {"name": "adamw", "lr": 0.00011968245937, "betas": [0.9, 0.99996], "weight_decay": 3.7e-6,
                  "batch_size": 100, "warmup_epochs": 2.123456},
        "kl": {"beta": 1234.5678 / 2000},
    })
    raw = rounded(settings_that_apply(config))
    assert raw["optim"]["lr"] == 0.0001197 and raw["optim"]["weight_decay"] == 3.7e-6
    assert raw["optim"]["warmup_epochs"] == 2.123 and raw["kl"]["beta"] == 0.6173
    assert raw["optim"]["betas"] == [0.9, 0.99996]  # 1.0 would be refused: 5 digits
    assert raw["model"]["dropout"] == 0.999996  # 6 digits
    assert raw["data"]["split"] == [0.333333333, 0.333333333, 0.333333334]  # which examples are test: exact
    assert raw["optim"]["batch_size"] == 100 and raw["seed"] == 0  # ints as they are
    parse_config(raw)  # it loads


def test_exported_yaml_marks_tuned_lines_and_loads_back() -> None:
    config = parse_config({"model": {"latent": 16, "posterior": "iaf", "flow_steps": 3},
                           "data": {"dataset": "npz:/data/a b: c.npz"}, "optim": {"lr": 0.00031622776}})
    raw = rounded(settings_that_apply(config))
    tuned = {"model.latent", "model.flow_steps", "optim.lr", "optim.momentum"}  # momentum: not written (adam)
    text = exported_yaml(raw, tuned, ["study 's', trial 3", "", "rerun: tuner train trial-3.yaml"])
    lines = text.splitlines()
    assert lines[:3] == ["# study 's', trial 3", "#", "# rerun: tuner train trial-3.yaml"]
    assert yaml.safe_load(text) == raw
    marked = {line.split(":")[0].strip() for line in lines if line.endswith("  # tuned")}
    assert marked == {"latent", "flow_steps", "lr"}
    assert "  lr: 0.0003162  # tuned" in lines and "  dataset: 'npz:/data/a b: c.npz'" in lines
    assert not any("momentum" in line for line in lines)
