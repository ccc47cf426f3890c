"""A study space's entries: their types (float, int, categorical, fixed, each optionally ``when``
another entry takes given values), and the pure checks a spec runs on them (the field exists, the
type fits it, each extreme makes a valid training config, conditions name categorical entries).

What :class:`tuner.study.spec.StudySpec` validates its ``space`` with; :mod:`tuner.study.space`
turns the entries into Optuna suggestions.
"""

from __future__ import annotations

import difflib
import math
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

from tuner.spec import StrictModel, TrainConfig, field_path

__all__ = [
    "CategoricalParam", "FixedParam", "FloatParam", "IntParam", "Scalar", "ScalarOrList", "SpaceEntry",
    "check_extremes", "check_path", "check_when", "coerced_entry", "with_values",
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


def with_values(base: TrainConfig, values: dict[str, Any], epochs: int, seed: int) -> dict[str, Any]:
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


def check_path(path: str, entry: Any) -> None:
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


def check_when(path: str, entry: Any, space: dict[str, Any]) -> None:
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


def check_extremes(path: str, entry: Any, base: TrainConfig, epochs: int) -> None:
    """Each extreme of the entry, alone on the base config, makes a valid TrainConfig."""
    for label, value in _extremes(entry):
        try:
            TrainConfig.model_validate(with_values(base, {path: value}, epochs, 0))
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


def coerced_entry(path: str, entry: Any) -> Any:
    if not isinstance(entry, dict):
        return entry
    if entry.get("type") == "categorical" and isinstance(entry.get("choices"), list):
        return {**entry, "choices": [_coerce(path, c) for c in entry["choices"]]}
    if entry.get("type") == "fixed" and "value" in entry:
        return {**entry, "value": _coerce(path, entry["value"])}
    return entry
