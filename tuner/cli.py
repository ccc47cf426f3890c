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


def main() -> None:
    """Console entry point: TunerError -> one line, exit 2."""
    try:
        app()
    except TunerError as err:
        err_console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
