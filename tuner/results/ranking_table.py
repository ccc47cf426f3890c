"""`tuner rank`'s terminal tables: columns chosen by name, numbers never cut, and the searched
parameters of the best trials in a table of their own.

Why this module lays tables out itself: rich fits a table wider than the terminal by shrinking every
column, numbers included, so a 14-parameter study read "103.…" at 200 columns and "…" in every cell
at 120. Here each number column is exactly as wide as its widest cell and never wraps; columns that
do not fit the width move to a further table printed below (the key columns, rank and trial,
repeated), so a number is shown whole or in the next table, never cut. Only text (a state, a prune
reason, a note) wraps. The tuned parameters are rows of a second table, one column per top trial:
a dotted name like ``optim.weight_decay`` reads in full there, and fourteen of them fit 80 columns.

Machine formats (csv, json, parquet, markdown: :func:`tuner.results.ranking.render_ranking`) keep
every column; this module is only what a person reads in a terminal.

An NLL whose log p(z) is only bounded (the diffusion prior: ``attrs["bounded_prior_trials"]`` of the
frame) is marked ``‡``, in its cell and its column's header, and the caption says what that means.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from rich import box
from rich.cells import cell_len
from rich.table import Table

from tuner.errors import TunerError
from tuner.results.ranking import PRIOR_BOUND_MARK, prior_bound_note

__all__ = ["DEFAULT_COLUMNS", "TABLE_COLUMNS", "choose_columns", "parameter_table", "ranking_tables"]

_GAP = 2  # cells between two columns (a SIMPLE_HEAD box with collapsed padding and no edges)
_NLL_COLUMNS = ("iwae_nll", "test_iwae_nll", "confirmed")  # the IWAE NLLs, which a bounded log p(z) loosens


def _missing(value: object) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))


def _fixed(value: object, digits: int = 2) -> str:
    """A number in nats (or any measured float): a fixed number of decimals, so a column's cells align."""
    return "-" if _missing(value) else f"{float(value):.{digits}f}"


def _whole(value: object) -> str:
    """A count (rank, trial, epochs): pandas stores it as a float in a column with a gap."""
    return "-" if _missing(value) else str(int(value))


def _param(value: object) -> str:
    """A searched value: 4 significant digits (1e-05, 0.0003162, 128, 1), text and flags as they are."""
    if _missing(value):
        return "-"  # a conditional parameter that does not apply to this trial
    if isinstance(value, (float, np.floating)) and not isinstance(value, bool):
        return f"{float(value):.4g}"
    return str(value)


def _text(value: object) -> str:
    return "" if _missing(value) else str(value)


def _flag(value: object) -> bool:
    return not _missing(value) and bool(value)


def _active_units(r: pd.Series) -> str:
    return "-" if _missing(r["active_units"]) else f"{int(r['active_units'])}/{_whole(r['latent_size'])}"


def _flags(r: pd.Series) -> str:
    return " ".join(name for name in ("collapsed", "pareto") if _flag(r[name]))


def _confirmed(r: pd.Series) -> str:
    """`tuner confirm`'s test IWAE NLL over seeds: mean±sd n=seeds (no spaces: it fits 80 columns)."""
    if _missing(r["confirmed_n"]):
        return "-"
    return f"{r['confirmed_nll']:.2f}±{_fixed(r['confirmed_sd'])} n={int(r['confirmed_n'])}"


@dataclass(frozen=True)
class TableColumn:
    """One column a person may ask for by name: its header, its cell text, and for text, which may
    wrap (numbers never do), the width it is packed at (it takes more where the table has room)."""

    header: str
    cell: Callable[[pd.Series], str]
    wraps: bool = False
    least: int = 0


def _of(name: str, fmt: Callable[[object], str] = _fixed) -> Callable[[pd.Series], str]:
    return lambda r: fmt(r[name])


