"""Study specs: a fixed base TrainConfig, a search space over its leaves, and how to search it.

A :class:`StudySpec` is one study: base config, space (its entries: :mod:`tuner.study.entries`),
sampler, pruner, objective, budget, workers, checkpoints. Past :func:`load_study_spec` the code
works with typed objects. Validators are pure.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

from tuner.errors import TunerError
from tuner.spec import StrictModel, TrainConfig, parse_config, read_yaml, to_yaml, validate
from tuner.study.entries import (
    FixedParam,
    FloatParam,
    SpaceEntry,
    check_extremes,
    check_path,
    check_when,
    coerced_entry,
    with_values,
)

__all__ = [
    "BudgetSpec",
    "CheckpointSpec",
    "PrunerSpec",
    "SamplerSpec",
    "StudySpec",
    "WorkersSpec",
    "load_study_spec",
    "parse_study_spec",
    "study_spec_to_yaml",
]


def _check_applicable(raw: Any, name: str, uses: set[str], keys: dict[str, set[str]], section: str) -> None:
    """Reject a key that the chosen sampler/pruner does not read (it would be silently ignored)."""
    for key in raw:
        if key in keys and not keys[key] & uses:
            owners = " or ".join(sorted(keys[key]))
            raise ValueError(f"'{key}' applies to {owners} only, not {name!r}; remove it or change {section}.name")


_SAMPLERS = {"tpe", "random", "grid", "cmaes", "qmc"}
_SAMPLER_KEYS = {  # key -> the samplers that read it
    "n_startup_trials": {"tpe", "cmaes"},
    "multivariate": {"tpe"},
    "constant_liar": {"tpe"},
    "qmc_type": {"qmc"},
    "scramble": {"qmc"},
}


class SamplerSpec(StrictModel):
    """How trials are proposed. seed: the study's; each worker adds its index (see strategy.build_sampler).

    tpe: n_startup_trials random trials first; multivariate models parameters jointly;
    constant_liar treats running trials as bad so that parallel workers spread out.
    cmaes: n_startup_trials (default 1) random trials first; single-objective, numeric entries.
    qmc: qmc_type sobol | halton, scramble. grid: every combination of the finite space, shuffled.
    """

    name: Literal["tpe", "random", "grid", "cmaes", "qmc"] = "tpe"
    seed: int = Field(0, ge=0)
    n_startup_trials: int = Field(10, ge=0)
    multivariate: bool = True
    constant_liar: bool = True
    qmc_type: Literal["sobol", "halton"] = "sobol"
    scramble: bool = True

    @model_validator(mode="before")
    @classmethod
    def _keys_fit_name(cls, raw: Any) -> Any:
        name = raw.get("name", "tpe") if isinstance(raw, dict) else None
        if name not in _SAMPLERS:
            return raw  # not a mapping, or a bad name: the field checks report it
        _check_applicable(raw, name, {name}, _SAMPLER_KEYS, "sampler")
        if name == "cmaes" and "n_startup_trials" not in raw:
            return {**raw, "n_startup_trials": 1}
        return raw

    @model_serializer(mode="wrap")
    def _applicable_keys(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if self.name in _SAMPLER_KEYS.get(k, {self.name})}


_PRUNER_KEYS = {  # key -> the pruners that read it
    "percentile": {"percentile"},
    "n_startup_trials": {"median", "percentile"},
    "n_warmup_steps": {"median", "percentile"},
    "interval_steps": {"median", "percentile"},
    "min_resource": {"successive_halving", "hyperband"},
    "reduction_factor": {"successive_halving", "hyperband"},
    "min_early_stopping_rate": {"successive_halving"},
    "max_resource": {"hyperband"},
    "patience": {"patient"},
    "min_delta": {"patient"},
    "wrapped": {"patient"},
}
_PRUNERS = {"median", "percentile", "successive_halving", "hyperband", "patient", "none"}


class PrunerSpec(StrictModel):
    """When to stop a trial early, from its per-epoch validation -ELBO (steps are epochs).

    median/percentile: prune below the percentile of finished trials at the same epoch, after
    n_startup_trials trials and n_warmup_steps epochs. successive_halving/hyperband: keep the best
    1/reduction_factor at epochs min_resource * reduction_factor^k (running trials count too, which
    suits populations); hyperband's max_resource ``auto`` is budget.epochs. patient: prune after
    ``patience`` epochs without a min_delta improvement, when the ``wrapped`` pruner agrees
    (wrapped ``none``: on patience alone); the wrapped pruner takes its keys from this section.
    """

    name: Literal["median", "percentile", "successive_halving", "hyperband", "patient", "none"] = "hyperband"
    percentile: float = Field(25.0, ge=0.0, le=100.0)
    n_startup_trials: int = Field(5, ge=0)
    n_warmup_steps: int = Field(1, ge=0)
    interval_steps: int = Field(1, ge=1)
    min_resource: int = Field(1, ge=1)
    reduction_factor: int = Field(3, ge=2)
    min_early_stopping_rate: int = Field(0, ge=0)
    max_resource: Literal["auto"] | int = "auto"
    patience: int = Field(2, ge=0)
    min_delta: float = Field(0.0, ge=0.0)
    wrapped: Literal["median", "percentile", "successive_halving", "hyperband", "none"] = "median"

    @field_validator("max_resource", mode="plain")
    @classmethod
    def _auto_or_epochs(cls, v: Any) -> Literal["auto"] | int:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError("use auto (= budget.epochs) or a whole number of epochs >= 1")

    def uses(self) -> set[str]:
        """The pruner names whose keys apply: the pruner's, and for patient its wrapped pruner's."""
        return {self.name, self.wrapped} if self.name == "patient" else {self.name}

    @model_validator(mode="before")
    @classmethod
    def _keys_fit_name(cls, raw: Any) -> Any:
        name = raw.get("name", "hyperband") if isinstance(raw, dict) else None
        if name in _PRUNERS:
            uses = {name, raw.get("wrapped", "median")} if name == "patient" else {name}
            _check_applicable(raw, name, uses, _PRUNER_KEYS, "pruner")
        return raw

    @model_validator(mode="after")
    def _resources_in_order(self) -> PrunerSpec:
        if isinstance(self.max_resource, int) and self.max_resource < self.min_resource:
            raise ValueError(
                f"max_resource {self.max_resource} < min_resource {self.min_resource}; raise max_resource or use auto"
            )
        return self

    @model_serializer(mode="wrap")
    def _applicable_keys(self, handler: Any) -> dict[str, Any]:
        uses = self.uses()
        return {k: v for k, v in handler(self).items() if _PRUNER_KEYS.get(k, uses) & uses}


class BudgetSpec(StrictModel):
    """trials: finished (complete or pruned) trials to reach; timeout: seconds per worker, or null;
    epochs: the most epochs one trial trains (it becomes every trial's train.epochs)."""

    trials: int = Field(20, ge=1)
    timeout: float | None = Field(None, gt=0)
    epochs: int = Field(10, ge=1, le=100000)


class WorkersSpec(StrictModel):
    """count: worker processes on this host; slots: trials trained at once per worker (null: 1 on
    CPU, from free memory on a GPU, at most max_slots); device: auto | cpu | cuda | cuda:N.
    heartbeat_interval: seconds between a running trial's heartbeats; grace_period: seconds
    without one after which the trial counts as stale (its worker died) and is retried.
    precision: the training step's arithmetic, recorded on every trial: ``auto`` (tf32 on a GPU,
    fp32 on the CPU), ``fp32``, ``tf32`` (TF32 matmuls on a GPU) or ``bf16`` (bfloat16 autocast of
    the forward pass; validation and final metrics stay fp32). cuda_graph: on a GPU, replay each
    population's epoch as a captured CUDA graph (falls back to plain launches if capture fails)."""

    count: int = Field(1, ge=1)
    slots: int | None = Field(None, ge=1)
    max_slots: int = Field(64, ge=1)
    device: str = "auto"
    heartbeat_interval: int = Field(10, ge=1)
    grace_period: int = Field(30, ge=1)
    precision: Literal["auto", "fp32", "tf32", "bf16"] = "auto"
    cuda_graph: bool = True

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        if v in {"auto", "cpu", "cuda"} or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("not a device; use auto, cpu, cuda or cuda:N")

    @model_validator(mode="after")
    def _slots_within_max(self) -> WorkersSpec:
        if self.slots is not None and self.slots > self.max_slots:
            raise ValueError(f"slots {self.slots} > max_slots {self.max_slots}; lower slots or raise max_slots")
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(
                f"grace_period {self.grace_period} <= heartbeat_interval {self.heartbeat_interval}: live trials "
                "would be failed as stale; make grace_period a few heartbeats long"
            )
        return self


class CheckpointSpec(StrictModel):
    """When a running trial's slot is saved, and which saved slots outlive their trial.

    A running trial is checkpointed every ``every_epochs`` epochs or ``every_seconds`` seconds,
    whichever comes first (counted from its last checkpoint), and, with ``at_rungs``, at the
    pruner's rung epochs (successive halving, Hyperband): a worker killed outright loses at most
    that much of each trial's training. A trial handed back (Ctrl-C, out of memory) is saved first.
    When a trial ends, its checkpoint is deleted unless it is among the study's ``keep_top``
    complete trials by the objective (collapsed trials last), which `tuner export` copies.
    """

    every_epochs: int = Field(5, ge=1)
    every_seconds: float = Field(300.0, gt=0)
    at_rungs: bool = True
    keep_top: int = Field(10, ge=0)


class StudySpec(StrictModel):
    """A study: its name and store, the fixed base config, the search space, and how to search.

    space maps dotted TrainConfig leaves (``model.latent``, ``kl.beta``) to entries; each entry is
    checked at its extremes against TrainConfig's rules, so a bad range fails here, not in trial 37.
    objective: ``iwae_nll`` (validation IWAE NLL, nats), ``neg_elbo`` (validation -ELBO, nats) or
    ``multi`` (IWAE NLL and the inactive latent fraction, both minimized; no pruning).
    enqueue_base: a new study's first trial is the base config where its values lie in the space
    (what is known to work: the documented defaults, unless the base says otherwise); enqueue: more
    configs (space paths -> values) to try next, each value within its entry (:mod:`tuner.study.start`).
    """

    study: str
    storage: str = "sqlite:///storage/tuner.db"
    base: TrainConfig = TrainConfig()
    space: dict[str, SpaceEntry] = Field(default_factory=dict)
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    objective: Literal["iwae_nll", "neg_elbo", "multi"] = "iwae_nll"
    budget: BudgetSpec = BudgetSpec()
    workers: WorkersSpec = WorkersSpec()
    checkpoints: CheckpointSpec = CheckpointSpec()
    enqueue_base: bool = True
    enqueue: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("study")
    @classmethod
    def _study_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", v):
            raise ValueError("use 1-64 letters, digits, '.', '_' or '-', e.g. mnist-quick")
        return v

    @field_validator("storage")
    @classmethod
    def _storage_scheme(cls, v: str) -> str:
        scheme = v.partition("://")[0]
        if scheme != "sqlite" and not re.fullmatch(r"postgresql(\+\w+)?", scheme):
            raise ValueError(
                f"scheme {scheme!r} is not supported; "
                "use sqlite:///path/to.db or postgresql+psycopg://user:pass@host/db"
            )
        return v

    @model_validator(mode="before")
    @classmethod
    def _fill_dependent_defaults(cls, raw: Any) -> Any:
        """multi has no pruner by default; categorical/fixed values take their field's type."""
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        if raw.get("objective") == "multi" and "pruner" not in raw:
            raw["pruner"] = {"name": "none"}
        if isinstance(raw.get("space"), dict):
            raw["space"] = {path: coerced_entry(path, e) for path, e in raw["space"].items()}
        return raw

    @model_validator(mode="after")
    def _space_and_strategy_fit(self) -> StudySpec:
        for path, entry in self.space.items():
            check_path(path, entry)
            check_extremes(path, entry, self.base, self.budget.epochs)
        for path, entry in self.space.items():
            check_when(path, entry, self.space)
        if self.objective == "multi" and self.pruner.name != "none":
            raise ValueError(
                f"pruner.name: {self.pruner.name!r} cannot prune objective 'multi' (Optuna's trial.should_prune "
                "is single-objective); set pruner.name: none"
            )
        if self.objective == "multi" and self.sampler.name == "cmaes":
            raise ValueError("sampler.name: cmaes is single-objective and cannot run objective 'multi'; use tpe")
        for i, values in enumerate(self.enqueue):
            unknown = sorted(set(values) - set(self.space))
            if unknown:
                raise ValueError(f"enqueue[{i}]: {unknown[0]} is not in the space; list space entries only")
        if self.sampler.name == "grid":
            for path, entry in self.space.items():
                if isinstance(entry, FloatParam) and entry.step is None:
                    raise ValueError(
                        f"sampler.name: grid needs a finite space, but space.{path} is a continuous float; "
                        "give it a step, make it categorical, or use another sampler"
                    )
        return self

    def train_config(self, params: dict[str, Any], seed: int) -> TrainConfig:
        """The TrainConfig of one trial: base + params (dotted path -> value, e.g. from space.sample)
        + the active fixed entries + budget.epochs as train.epochs + seed."""
        unknown = sorted(set(params) - set(self.space))
        if unknown:
            raise TunerError(f"study {self.study!r}: params {unknown} are not in its space; sample them from this spec")
        values = {p: e.value for p, e in self.space.items() if isinstance(e, FixedParam) and e.applies(params)}
        raw = with_values(self.base, {**values, **params}, self.budget.epochs, seed)
        return parse_config(raw, source=f"study {self.study!r}")


def parse_study_spec(raw: Any, source: str = "study spec") -> StudySpec:
    """Validate a plain mapping (e.g. parsed YAML) into a :class:`StudySpec`."""
    return validate(StudySpec, raw, source, "study sections")


def load_study_spec(path: str | Path) -> StudySpec:
    """Read and validate a YAML study spec (see studies/)."""
    return parse_study_spec(*read_yaml(path, "study spec"))


def study_spec_to_yaml(spec: StudySpec) -> str:
    """The spec as YAML with every default spelled out, loadable by :func:`load_study_spec`."""
    return to_yaml(spec)
