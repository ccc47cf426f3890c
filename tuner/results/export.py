"""A study's best trials as configs `tuner train` reruns, its ranking as CSV, and study backups.

Every complete trial stores its fully resolved TrainConfig (seed and data split included) as the
user attr ``config``; exporting writes it back as YAML, so ``tuner train trial-<n>.yaml`` retrains
that trial alone (DESIGN: exported winners are re-run alone). An export folder is written in a
temporary sibling folder and moved into place: a failure leaves no half-written export behind.
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

from tuner.errors import TunerError
from tuner.results.confirm import confirmed
from tuner.results.ranking import rank_study, render_ranking
from tuner.spec import config_to_yaml, parse_config
from tuner.store.urls import check_storage, mask_url, open_storage
from tuner.study.open import open_study, study_key

__all__ = ["ExportResult", "backup_study", "export_top"]


@dataclass
class ExportResult:
    out_dir: Path
    configs: list[Path] = field(default_factory=list)  # trial-<n>.yaml, best first
    checkpoints: list[Path] = field(default_factory=list)  # trial-<n>-checkpoint.pt, where kept
    ranking: Path | None = None  # ranking.csv: every complete trial


def export_top(
    storage_url: str, study_name: str, out_dir: str | Path, *, top: int = 1, by: str = "auto",
    include_collapsed: bool = False, artifacts: str | Path | None = None,
) -> ExportResult:
    """Write the ``top`` best trials' configs (and checkpoints) and the full ranking into ``out_dir``.

    Files: ``trial-<n>.yaml`` (a TrainConfig `tuner train` accepts as it is: same seed, same split),
    ``trial-<n>-checkpoint.pt`` when the trial's checkpoint is under the artifact root, ``ranking.csv``.
    Existing files of the same names in ``out_dir`` are replaced; other files are left alone.
    """
    if top < 1:
        raise TunerError(f"--top must be at least 1, but got top={top}; give the number of trials to export")
    from tuner.store.artifacts import artifacts_root  # (imports torch: only when there is something to export)

    study, frame = rank_study(storage_url, study_name, by=by, include_collapsed=include_collapsed)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    root = artifacts_root(storage_url, artifacts) / study_key(study)  # checkpoints: keyed by the study's identity
    files: dict[str, str | Path] = {}  # file name -> text, or a file to copy
    summaries = confirmed(study)
    for number in frame["trial"].head(top):
        t = trials[int(number)]
        if "config" not in t.user_attrs:
            raise TunerError(f"study '{study_name}' trial {number} has no stored config (user attr 'config'); "
                             "it was not run by tuner's worker and cannot be exported")
        config = parse_config(t.user_attrs["config"], source=f"study '{study_name}' trial {number} config")
        header = (f"# study '{study_name}', trial {number}: val iwae_nll {t.user_attrs.get('iwae_nll')}, "
                  f"test iwae_nll {t.user_attrs.get('test_iwae_nll')} (nats)\n"
                  + (f"# confirmed over seeds (test iwae_nll): {summaries[int(number)].text}\n"
                     if int(number) in summaries else "")
                  + f"# rerun: tuner train trial-{number}.yaml "
                  f"--out runs/trial-{number}\n")
        files[f"trial-{number}.yaml"] = header + config_to_yaml(config)
        checkpoint = root / str(number) / "checkpoint.pt"
        if checkpoint.is_file():
            files[f"trial-{number}-checkpoint.pt"] = checkpoint
    files["ranking.csv"] = render_ranking(frame, "csv")
    out_dir = Path(out_dir)
    with _staged(out_dir) as stage:
        for name, content in files.items():
            if isinstance(content, Path):
                shutil.copyfile(content, stage / name)
            else:
                (stage / name).write_text(content)
    written = [out_dir / name for name in files]
    return ExportResult(
        out_dir=out_dir, configs=[p for p in written if p.suffix == ".yaml"],
        checkpoints=[p for p in written if p.suffix == ".pt"], ranking=out_dir / "ranking.csv",
    )


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
                os.replace(item, out_dir / item.name)
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