# --columns NAME -> column; the names are ranking_frame's (and the csv's), plus `flags` and `confirmed`,
# which gather several of its columns into one cell; metrics are nats per example, validation split
TABLE_COLUMNS: dict[str, TableColumn] = {
    "rank": TableColumn("rank", _of("rank", _whole)),
    "trial": TableColumn("trial", _of("trial", _whole)),
    "state": TableColumn("state", _of("state", _text), wraps=True, least=8),
    "value": TableColumn("objective", _of("value")),
    "iwae_nll": TableColumn("val NLL", _of("iwae_nll")),
    "recon": TableColumn("recon", _of("recon")),
    "kl": TableColumn("KL", _of("kl")),
    "neg_elbo": TableColumn("-ELBO", _of("neg_elbo")),
    "active_units": TableColumn("AU", _active_units),
    "latent_size": TableColumn("latent", _of("latent_size", _whole)),
    "inactive_fraction": TableColumn("inactive", _of("inactive_fraction")),
    "mutual_info": TableColumn("MI", _of("mutual_info")),
    "collapsed": TableColumn("collapsed", lambda r: "yes" if _flag(r["collapsed"]) else ""),
    "pareto": TableColumn("pareto", lambda r: "*" if _flag(r["pareto"]) else ""),
    "flags": TableColumn("flags", _flags, wraps=True, least=9),  # "collapsed pareto" on two lines at worst
    "epochs": TableColumn("epochs", _of("epochs", _whole)),
    "best_epoch": TableColumn("best ep", _of("best_epoch", _whole)),
    "test_iwae_nll": TableColumn("test NLL", _of("test_iwae_nll")),
    "amortization_gap": TableColumn("amort gap", _of("amortization_gap")),
    "approximation_gap": TableColumn("approx gap", _of("approximation_gap")),
    "decoder_ortho_cos": TableColumn("ortho cos", _of("decoder_ortho_cos")),
    "wall_s": TableColumn("wall s", lambda r: _fixed(r["wall_s"], 0)),
    "seed": TableColumn("seed", _of("seed", _whole)),
    "confirmed": TableColumn("confirmed", _confirmed),
    "confirm_note": TableColumn("confirm note", _of("confirm_note", _text), wraps=True, least=16),
    "reason": TableColumn("reason", _of("reason", _text), wraps=True, least=16),
}
# what fits 80 columns (confirmed included): the bound, its two terms, the latent code's use, the run's length
DEFAULT_COLUMNS = ("rank", "trial", "iwae_nll", "recon", "kl", "active_units", "epochs", "flags")
_KEYS = ("rank", "trial")  # repeated in every table a row is split over


def choose_columns(frame: pd.DataFrame, columns: str | None = None) -> list[str]:
    """The table's columns: ``columns`` (comma-separated names of TABLE_COLUMNS or ``params.NAME`` of
    a searched parameter), else DEFAULT_COLUMNS plus what this frame has: state and reason when other
    states are listed, the confirmed summary after `tuner confirm` (its notes go in the caption)."""
    params = [c for c in frame.columns if c.startswith("params.")]
    if columns is not None:
        names = [c.strip() for c in columns.split(",") if c.strip()]
        for name in names:
            if name not in TABLE_COLUMNS and name not in params:
                searched = f" (here: {', '.join(params)})" if params else ""
                raise TunerError(f"--columns {name!r} is not a column; use {', '.join(TABLE_COLUMNS)} or "
                                 f"params.NAME of a searched parameter{searched}")
        if not names:
            raise TunerError("--columns is empty; name at least one column, e.g. --columns rank,trial,iwae_nll")
        return list(dict.fromkeys(names))
    chosen = list(DEFAULT_COLUMNS)
    if (frame["state"] != "complete").any():
        chosen.insert(2, "state")
    if frame["confirmed_n"].notna().any():
        chosen.append("confirmed")
    if frame["reason"].notna().any():
        chosen.append("reason")
    return chosen


@dataclass
class _Column:
    header: str
    cells: list[str]
    wraps: bool = False
    least: int = 0
    justify: str = "right"

    @property
    def width(self) -> int:
        """Cells this column takes when packing: its widest cell (or header); text at most its ``least``."""
        natural = max([cell_len(self.header), *(cell_len(c) for c in self.cells)])
        return min(natural, max(self.least, cell_len(self.header))) if self.wraps else natural


def _packed(columns: Sequence[_Column], keys: int, width: int) -> list[list[_Column]]:
    """The columns split into tables that each fit ``width``: the first ``keys`` columns in every
    one, then the others in order, as many as fit. A column too wide for any table gets one alone."""
    head, rest = list(columns[:keys]), list(columns[keys:])
    base = sum(c.width for c in head) + _GAP * max(len(head) - 1, 0)
    tables: list[list[_Column]] = []
    current: list[_Column] = []
    used = base
    for column in rest:
        extra = column.width + (_GAP if head or current else 0)
        if current and used + extra > width:
            tables.append(head + current)
            current, used = [], base
            extra = column.width + (_GAP if head else 0)
        current.append(column)
        used += extra
    if current or not tables:
        tables.append(head + current)
    return tables


