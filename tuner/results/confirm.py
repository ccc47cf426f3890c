"""Confirming a study's winners: retrain the top K configs with S fresh seeds each (`tuner confirm`).

A trial's score is one draw: its own seed (initial weights, minibatch order, noise) may have been
lucky. Confirmation retrains each of the best K complete trials' stored configs with S other seeds,
on the same split (the split is seeded by ``data.split_seed``, not the trial's seed), and scores each
rerun on the test split as the worker scores a trial (IWAE NLL with the trial's ``iwae_k``, recon,
KL, active units, collapse). The configs of one population shape train together as one population,
so on a GPU the K x S runs cost about one trial's time.

Where results live: one study system attr per (trial, replicate), ``tuner:confirm:<trial>:<i>``,
written as each rerun finishes (a system attr: the dashboard shows every study user attr as one
unwrapped line of JSON, and these are for programs; an older tuner wrote them as user attrs
``tuner_confirm:<trial>:<i>``, still read). Optuna does not let a finished trial's attrs change, and
one attr per rerun means no read-modify-write: a rerun with more seeds adds replicates ``i >= n``
(never duplicates), and an interrupted run keeps every rerun that finished (rerunning ``tuner
confirm`` trains only the missing ones). Replicate i's seed is a pure function of the trial's seed and i.

:func:`confirmed` reads them back as per-trial summaries (mean, sd and n of the test IWAE NLL, means
of recon, KL and active units, the collapse rate); the ranking, the report and export use them.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.errors import TunerError
from tuner.spec import TrainConfig, parse_config
from tuner.store.attrs import trial_config
from tuner.store.checkpoints import top_trials

__all__ = [
    "ATTR_PREFIX", "Confirmed", "Rerun", "confirm_study", "confirmed", "replicate_seed", "reruns", "store_rerun",
    "worse_than_next",
]

ATTR_PREFIX = "tuner:confirm:"  # study system attr per rerun: a JSON object (Rerun's fields)
_OLD_PREFIX = "tuner_confirm:"  # the study user attr an older tuner wrote: a JSON string


@dataclass(frozen=True)
class Rerun:
    """One replicate of one trial: what is stored per rerun."""

    trial: int
    replicate: int
    seed: int
    test_iwae_nll: float
    recon: float
    kl: float
    active_units: int
    collapsed: bool
    epochs: int

    @property
    def key(self) -> str:
        return f"{ATTR_PREFIX}{self.trial}:{self.replicate}"


@dataclass(frozen=True)
class Confirmed:
    """A trial's reruns summarized (test split, nats). sd is the sample sd (0 for one rerun)."""

    trial: int
    n: int
    nll_mean: float
    nll_sd: float
    recon: float
    kl: float
    active_units: float
    collapse_rate: float

    @property
    def text(self) -> str:
        return f"{self.nll_mean:.2f} ± {self.nll_sd:.2f} (n={self.n})"


def replicate_seed(trial_seed: int, replicate: int) -> int:
    """Replicate i's seed: a pure function of the trial's seed and i, never the trial's own seed."""
    seed = int(np.random.SeedSequence([trial_seed, replicate + 1, 0x5EED]).generate_state(1)[0]) % (2**31)
    return seed if seed != trial_seed else seed + 1


def store_rerun(study: optuna.Study, rerun: Rerun) -> None:
    """Store one finished rerun on the study (its own attr: nothing else is rewritten)."""
    study._storage.set_study_system_attr(study._study_id, rerun.key, dataclasses.asdict(rerun))


def reruns(study: optuna.Study) -> dict[int, list[Rerun]]:
    """The stored reruns per trial number, by replicate (older studies' user attrs too)."""
    found: dict[tuple[int, int], Rerun] = {}
    stored = [(study.user_attrs, _OLD_PREFIX), (study._storage.get_study_system_attrs(study._study_id), ATTR_PREFIX)]
    for attrs, prefix in stored:  # the system attr wins where both hold a replicate
        for key, raw in attrs.items():
            if key.startswith(prefix):
                rerun = Rerun(**(json.loads(raw) if isinstance(raw, str) else raw))
                found[rerun.trial, rerun.replicate] = rerun
    out: dict[int, list[Rerun]] = {}
    for (trial, _), rerun in sorted(found.items()):
        out.setdefault(trial, []).append(rerun)
    return out


def _summary(trial: int, runs: list[Rerun]) -> Confirmed:
    nll = [r.test_iwae_nll for r in runs]
    return Confirmed(
        trial=trial, n=len(runs), nll_mean=statistics.fmean(nll),
        nll_sd=statistics.stdev(nll) if len(nll) > 1 else 0.0,
        recon=statistics.fmean(r.recon for r in runs), kl=statistics.fmean(r.kl for r in runs),
        active_units=statistics.fmean(r.active_units for r in runs),
        collapse_rate=sum(r.collapsed for r in runs) / len(runs),
    )


def confirmed(study: optuna.Study) -> dict[int, Confirmed]:
    """Per trial number, the summary of its reruns (trials never confirmed are absent)."""
    return {t: _summary(t, runs) for t, runs in reruns(study).items()}


def worse_than_next(ordered: list[Confirmed]) -> dict[int, int]:
    """For trials in ranked order: trial -> the next confirmed trial it is worse than beyond noise
    (its confirmed mean above the next one's by more than the two sds together)."""
    out = {}
    for a, b in zip(ordered, ordered[1:]):
        if a.n > 1 and b.n > 1 and a.nll_mean - b.nll_mean > a.nll_sd + b.nll_sd:
            out[a.trial] = b.trial
    return out


def _config(study: optuna.Study, t: FrozenTrial) -> TrainConfig:
    if (raw := trial_config(t)) is None:
        raise TunerError(f"study '{study.study_name}' trial {t.number} has no stored config; "
                         "it was not run by tuner's worker and cannot be confirmed")
    return parse_config(raw, source=f"study '{study.study_name}' trial {t.number} config")


def confirm_study(
    study: optuna.Study, *, top: int = 3, seeds: int = 3, device: str = "auto",
    log: Callable[[str], None] = print,
) -> dict[int, Confirmed]:
    """Retrain the best ``top`` complete trials with ``seeds`` seeds each (the missing replicates
    only), storing each rerun as it finishes; returns the summaries of those trials."""
    if top < 1 or seeds < 1:
        raise TunerError(f"--top and --seeds must be at least 1, but got top={top}, seeds={seeds}")
    trials = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    numbers = top_trials(trials.values(), top)
    if not numbers:
        raise TunerError(f"study '{study.study_name}' has no complete trial to confirm; run workers first")
    have = reruns(study)
    todo: list[tuple[int, int, TrainConfig]] = []  # (trial, replicate, config with the replicate's seed)
    for number in numbers:
        config = _config(study, trials[number])
        done = {r.replicate for r in have.get(number, [])}
        for i in range(seeds):
            if i not in done:
                todo.append((number, i, config.model_copy(update={"seed": replicate_seed(config.seed, i)})))
    log(f"confirm: trials {', '.join(map(str, numbers))}: {len(todo)} rerun(s) to train "
        f"({len(numbers) * seeds - len(todo)} stored)")
    if todo:
        from tuner.results.retrain import train_reruns  # torch: only when there is something to train

        for trial, replicate, seed, scores in train_reruns(todo, device):
            rerun = Rerun(trial=trial, replicate=replicate, seed=seed, **scores)
            store_rerun(study, rerun)
            log(f"confirm: trial {trial} seed {seed}: test iwae_nll {rerun.test_iwae_nll:.2f}")
    summaries = confirmed(study)
    return {n: summaries[n] for n in numbers if n in summaries}
