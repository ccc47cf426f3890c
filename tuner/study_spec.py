"""Study specs: a fixed base TrainConfig, a search space over its leaves, and how to search it.

A :class:`StudySpec` is one study: base config, space, sampler, pruner, objective, budget,
workers. Past :func:`load_study_spec` the code works with typed objects. Validators are pure.
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import (
    BaseModel,
    Field,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from tuner.errors import TunerError
from tuner.spec import (
    StrictModel, TrainConfig, field_path, parse_config, read_yaml, to_yaml, validate,
)

__all__ = [
    "BudgetSpec",
    "CategoricalParam",
    "CheckpointSpec",
    "FixedParam",
    "FloatParam",
    "IntParam",
    "PrunerSpec",
    "SamplerSpec",
    "SpaceEntry",
    "StudySpec",
    "WorkersSpec",
    "load_study_spec",
    "parse_study_spec",
    "study_spec_to_yaml",
]


def _scalar(v: Any) -> Any:
    if isinstance(v, bool | int | float | str):
        return v
    raise ValueError(f"{v!r} is not a number, string or true/false; categorical values must be one")


def _scalars(v: Any) -> Any:
    return [_scalar(x) for x in v] if isinstance(v, list) else _scalar(v)


# what Optuna's categorical distribution can hold (None aside), kept as written (1 stays an int)
Scalar = Annotated[bool | int | float | str, PlainValidator(_scalar)]
ScalarOrList = Annotated[bool | int | float | str | list[bool | int | float | str], PlainValidator(_scalars)]
_LEAVES: dict[str, Any] = {
    f"{section}.{leaf}": info.annotation
    for section, sinfo in TrainConfig.model_fields.items()
    if isinstance(sinfo.annotation, type) and issubclass(sinfo.annotation, BaseModel)
    for leaf, info in sinfo.annotation.model_fields.items()
}  # dotted path -> type, e.g. "model.latent" -> int
_NOT_SEARCHED = {
    "seed": "the worker derives each trial's seed; remove it",
    "train.epochs": "budget.epochs sets every trial's epochs; set budget.epochs instead",
}


class _Entry(StrictModel):
    """One search-space entry; ``when`` makes it apply only for some values of categorical entries,
    e.g. ``when: {kl.schedule: [linear, cyclical]}`` (a list means any of them)."""

    when: dict[str, ScalarOrList] | None = None

    def applies(self, params: dict[str, Any]) -> bool:
        """Whether this entry is active given the categorical values chosen so far."""
        return all(params.get(k) in (v if isinstance(v, list) else [v]) for k, v in (self.when or {}).items())

    @model_serializer(mode="wrap")
    def _type_first(self, handler: Any) -> dict[str, Any]:
        data = handler(self)  # type first, when last: reads like the YAML people write
        head, when = {"type": data.pop("type")}, data.pop("when")
        return {**head, **data, **({"when": when} if when is not None else {})}


class _Range(_Entry):
    """A numeric range: ``log`` samples uniformly in log space; ``step`` makes it discrete."""

    low: float
    high: float
    log: bool = False
    step: float | None = None

    @model_validator(mode="after")
    def _range_is_valid(self) -> _Range:
        if self.low > self.high:
            raise ValueError(f"low {self.low} > high {self.high}; swap them")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0, but got low {self.low}; raise low or set log: false")
        if self.step is None:
            return self
        if self.log:
            raise ValueError("log and step are exclusive (Optuna samples either one); remove one of them")
        if self.step <= 0:
            raise ValueError(f"step must be > 0, but got step {self.step}")
        n = math.floor((self.high - self.low) / self.step + 1e-9)
        if not math.isclose(self.low + n * self.step, self.high, rel_tol=1e-9, abs_tol=1e-12):
            raise ValueError(
                f"high - low is not a multiple of step {self.step}; set high to {self.low + n * self.step:g}"
            )
        return self


class FloatParam(_Range):
    type: Literal["float"]


class IntParam(_Range):
    type: Literal["int"]
    low: int
    high: int
    step: int | None = None  # None: every integer


class CategoricalParam(_Entry):
    type: Literal["categorical"]
    choices: list[Scalar]

    @field_validator("choices")
    @classmethod
    def _choices_are_distinct(cls, v: list[Scalar]) -> list[Scalar]:
        if not v:
            raise ValueError("choices is empty; list at least one value")
        for i, c in enumerate(v):
            if c in v[:i]:  # == as Optuna compares them: 1, 1.0 and true are one choice
                raise ValueError(f"choice {c!r} is listed twice; list each choice once")
        return v


class FixedParam(_Entry):
    """A value every (matching) trial gets, without sampling; any value its field accepts."""

    type: Literal["fixed"]
    value: Any


SpaceEntry = Annotated[FloatParam | IntParam | CategoricalParam | FixedParam, Field(discriminator="type")]


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


def _with_values(base: TrainConfig, values: dict[str, Any], epochs: int, seed: int) -> dict[str, Any]:
    """base as a plain mapping with dotted-path values, train.epochs and seed set (not validated)."""
    raw = base.model_dump()
    raw["seed"], raw["train"]["epochs"] = seed, epochs
    for path, value in values.items():
        section, leaf = path.split(".")
        raw[section][leaf] = value
    return raw


def _coerce(path: str, value: Any) -> Any:
    """A categorical choice or fixed value as its TrainConfig field's type, when it converts: YAML
    reads ``1e-4`` (no dot) as a string, which should still be a float choice for optim.lr."""
    if isinstance(value, list | dict) or path not in _LEAVES:
        return value
    try:
        return TypeAdapter(_LEAVES[path]).validate_python(value)
    except ValidationError:
        return value  # left for the extreme-value check to report


def _describe(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(map(str, get_args(annotation)))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(annotation, "a list")


def _check_path(path: str, entry: Any) -> None:
    """The entry names a searchable TrainConfig leaf and its type fits that leaf."""
    if path in _NOT_SEARCHED:
        raise ValueError(f"space.{path}: {path} is not searchable: {_NOT_SEARCHED[path]}")
    if path not in _LEAVES:
        near = difflib.get_close_matches(path, _LEAVES, n=1)
        hint = f"did you mean {near[0]}? " if near else ""
        raise ValueError(
            f"space.{path}: not a TrainConfig field; {hint}use a dotted path such as "
            "model.latent, model.hidden, kl.beta, optim.lr, data.binarize"
        )
    allowed = {"float": {float}, "int": {int, float}}.get(entry.type)
    if allowed is not None and _LEAVES[path] not in allowed:
        fix = "int" if _LEAVES[path] is int else "categorical or fixed"
        described = _describe(_LEAVES[path])
        raise ValueError(f"space.{path}: type {entry.type} does not fit {path} ({described}); use type: {fix}")


def _check_when(path: str, entry: Any, space: dict[str, Any]) -> None:
    """Conditions name unconditioned categorical entries and values among their choices."""
    for key, wanted in (entry.when or {}).items():
        target = space.get(key)
        if not isinstance(target, CategoricalParam):
            what = "is not in the space" if target is None else f"is a {target.type} entry"
            raise ValueError(f"space.{path}.when: {key} {what}; conditions must name categorical entries of the space")
        if target.when is not None:
            raise ValueError(f"space.{path}.when: {key} has a when of its own; conditions are one level deep")
        values = wanted if isinstance(wanted, list) else [wanted]
        if not values:
            raise ValueError(f"space.{path}.when: {key} lists no value; give one or more of {target.choices}")
        for v in values:
            if v not in target.choices:
                raise ValueError(f"space.{path}.when: {v!r} is not among {key}'s choices {target.choices}")


def _extremes(entry: Any) -> list[tuple[str, Any]]:
    match entry:
        case FloatParam() | IntParam():
            return [("low", entry.low), ("high", entry.high)]
        case CategoricalParam():
            return [("choice", c) for c in entry.choices]
        case _:
            return [("value", entry.value)]


_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _check_extremes(path: str, entry: Any, base: TrainConfig, epochs: int) -> None:
    """Each extreme of the entry, alone on the base config, makes a valid TrainConfig."""
    for label, value in _extremes(entry):
        try:
            TrainConfig.model_validate(_with_values(base, {path: value}, epochs, 0))
        except ValidationError as err:
            first = err.errors()[0]
            field, msg = field_path(first["loc"]), first["msg"].removeprefix("Value error, ")
            bound = next(((op, v) for op, v in first.get("ctx", {}).items() if op in _BOUNDS), None)
            if field == path and bound is not None:
                why = f"is outside {path}'s allowed range ({_BOUNDS[bound[0]]} {bound[1]})"
            elif field == path:
                why = f"is not a valid {path}: {msg}"
            else:
                why = f"makes an invalid config: {field + ': ' if field else ''}{msg}"
            raise ValueError(f"space.{path}: {label} {value!r} {why}") from None


class StudySpec(StrictModel):
    """A study: its name and store, the fixed base config, the search space, and how to search.

    space maps dotted TrainConfig leaves (``model.latent``, ``kl.beta``) to entries; each entry is
    checked at its extremes against TrainConfig's rules, so a bad range fails here, not in trial 37.
    objective: ``iwae_nll`` (validation IWAE NLL, nats), ``neg_elbo`` (validation -ELBO, nats) or
    ``multi`` (IWAE NLL and the inactive latent fraction, both minimized; no pruning).
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
            raw["space"] = {path: _coerced_entry(path, e) for path, e in raw["space"].items()}
        return raw

    @model_validator(mode="after")
    def _space_and_strategy_fit(self) -> StudySpec:
        for path, entry in self.space.items():
            _check_path(path, entry)
            _check_extremes(path, entry, self.base, self.budget.epochs)
        for path, entry in self.space.items():
            _check_when(path, entry, self.space)
        if self.objective == "multi" and self.pruner.name != "none":
            raise ValueError(
                f"pruner.name: {self.pruner.name!r} cannot prune objective 'multi' (Optuna's trial.should_prune "
                "is single-objective); set pruner.name: none"
            )
        if self.objective == "multi" and self.sampler.name == "cmaes":
            raise ValueError("sampler.name: cmaes is single-objective and cannot run objective 'multi'; use tpe")
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
        raw = _with_values(self.base, {**values, **params}, self.budget.epochs, seed)
        return parse_config(raw, source=f"study {self.study!r}")


def _coerced_entry(path: str, entry: Any) -> Any:
    if not isinstance(entry, dict):
        return entry
    if entry.get("type") == "categorical" and isinstance(entry.get("choices"), list):
        return {**entry, "choices": [_coerce(path, c) for c in entry["choices"]]}
    if entry.get("type") == "fixed" and "value" in entry:
        return {**entry, "value": _coerce(path, entry["value"])}
    return entry




def parse_study_spec(raw: Any, source: str = "study spec") -> StudySpec:
    """Validate a plain mapping (e.g. parsed YAML) into a :class:`StudySpec`."""
    return validate(StudySpec, raw, source, "study sections")


def load_study_spec(path: str | Path) -> StudySpec:
    """Read and validate a YAML study spec (see studies/)."""
    return parse_study_spec(*read_yaml(path, "study spec"))


def study_spec_to_yaml(spec: StudySpec) -> str:
    """The spec as YAML with every default spelled out, loadable by :func:`load_study_spec`."""
    return to_yaml(spec)