def _rich_tables(columns: Sequence[_Column], keys: int, width: int, title: str,
                 caption: str | None = None) -> list[Table]:
    """The packed columns as rich tables: the title on the first, the caption under the last."""
    parts = _packed(columns, keys, width)
    tables = []
    for i, part in enumerate(parts):
        table = Table(title=title if i == 0 else f"{title} (continued)", box=box.SIMPLE_HEAD, show_edge=False,
                      pad_edge=False, collapse_padding=True, caption=caption if i == len(parts) - 1 else None)
        for c in part:
            if c.wraps:  # text: wraps at words, folds a word longer than the column
                table.add_column(c.header, justify="left", overflow="fold")
            else:  # a number: whole, on one line, as wide as its widest cell
                table.add_column(c.header, justify=c.justify, no_wrap=True, min_width=c.width)
        for row in zip(*(c.cells for c in part)):
            table.add_row(*row)
        tables.append(table)
    return tables


def parameter_table(frame: pd.DataFrame, top: int, width: int) -> list[Table]:
    """The searched parameters of the best ``top`` ranked trials: one row per parameter (its full
    dotted name), one column per trial in rank order, values to 4 significant digits ("-" where a
    conditional parameter did not apply). Split over several tables when the trials do not fit."""
    params = [c for c in frame.columns if c.startswith("params.")]
    ranked = frame[frame["rank"].notna()].head(top)
    if not params or ranked.empty or top < 1:
        return []
    names = _Column("parameter", [p.removeprefix("params.") for p in params], justify="left")
    trials = [_Column(f"trial {int(r['trial'])}", [_param(r[p]) for p in params])
              for _, r in ranked.iterrows()]
    title = f"searched parameters of the top {len(trials)} (trials in rank order)"
    return _rich_tables([names, *trials], keys=1, width=width, title=title)


def _bounded(frame: pd.DataFrame) -> list[int]:
    """The shown trials whose log p(z) is a bound (ranking_frame's attrs; a slice keeps them)."""
    listed = set(frame.attrs.get("bounded_prior_trials", ()))
    return [int(t) for t in frame["trial"] if int(t) in listed]


def _mark_bounded(frame: pd.DataFrame, chosen: Sequence[str], built: list[_Column]) -> bool:
    """Mark the NLL cells of bounded trials (others padded a cell, so digits stay aligned) and
    their columns' headers; True when a shown NLL column holds one."""
    bounded = set(_bounded(frame))
    marked = [c for name, c in zip(chosen, built) if name in _NLL_COLUMNS]
    if not bounded or not marked:
        return False
    flags = [int(t) in bounded for t in frame["trial"]]
    for column in marked:
        column.header += PRIOR_BOUND_MARK
        column.cells = [cell + (PRIOR_BOUND_MARK if flag else " ") for cell, flag in zip(column.cells, flags)]
    return True


def ranking_tables(frame: pd.DataFrame, title: str, width: int, columns: str | None = None,
                   params: int = 3) -> list[Table]:
    """A ranking as rich tables that fit ``width`` cells without cutting a number: the chosen
    columns (see choose_columns; split over more tables, rank and trial repeated, when they do not
    fit), then the searched parameters of the best ``params`` trials (parameter_table)."""
    chosen = choose_columns(frame, columns)
    rows = [r for _, r in frame.iterrows()]
    built = []
    for name in chosen:
        if name in TABLE_COLUMNS:
            spec = TABLE_COLUMNS[name]
            built.append(_Column(spec.header, [spec.cell(r) for r in rows], spec.wraps, spec.least))
        else:  # params.NAME
            built.append(_Column(name.removeprefix("params."), [_param(r[name]) for r in rows]))
    keys = next((i for i, name in enumerate(chosen) if name not in _KEYS), len(chosen))  # leading rank, trial
    lines = []
    if "confirmed" in chosen:  # what the cell holds, and where seeds overturn a rank (confirm_note)
        notes = [f"trial {int(t)} is {n}" for t, n in zip(frame["trial"], frame["confirm_note"]) if not _missing(n)]
        lines.append("; ".join(["confirmed: test IWAE NLL mean±sd over n seeds (tuner confirm)", *notes]))
    if _mark_bounded(frame, chosen, built):
        lines.append(prior_bound_note(_bounded(frame)))
    caption = "\n".join(lines) or None
    tables = _rich_tables(built, keys=keys, width=width, title=title, caption=caption)
    return tables + parameter_table(frame, params, width)
