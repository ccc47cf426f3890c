"""The `tuner` command: a thin typer layer over the library (a few lines per command).

User mistakes (:class:`TunerError`) print as one line on stderr and exit with code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tuner.errors import TunerError

app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Hyperparameter tuning for variational autoencoders.",
)
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Hyperparameter tuning for variational autoencoders."""


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML training config (see configs/mnist-mlp.yaml).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder to write.")],
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Override train.epochs.")] = None,
) -> None:
    """Train one fully specified config and evaluate it on the test split."""
    from tuner.spec import load_config, parse_config
    from tuner.train import train_config

    cfg = load_config(config)
    if epochs is not None:
        raw = cfg.model_dump(mode="json")
        raw["train"]["epochs"] = epochs
        cfg = parse_config(raw, source=str(config))
    columns = (
        TextColumn("[bold]epoch"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[stats]}"),
    )
    progress = Progress(*columns, console=err_console, transient=False)
    task = progress.add_task("train", total=cfg.train.epochs, stats="")

    def on_epoch(r) -> None:  # noqa: ANN001 - EpochResult
        stats = (
            f"train -ELBO {r.train_neg_elbo:7.2f}  val -ELBO {r.val_neg_elbo:7.2f}  "
            f"KL w {r.kl_weight:.3g}  lr {r.lr:.2e}"
        )
        progress.update(task, completed=r.epoch, stats=stats)

    try:
        result = train_config(cfg, out, device=device, on_epoch=on_epoch, on_start=progress.start)
    finally:
        progress.stop()
    m = result.metrics
    typer.echo(
        f"test: iwae_nll {m['iwae_nll']:.2f}  -elbo {m['neg_elbo']:.2f}  recon {m['recon']:.2f}  "
        f"kl {m['kl']:.2f}  active units {m['active_units']}  MI {m['mutual_info']:.2f}  "
        f"collapsed {m['collapsed']}  best epoch {m['best_epoch']}  ({m['wall_s']:.0f} s) -> {result.out_dir}"
    )


StorageOption = Annotated[
    Optional[str],
    typer.Option("--storage", envvar="TUNER_STORAGE", help="Storage URL (default: the spec's, or sqlite:///storage/tuner.db)."),
]


@app.command()
def run(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="Study spec YAML (see studies/).")],
    workers: Annotated[Optional[int], typer.Option(min=1, help="Local worker processes (default: the spec's).")] = None,
    storage: StorageOption = None,
    devices: Annotated[Optional[str], typer.Option(help="GPUs to use, e.g. 0,1: one worker per GPU.")] = None,
    artifacts: Annotated[Optional[Path], typer.Option(help="Checkpoint/artifact root (default: beside the store).")] = None,
) -> None:
    """Create or resume a study and run local workers until its budget is met."""
    from tuner.launch import launch
    from tuner.ranking import ranking_frame
    from tuner.study_spec import load_study_spec

    spec = load_study_spec(spec_path)
    device_list = [d.strip() for d in devices.split(",") if d.strip()] if devices else None
    result = launch(spec, workers=workers, storage_url=storage, devices=device_list, artifacts=artifacts,
                    console=err_console)
    frame = ranking_frame(result.study)
    if not frame.empty:
        shown = ["rank", "trial", "iwae_nll", "recon", "kl", "active_units", "mutual_info", "collapsed"]
        params = [c for c in frame.columns if c.startswith("params.")]
        top = frame[shown + params].head(10).rename(
            columns={"active_units": "AU", "mutual_info": "MI", **{p: p.split(".")[-1] for p in params}}
        )
        typer.echo(f"top {len(top)} of {len(frame)} complete trials (collapsed last; values in nats, validation split):")
        typer.echo(top.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if result.interrupted:
        typer.echo(f"stopped; run `tuner run {spec_path}` again to continue the study")
    elif any(code != 0 for code in result.exit_codes):
        logs = ", ".join(str(p) for p, c in zip(result.logs, result.exit_codes) if c != 0)
        raise TunerError(f"{sum(c != 0 for c in result.exit_codes)} worker(s) failed; see {logs}")


@app.command()
def worker(
    study: Annotated[str, typer.Option("--study", help="Study name to join.")],
    storage: StorageOption = None,
    slots: Annotated[Optional[int], typer.Option(min=1, help="Trials trained at once (default: 1 on CPU, from memory on GPU).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N (default: the spec's).")] = None,
    artifacts: Annotated[Optional[Path], typer.Option(help="Checkpoint/artifact root (default: beside the store).")] = None,
) -> None:
    """Join a study from any host and train its trials until the budget is met."""
    import os
    import signal

    import torch

    from tuner.storage import DEFAULT_URL
    from tuner.worker import Worker

    if os.environ.get("TUNER_THREADS"):
        torch.set_num_threads(int(os.environ["TUNER_THREADS"]))
    w = Worker(storage or DEFAULT_URL, study, slots=slots, device=device, artifacts=artifacts,
               log=lambda line: typer.echo(line))

    def stop(signum, frame) -> None:  # noqa: ANN001 - signal handler
        typer.echo("stop requested: finishing the epoch, handing running trials back")
        w.request_stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    s = w.run()
    typer.echo(f"worker done: {s.complete} complete, {s.pruned} pruned, {s.handed_back} handed back, "
               f"{s.resumed} resumed, {s.model_epochs} model-epochs")


@app.command()
def status(storage: StorageOption = None) -> None:
    """Studies in a store: trial counts, best value, live workers."""
    from rich.table import Table

    from tuner.storage import DEFAULT_URL, mask_url
    from tuner.study import studies_status

    url = storage or DEFAULT_URL
    table = Table(title=f"studies in {mask_url(url)}")
    for name in ("study", "complete", "pruned", "failed", "running", "waiting", "best", "live workers"):
        table.add_column(name)
    for row in studies_status(url):
        table.add_row(*(str(v) for v in row))
    Console().print(table)


def main() -> None:
    """Console entry point: TunerError -> one line, exit 2."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what happens
    try:
        app()
    except TunerError as err:
        err_console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
