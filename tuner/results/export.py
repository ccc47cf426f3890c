"""A study's best trials as configs `tuner train` reruns, its ranking as CSV, and study backups.

Every complete trial stores its fully resolved TrainConfig (seed and data split included), read by
:func:`tuner.store.attrs.trial_config`; exporting writes it back as YAML a person reads (only the
settings that apply, rounded, tuned values marked: :mod:`tuner.results.exported_config`), so
``tuner train trial-<n>.yaml`` retrains that trial alone (DESIGN: exported winners are re-run alone).
A kept checkpoint goes into ``trial-<n>/`` beside the exact config it carries: a run folder that
:func:`tuner.train.load_run` reads. The folder's README.md says both. An export folder is written
in a temporary sibling folder and moved into place: a failure leaves no half-written export behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial

from tuner.errors import TunerError
from tuner.results.confirm import Confirmed, confirmed
from tuner.results.exported_config import DIGITS, exported_yaml, rounded, settings_that_apply
from tuner.results.ranking import rank_study, render_ranking
from tuner.spec import TrainConfig, config_to_yaml, parse_config
from tuner.store.attrs import trial_config
from tuner.store.urls import check_storage, mask_url, open_storage
from tuner.study.open import open_study, study_key

__all__ = ["ExportResult", "backup_study", "export_top"]


@dataclass
class ExportResult:
    out_dir: Path
    configs: list[Path] = field(default_factory=list)  # trial-<n>.yaml, best first
    checkpoints: list[Path] = field(default_factory=list)  # trial-<n>/checkpoint.pt, where kept
    ranking: Path | None = None  # ranking.csv: every complete trial
    readme: Path | None = None  # README.md: how to rerun the configs and load the checkpoints


@dataclass(frozen=True)
class _Exported:
    """One exported trial, as the folder's README lists it."""

    rank: int
    trial: FrozenTrial
    checkpoint: bool


def export_top(
    storage_url: str, study_name: str, out_dir: str | Path, *, top: int = 1, by: str = "auto",
    include_collapsed: bool = False, artifacts: str | Path | None = None,
) -> ExportResult:
    """Write the ``top`` best trials' configs (and checkpoints), the full ranking and a README into ``out_dir``.

    Files: ``trial-<n>.yaml`` (the TrainConfig `tuner train` reruns: same seed, same split; only the
    settings the trial reads, floats rounded, tuned values marked: :mod:`tuner.results.exported_config`),
    ``trial-<n>/`` when the trial's checkpoint is under the artifact root (``checkpoint.pt`` and the
    exact ``config.yaml`` it was trained with: a folder :func:`tuner.train.load_run` reads),
    ``ranking.csv`` and ``README.md``. Existing files of the same names in ``out_dir`` are replaced
    (a ``trial-<n>/`` folder as a whole); other files are left alone.
    """
    if top < 1:
        raise TunerError(f"--top must be at least 1, but got top={top}; give the number of trials to export")
    from tuner.store.artifacts import artifacts_root  # (imports torch: only when there is something to export)

    study, frame = rank_study(storage_url, study_name, by=by, include_collapsed=include_collapsed)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    root = artifacts_root(storage_url, artifacts) / study_key(study)  # checkpoints: keyed by the study's identity
    files: dict[str, str | Path] = {}  # file name -> text, or a file to copy
    summaries = confirmed(study)
    exported = []
    for rank, number in enumerate(frame["trial"].head(top).astype(int), start=1):
        t = trials[number]
        if (raw := trial_config(t)) is None:
            raise TunerError(f"study '{study_name}' trial {number} has no stored config; "
                             "it was not run by tuner's worker and cannot be exported")
        config = parse_config(raw, source=f"study '{study_name}' trial {number} config")
        checkpoint = root / str(number) / "checkpoint.pt"
        kept = checkpoint.is_file()
        if kept:  # a run folder: the checkpoint beside the exact config it carries
            files[f"trial-{number}/checkpoint.pt"] = checkpoint
            files[f"trial-{number}/config.yaml"] = config_to_yaml(_checkpoint_config(checkpoint))
        files[f"trial-{number}.yaml"] = _trial_yaml(study_name, t, config, summaries.get(number), kept)
        exported.append(_Exported(rank, t, kept))
    files["ranking.csv"] = render_ranking(frame, "csv")
    files["README.md"] = _readme(study_name, by, exported)
    out_dir = Path(out_dir)
    with _staged(out_dir) as stage:
        for name, content in files.items():
            (stage / name).parent.mkdir(exist_ok=True)
            if isinstance(content, Path):
                shutil.copyfile(content, stage / name)
            else:
                (stage / name).write_text(content)
    return ExportResult(
        out_dir=out_dir, configs=[out_dir / f"trial-{e.trial.number}.yaml" for e in exported],
        checkpoints=[out_dir / f"trial-{e.trial.number}" / "checkpoint.pt" for e in exported if e.checkpoint],
        ranking=out_dir / "ranking.csv", readme=out_dir / "README.md",
    )


