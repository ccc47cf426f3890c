"""The report's ranking table: hyperparameters first, then what to select on, then what not to.

Column groups, left to right: the trial (rank, number), its hyperparameters, its validation metrics
(what trials are ranked and selected by), its training run (epochs, time, seed), and its test-split
numbers, marked "not for selection": choosing a trial by them would make the test score a
validation score. The best trial (rank 1) is highlighted. ``value`` is left out when it repeats
``iwae_nll`` (an IWAE NLL objective), else shown as ``objective``. Cells with a caveat
(:mod:`tuner.results.report_caveats`) carry a marker and a tooltip; the notes come above the table.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from tuner.results.report_caveats import Caveats

__all__ = ["GROUPS", "TEST_GROUP", "ranking_table"]

TEST_GROUP = "test: not for selection"
GROUPS = ("trial", "hyperparameters", "validation", "training", TEST_GROUP)
_LEAD = ("rank", "trial")
_TRAINING = ("epochs", "best_epoch", "wall_s", "seed")
_TEST_SPLIT = ("amortization_gap", "approximation_gap")  # measured on the first test examples (tuner.vae.gaps)
_HIDDEN = ("state", "reason")  # the same for every complete trial


@dataclass
class _Column:
    key: str  # the frame's column
    label: str  # what the header says
    group: str


def _group(key: str) -> str:
    if key in _LEAD:
        return "trial"
    if key.startswith("params."):
        return "hyperparameters"
    if key.startswith(("test_", "confirm")) or key in _TEST_SPLIT:
        return TEST_GROUP
    return "training" if key in _TRAINING else "validation"


def _columns(shown: pd.DataFrame) -> list[_Column]:
    """The shown columns in group order (the frame's order within a group), empty ones left out."""
    keys = [c for c in shown.columns if c not in _HIDDEN and shown[c].notna().any()]
    if "value" in keys and "iwae_nll" in keys and np.allclose(
            pd.to_numeric(shown["value"]), pd.to_numeric(shown["iwae_nll"]), equal_nan=True):
        keys.remove("value")  # the objective is the validation IWAE NLL: the same numbers twice
    columns = [_Column(k, "objective" if k == "value" else k.removeprefix("params."), _group(k)) for k in keys]
    return sorted(columns, key=lambda c: GROUPS.index(c.group))  # stable: frame order within a group


def _text(value: object, key: str) -> str:
    """A cell as text: floats to 4 significant digits (hyperparameters 3), flags as yes/blank."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool | np.bool_):
        return "yes" if value else ""
    if isinstance(value, float | np.floating):
        return f"{value:.3g}" if key.startswith("params.") else f"{value:.4g}"
    return str(value)


def _header(label: str) -> str:
    """A header that may wrap after each dot or underscore (kl.warmup_epochs), so columns stay narrow."""
    return "<wbr>".join(html.escape(part) for part in label.replace(".", ".\0").replace("_", "_\0").split("\0"))


def ranking_table(shown: pd.DataFrame, marks: Caveats) -> str:
    """``shown`` (ranking_frame rows, best first) as an HTML table inside a scrolling container."""
    columns = _columns(shown)
    spans: list[tuple[str, int]] = []
    for c in columns:
        if spans and spans[-1][0] == c.group:
            spans[-1] = (c.group, spans[-1][1] + 1)
        else:
            spans.append((c.group, 1))
    slug = {g: g.split(":")[0] for g in GROUPS}
    groups = "".join(f'<th colspan="{n}" class="group g-{slug[g]} first">{html.escape(g if g != "trial" else "")}</th>'
                     for g, n in spans)
    first = {c.key for i, c in enumerate(columns) if i == 0 or columns[i - 1].group != c.group}

    def css(c: _Column) -> str:  # the group's colour; a rule left of each group's first column
        return f"g-{slug[c.group]}" + (" first" if c.key in first else "")

    heads = "".join(f'<th class="{css(c)}">{_header(c.label)}</th>' for c in columns)
    rows = []
    for i, (_, row) in enumerate(shown.iterrows()):
        cells = []
        for c in columns:
            text = html.escape(_text(row[c.key], c.key))
            mark = marks.marks.get((int(row["trial"]), c.key))
            title = ""
            if mark is not None:
                text = f"{mark.prefix}{text}{mark.suffix}"
                title = f' title="{html.escape(mark.tip)}"'
            if c.key == "rank" and i == 0:
                text += ' <span class="best-tag">best</span>'
            cells.append(f'<td class="{css(c)}{" caveat" if mark else ""}"{title}>{text}</td>')
        rows.append(("<tr class=\"best\">" if i == 0 else "<tr>") + "".join(cells) + "</tr>")
    return (f'<div class="table-wrap"><table class="ranking"><thead><tr class="groups">{groups}</tr>'
            f"<tr>{heads}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")