def _checkpoint_config(path: Path) -> TrainConfig:
    """The config a checkpoint was trained with (what load_run checks config.yaml against)."""
    import torch

    return parse_config(torch.load(path, map_location="cpu", weights_only=True)["config"], source=str(path))


def _nats(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "-"


def _trial_yaml(study_name: str, t: FrozenTrial, config: TrainConfig, summary: Confirmed | None, kept: bool) -> str:
    """trial-<n>.yaml: what it is and how to rerun it (comments), then the settings that apply,
    rounded, with ``# tuned`` on each searched value."""
    number, applies = t.number, settings_that_apply(config)
    searched = set(t.params)  # what the sampler chose for this trial (fixed space entries are not params)
    written = {f"{section}.{key}" for section, values in applies.items() if isinstance(values, dict) for key in values}
    exact = f"trial-{number}/config.yaml, ranking.csv" if kept else "ranking.csv"
    header = [
        f"study '{study_name}', trial {number}: val iwae_nll {_nats(t.user_attrs.get('iwae_nll'))}, "
        f"test iwae_nll {_nats(t.user_attrs.get('test_iwae_nll'))} (nats)",
        *([f"confirmed over seeds (test iwae_nll): {summary.text}"] if summary else []),
        f"rerun: tuner train trial-{number}.yaml --out runs/trial-{number}",
        f"floats rounded to {DIGITS} significant digits (exact values: {exact}); only the settings this",
        "trial's model family, optimizer, schedules and objective read are written (the rest load as",
        "defaults, which it does not read either)",
        f"tuned: the {len(searched & written)} values this trial's sampler chose, each marked '# tuned'"
        if searched else "tuned: none (no value of this trial was searched)",
        *([f"searched, but not read by this trial (left out): {', '.join(sorted(searched - written))}"]
          if searched - written else []),
    ]
    return exported_yaml(rounded(applies), searched, header)


def _readme(study_name: str, by: str, exported: list[_Exported]) -> str:
    """README.md of an export folder: what each file is, how to rerun a config, how to load a checkpoint."""
    rows = [f"| {e.rank} | {e.trial.number} | {_nats(e.trial.user_attrs.get('iwae_nll'))} | "
            f"{_nats(e.trial.user_attrs.get('test_iwae_nll'))} | `trial-{e.trial.number}.yaml` | "
            + (f"`trial-{e.trial.number}/` |" if e.checkpoint else "not kept |") for e in exported]
    first = exported[0].trial.number
    kept = next((e.trial.number for e in exported if e.checkpoint), None)
    folder = f"trial-{kept}" if kept is not None else f"runs/trial-{first}"
    return "\n".join([
        f"# Study '{study_name}': its best {len(exported)} trial(s)",
        "",
        f"Written by `tuner export {study_name} --top {len(exported)} --by {by}`; scores are IWAE NLL in nats "
        "per example (validation: what the study ranked by; test: held out).",
        "",
        "| rank | trial | val NLL | test NLL | config | checkpoint |",
        "|---:|---:|---:|---:|---|---|",
        *rows,
        "",
        "- `trial-N.yaml`: the trial's config as `tuner train` reads it (same seed, same data split). Only the",
        "  settings its model family, optimizer, schedules and objective read are written; the others load as",
        f"  their defaults, which it does not read either. Floats are rounded to {DIGITS} significant digits and",
        "  each searched value is marked `# tuned`.",
        "- `trial-N/`: the trial's checkpoint as the study kept it (its `keep_top` best), `checkpoint.pt`, with",
        "  the exact config it was trained with, `config.yaml`.",
        "- `ranking.csv`: every complete trial, every metric and searched value at full precision.",
        "",
        "## Rerun a config",
        "",
        "```bash",
        f"tuner train trial-{first}.yaml --out runs/trial-{first}               # --device cuda:0 for a GPU",
        *([f"tuner train trial-{kept}/config.yaml --out runs/trial-{kept}-exact  # the exact stored values"]
          if kept is not None else []),
        "```",
        "",
        "A run folder holds `config.yaml`, `metrics.json` (test scores), `history.csv`, `checkpoint.pt` and",
        "images. Where rounding changed nothing, a rerun of `trial-N.yaml` reproduces the stored test NLL up",
        "to float summation order; where it moved a tuned float (by at most 0.05%), the rerun is a nearby",
        "run, not the same one. The exact values: `trial-N/config.yaml` where the checkpoint was kept, and",
        "`ranking.csv` (`params.*`).",
        "",
        "## Load a checkpoint",
        "",
        "`tuner.train.load_run(folder)` reads a folder holding `checkpoint.pt` and `config.yaml` (a `trial-N/`",
        "folder here, or a run folder `tuner train` wrote) and returns the config and the model with its",
        "best-validation weights, in eval mode:",
        "",
        "```python",
        "import math",
        "",
        "import torch",
        "from tuner.train import load_run",
        "",
        f'config, model = load_run("{folder}", device="cpu")',
        "pixels = math.prod(model.image_shape)  # (channels, height, width) of the data it was trained on",
        "x = torch.rand(1, 16, pixels).bernoulli()  # (1, batch, pixels): load_run's model is one slot",
        "with torch.no_grad():",
        "    mu, logvar = model.encode(x)  # (1, 16, latent): the posterior's mean and log-variance",
        "    logits = model.decode(mu)  # (1, 16, pixels): Bernoulli logits of the reconstruction",
        "```",
        *([] if kept is not None else ["", "No checkpoint was kept for these trials: rerun a config first."]),
        "",
    ])


@contextlib.contextmanager
def _staged(out_dir: Path) -> Iterator[Path]:
    """A temporary folder beside ``out_dir`` whose files move into ``out_dir`` when the block ends
    without error; on error it, and any parent folder made for it, is removed (TunerError)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise TunerError(f"--out '{out_dir}' is a file, not a folder; choose a folder path")
    nearest = out_dir.absolute()
    while not nearest.exists():
        nearest = nearest.parent
    if not nearest.is_dir() or not os.access(nearest, os.W_OK | os.X_OK):
        raise TunerError(f"--out '{out_dir}' cannot be created: '{nearest}' is not a writable folder; "
                         "choose a folder you can write to")
    made = [p for p in out_dir.absolute().parents if not p.exists()][::-1]  # outermost first
    stage: Path | None = None
    try:
        out_dir.absolute().parent.mkdir(parents=True, exist_ok=True)
        stage = out_dir.absolute().parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        stage.mkdir()  # (not tempfile.mkdtemp: its 0700 mode would stay on the export folder)
        yield stage
        if out_dir.exists():
            for item in stage.iterdir():
                target = out_dir / item.name
                if item.is_dir() and target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)  # a trial-<n>/ folder is replaced as a whole
                os.replace(item, target)
            stage.rmdir()
        else:
            os.rename(stage, out_dir)
    except BaseException as err:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(err, OSError):
            raise TunerError(f"--out '{out_dir}': cannot write the export ({err.strerror or err}); "
                             "choose a writable folder with free space") from None
        raise


def backup_study(study_name: str, from_url: str, to_url: str) -> int:
    """Copy a study (directions, study and trial user/system attrs, params, values, intermediate
    values, states) to another store, SQLite or PostgreSQL, under the same name; the number of trials.

    Refused when the target already holds a study of that name; a copy that fails half-way is deleted.
    """
    source = open_study(from_url, study_name)
    check_storage(to_url)
    target = open_storage(to_url, heartbeat_interval=None, grace_period=None)
    if study_name in optuna.get_all_study_names(target):
        raise TunerError(f"study '{study_name}' already exists in {mask_url(to_url)}; back up to another store "
                         "or delete it there first")
    reader = open_storage(from_url, heartbeat_interval=None, grace_period=None)
    try:
        optuna.copy_study(from_study_name=study_name, from_storage=reader, to_storage=target)
    except BaseException:
        with contextlib.suppress(Exception):
            optuna.delete_study(study_name=study_name, storage=target)
        raise
    return len(source.get_trials(deepcopy=False))
