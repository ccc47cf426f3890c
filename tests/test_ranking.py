"""Ranking: a real tiny study (one real worker, real SQLite) ranked with collapse last and pruned
trials listed with their reasons; every output format through the command; ordering, collapse and
Pareto rules on a constructed study whose answers are known."""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from test_worker import run_cli, study_yaml

from tuner.cli import main
from tuner.errors import TunerError
from tuner.results.confirm import Rerun, confirmed, replicate_seed, store_rerun
from tuner.results.ranking import pareto_front, rank_study, ranking_frame, ranking_records
from tuner.results.ranking_table import TABLE_COLUMNS
from tuner.spec import parse_config
from tuner.store.attrs import CONFIG_ATTR
from tuner.study.open import create_or_resume
from tuner.study.spec import parse_study_spec
from tuner.study.worker import Worker

HEALTHY_A = {"model.latent": 8, "kl.beta": 1.0, "optim.lr": 1e-2}
HEALTHY_B = {"model.latent": 4, "kl.beta": 1.0, "optim.lr": 1e-2}
COLLAPSING = {"model.latent": 8, "kl.beta": 30.0, "optim.lr": 1e-2}  # beta 30 shuts the latent code
STALLED = {"model.latent": 8, "kl.beta": 1.0, "optim.lr": 1e-6}  # learns nothing: pruned


@dataclass
class Built:
    url: str
    name: str
    art: Path
    study: optuna.Study


def build_study(tmp: Path, npz: Path, name: str, enqueue: list[dict], **over) -> Built:
    """A tiny real study: one worker, one slot (trials run in the enqueued order), 3 epochs each.

    Batch 32 at lr 1e-2 trains a healthy code in 3 epochs on the 700-image train split."""
    url = f"sqlite:///{tmp}/{name}.db"
    space = {"model.latent": {"type": "categorical", "choices": [4, 8]},
             "kl.beta": {"type": "categorical", "choices": [1.0, 30.0]},
             "optim.lr": {"type": "categorical", "choices": [1e-2, 1e-6]}}
    over = {"base": {"data": {"dataset": f"npz:{npz}"}, "model": {"hidden": 32, "depth": 1},
                     "optim": {"batch_size": 32}, "kl": {"schedule": "constant"}, "train": {"iwae_k": 5, "gap_examples": 16, "gap_steps": 20}},
            "space": space, "budget": {"trials": len(enqueue), "epochs": 3}, **over}
    spec = study_yaml(tmp, npz, name, url, **over)
    study = create_or_resume(parse_study_spec(yaml.safe_load(spec.read_text())))
    for params in enqueue:
        study.enqueue_trial(params)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only fight the other test processes for CPUs
    try:
        Worker(url, name, slots=1, device="cpu", artifacts=tmp / "art", log=lambda s: None).run()
    finally:
        torch.set_num_threads(threads)
    return Built(url, name, tmp / "art", study)


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory, small_npz: Path) -> Built:
    """The collapsing trial completes first (the median pruner's reference), two healthy ones follow,
    and the stalled one is pruned by the median rule."""
    built = build_study(
        tmp_path_factory.mktemp("rank"), small_npz, "rank", [COLLAPSING, HEALTHY_A, HEALTHY_B, STALLED],
        pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 1},
    )
    states = [t.state for t in built.study.get_trials()]
    assert states == [TrialState.COMPLETE] * 3 + [TrialState.PRUNED], states
    return built


def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str, str]:
    """`tuner ARGS` in-process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["tuner", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


# ------------------------------------------------------------------------------ the real study
def test_real_study_ranks_healthy_by_nll_then_collapsed(real: Built) -> None:
    _, frame = rank_study(real.url, real.name)
    trials = {t.number: t for t in real.study.get_trials()}
    assert list(frame["rank"]) == [1, 2, 3] and set(frame["state"]) == {"complete"}
    assert sorted(frame["trial"]) == [0, 1, 2]  # the pruned trial 3 is not ranked
    for _, row in frame.iterrows():  # every number is the one the worker stored
        t = trials[row["trial"]]
        for name in ("iwae_nll", "recon", "kl", "active_units", "mutual_info", "collapsed", "test_iwae_nll",
                     "decoder_ortho_cos"):
            assert row[name] == t.user_attrs[name], name
        assert row["value"] == t.values[0] and row["params.kl.beta"] == t.params["kl.beta"]
    assert bool(frame.set_index("trial").loc[0, "collapsed"])  # beta 30: no information in the code
    healthy = frame[~frame["collapsed"]]
    assert len(healthy) >= 1, "the fixture needs a healthy trial"
    # healthy ones first, by NLL; collapsed ones after them, by NLL
    n = len(healthy)
    assert list(frame["collapsed"]) == [False] * n + [True] * (3 - n)
    for part in (frame.iloc[:n], frame.iloc[n:]):
        assert list(part["iwae_nll"]) == sorted(part["iwae_nll"])
    # Pareto over (NLL, recon, inactive fraction): the best NLL is never dominated
    assert frame.loc[frame["iwae_nll"].idxmin(), "pareto"]


def test_states_list_pruned_trials_with_their_reason(real: Built, capsys, monkeypatch) -> None:
    _, frame = rank_study(real.url, real.name, states=["complete", "pruned"])
    pruned = frame[frame["state"] == "pruned"]
    assert list(pruned["trial"]) == [3] and pruned["rank"].isna().all()
    assert list(frame["trial"][:3]) == list(rank_study(real.url, real.name)[1]["trial"])  # ranked ones first
    reason = real.study.get_trials()[3].user_attrs["prune_reason"]
    assert reason.startswith("pruned at epoch") and "by median" in reason
    assert pruned["reason"].iloc[0] == reason
    # only pruned ones, through the command, as a table with a reason column
    code, out, _ = cli(capsys, monkeypatch, "rank", real.name, "--storage", real.url, "--states", "pruned")
    assert code == 0
    assert "reason" in out and "pruned at epoch" in out and "complete" not in out


def test_json_format_has_the_documented_fields(real: Built, capsys, monkeypatch) -> None:
    code, out, err = cli(capsys, monkeypatch, "rank", real.name, "--storage", real.url, "--format", "json")
    assert code == 0, err
    records = json.loads(out)
    assert [r["rank"] for r in records] == [1, 2, 3]
    for key in ("trial", "rank", "iwae_nll", "recon", "kl", "active_units", "collapsed", "pareto", "params"):
        assert all(key in r for r in records), key
    by_trial = {t.number: t for t in real.study.get_trials()}
    for r in records:
        t = by_trial[r["trial"]]
        assert r["params"] == t.params  # nested, named as in the space
        assert r["iwae_nll"] == pytest.approx(t.user_attrs["iwae_nll"], rel=1e-12)
        assert isinstance(r["collapsed"], bool) and isinstance(r["pareto"], bool)
    assert [r["trial"] for r in records] == list(rank_study(real.url, real.name)[1]["trial"])


def test_csv_parquet_markdown_and_table_formats(real: Built, tmp_path: Path, capsys, monkeypatch) -> None:
    _, expected = rank_study(real.url, real.name, top=2)
    base = ("rank", real.name, "--storage", real.url, "--top", "2")
    code, out, _ = cli(capsys, monkeypatch, *base, "--format", "csv")
    assert code == 0
    csv = pd.read_csv(io.StringIO(out))
    assert list(csv["trial"]) == list(expected["trial"]) and "params.model.latent" in csv.columns
    assert np.allclose(csv["iwae_nll"], expected["iwae_nll"])

    code, out, _ = cli(capsys, monkeypatch, *base, "--format", "parquet", "--out", str(tmp_path / "r.parquet"))
    assert code == 0 and "r.parquet (2 rows)" in out
    parquet = pd.read_parquet(tmp_path / "r.parquet")
    assert list(parquet["trial"]) == list(expected["trial"])
    assert list(parquet["iwae_nll"]) == list(expected["iwae_nll"])  # binary: exact
    assert list(parquet["collapsed"]) == list(expected["collapsed"])

    code, out, _ = cli(capsys, monkeypatch, *base, "--format", "markdown")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4  # header, separator, two rows
    assert [c.strip() for c in lines[0].strip("|").split("|")][:3] == ["rank", "trial", "state"]
    assert set(lines[1]) <= set("|-: ")

    monkeypatch.delenv("COLUMNS", raising=False)  # piped, no $COLUMNS: one wide table
    code, out, _ = cli(capsys, monkeypatch, *base)  # the default: a table, and the searched values below it
    assert code == 0
    lines = out.splitlines()
    assert lines[1].split() == ["rank", "trial", "val", "NLL", "recon", "KL", "AU", "epochs", "flags"]
    first = expected.iloc[0]
    assert lines[3].split()[:5] == ["1", str(first["trial"]), f"{first['iwae_nll']:.2f}", f"{first['recon']:.2f}",
                                    f"{first['kl']:.2f}"]
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.startswith(("kl.", "model.", "optim."))}
    assert rows == {name.removeprefix("params."): [f"{v:.4g}" for v in expected[name]]
                    for name in ("params.kl.beta", "params.model.latent", "params.optim.lr")}


# ------------------------------------------------------------------------- a constructed study
# trial: (iwae_nll, recon, neg_elbo, active_units, collapsed); latent 8 everywhere
CASES = {
    0: (100.0, 80.0, 105.0, 6, False),
    1: (95.0, 90.0, 96.0, 1, True),  # best NLL, but collapsed
    2: (110.0, 70.0, 112.0, 8, False),  # best reconstruction, every unit active
    3: (120.0, 85.0, 125.0, 4, False),  # worse than trial 0 on NLL, recon and inactive fraction
}


@pytest.fixture
def made(tmp_path: Path) -> optuna.Study:
    study = optuna.create_study(study_name="made", storage=f"sqlite:///{tmp_path}/made.db")
    dists = {"model.latent": IntDistribution(2, 8), "optim.lr": FloatDistribution(1e-4, 1e-1, log=True)}
    for number, (nll, recon, elbo, au, collapsed) in CASES.items():
        attrs = {"iwae_nll": nll, "recon": recon, "kl": elbo - recon, "neg_elbo": elbo, "active_units": au,
                 "latent_size": 8, "inactive_fraction": 1 - au / 8, "mutual_info": 0.1 if collapsed else 3.0,
                 "collapsed": collapsed, "epochs": 3}
        study.add_trial(create_trial(value=nll, params={"model.latent": 8, "optim.lr": 1e-3 * (number + 1)},
                                     distributions=dists, user_attrs=attrs))
    study.add_trial(create_trial(state=TrialState.PRUNED, params={"model.latent": 2, "optim.lr": 1e-2},
                                 distributions=dists, user_attrs={"prune_reason": "pruned at epoch 1 by median"}))
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"error": "data file missing on host b"}))
    return study


@pytest.mark.parametrize(("by", "include_collapsed", "order"), [
    ("nll", False, [0, 2, 3, 1]),  # collapsed last though its NLL is the best
    ("nll", True, [1, 0, 2, 3]),  # ranked by the metric alone
    ("recon", False, [2, 0, 3, 1]),
    ("elbo", False, [0, 2, 3, 1]),
    ("au", False, [2, 0, 3, 1]),  # more active units first
])
def test_order_by_metric_and_collapse(made: optuna.Study, by: str, include_collapsed: bool, order: list[int]) -> None:
    frame = ranking_frame(made, by=by, include_collapsed=include_collapsed)
    assert list(frame["trial"]) == order and list(frame["rank"]) == [1, 2, 3, 4]
    assert list(frame["collapsed"]) == [CASES[n][4] for n in order]


def test_pareto_flags_and_top(made: optuna.Study) -> None:
    frame = ranking_frame(made).set_index("trial")
    # 1 has the best NLL, 2 the best recon and inactive fraction, 0 is beaten by neither; 0 beats 3
    assert frame["pareto"].to_dict() == {0: True, 2: True, 3: False, 1: True}
    assert list(ranking_frame(made, top=2)["trial"]) == [0, 2]
    assert list(ranking_frame(made, by="au", top=1)["trial"]) == [2]


def test_other_states_follow_unranked_with_reasons(made: optuna.Study) -> None:
    frame = ranking_frame(made, states=["complete", "pruned", "fail"], top=1)
    assert list(frame["trial"]) == [0, 4, 5] and list(frame["state"]) == ["complete", "pruned", "fail"]
    assert frame["rank"].isna().tolist() == [False, True, True]
    assert list(frame["reason"][1:]) == ["pruned at epoch 1 by median", "data file missing on host b"]
    records = ranking_records(frame)
    assert records[1]["rank"] is None and records[1]["params"] == {"model.latent": 2, "optim.lr": 1e-2}
    assert records[2]["params"] == {} and records[2]["pareto"] is False


def test_pareto_front_on_points() -> None:
    points = np.array([
        [1.0, 5.0, 0.0],
        [2.0, 2.0, 0.0],
        [2.0, 2.0, 0.0],  # a duplicate: neither dominates the other
        [3.0, 3.0, 0.0],  # dominated by both rows above
        [0.5, np.nan, 0.0],  # unknown: off the front, dominates nothing
        [5.0, 1.0, 0.5],
    ])
    assert pareto_front(points).tolist() == [True, True, True, False, False, True]
    assert pareto_front(np.empty((0, 3))).tolist() == []


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"by": "loss"}, "--by 'loss' is not one of nll, recon, elbo, au"),
    ({"states": ["complete", "done"]}, "--states 'done' is not one of"),
    ({"top": 0}, "--top must be at least 1, but got top=0"),
])
def test_bad_options_name_the_value(made: optuna.Study, kwargs: dict, words: str) -> None:
    with pytest.raises(TunerError, match=words.replace("(", r"\(")):
        ranking_frame(made, **kwargs)


# --------------------------------------------------------------- a 14-parameter study in a terminal
WIDE_SPACE = {  # what a real search of the families and the optimizer looks like (tuner.study.space)
    "model.latent": IntDistribution(2, 64),
    "model.hidden": IntDistribution(64, 1024, log=True),
    "model.depth": IntDistribution(1, 3),
    "model.dropout": FloatDistribution(0.0, 0.5),
    "model.posterior": CategoricalDistribution(["gaussian", "iaf"]),
    "model.flow_steps": IntDistribution(1, 8),  # only where model.posterior is iaf
    "model.prior": CategoricalDistribution(["normal", "mog", "vamp"]),
    "model.prior_components": IntDistribution(2, 64),  # only where model.prior is mog or vamp
    "optim.name": CategoricalDistribution(["adam", "adamw", "sgd"]),
    "optim.lr": FloatDistribution(1e-4, 1e-2, log=True),
    "optim.weight_decay": FloatDistribution(1e-7, 1e-2, log=True),
    "optim.batch_size": CategoricalDistribution([32, 64, 128, 256]),
    "kl.beta": FloatDistribution(0.1, 4.0),
    "kl.warmup_epochs": FloatDistribution(0.0, 20.0),
}


def wide_params(rng: np.random.Generator) -> dict[str, object]:
    """One trial's values, at full float precision, conditional ones only where they apply."""
    params: dict[str, object] = {}
    for path, dist in WIDE_SPACE.items():
        if (path == "model.flow_steps" and params["model.posterior"] != "iaf") or \
                (path == "model.prior_components" and params["model.prior"] == "normal"):
            continue
        if isinstance(dist, CategoricalDistribution):
            params[path] = dist.choices[int(rng.integers(len(dist.choices)))]
        elif isinstance(dist, IntDistribution):
            params[path] = int(rng.integers(dist.low, dist.high + 1))
        else:
            low, high = (np.log(dist.low), np.log(dist.high)) if dist.log else (dist.low, dist.high)
            value = float(rng.uniform(low, high))
            params[path] = float(np.exp(value)) if dist.log else value
    return params


def nested(values: dict[str, object]) -> dict[str, dict[str, object]]:
    """Dotted paths -> the config's sections."""
    out: dict[str, dict[str, object]] = {}
    for path, value in values.items():
        section, key = path.split(".")
        out.setdefault(section, {})[key] = value
    return out


def build_wide_study(url: str, name: str = "wide") -> optuna.Study:
    """12 complete trials over WIDE_SPACE (one at NLL 1234.57: a wide cell), two of them confirmed over
    3 seeds, one pruned, one failed; each complete trial carries the attrs the worker stores (metrics
    and seed as user attrs, the resolved config as a system attr)."""
    rng = np.random.default_rng(7)
    study = optuna.create_study(study_name=name, storage=url)
    for number in range(12):
        params = wide_params(rng)
        nll = 1234.5678 if number == 5 else float(95 + rng.uniform(0, 15))
        recon = nll - float(rng.uniform(20, 30))
        latent = int(params["model.latent"])
        au = max(1, latent - int(rng.integers(0, 4)))
        config = parse_config({**nested(params), "seed": 1000 + number,
                               "data": {"dataset": "npz:/data/mnist1k.npz"}, "train": {"epochs": 40}})
        attrs = {"iwae_nll": nll, "recon": recon, "kl": nll - recon + 1.234567, "neg_elbo": nll + 1.234567,
                 "active_units": au, "latent_size": latent, "inactive_fraction": 1 - au / latent,
                 "mutual_info": float(rng.uniform(2, 4.6)), "collapsed": number == 7, "epochs": 40,
                 "best_epoch": int(rng.integers(20, 41)), "test_iwae_nll": nll + float(rng.uniform(-1, 1)),
                 "amortization_gap": float(rng.uniform(1, 5)), "approximation_gap": float(rng.uniform(-0.5, 3)),
                 "wall_s": float(rng.uniform(30, 900)), "seed": 1000 + number}
        study.add_trial(create_trial(value=nll, params=params, user_attrs=attrs,
                                     system_attrs={CONFIG_ATTR: config.model_dump(mode="json")},
                                     distributions={p: WIDE_SPACE[p] for p in params}))
    params = wide_params(rng)
    reason = "pruned at epoch 4 by median: val -ELBO 181.3 above the median 140.2"
    study.add_trial(create_trial(state=TrialState.PRUNED, params=params, user_attrs={"prune_reason": reason},
                                 distributions={p: WIDE_SPACE[p] for p in params}))
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"error": "data file missing on host b"}))
    for trial, nlls in ((0, [104.11, 104.52, 103.97]), (3, [101.02, 101.33, 100.87])):
        for i, value in enumerate(nlls):
            rerun = Rerun(trial=trial, replicate=i, seed=replicate_seed(1000 + trial, i), test_iwae_nll=value,
                          recon=80.0, kl=24.0, active_units=10, collapsed=False, epochs=40)
            store_rerun(study, rerun)
    return study


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, optuna.Study]:
    url = f"sqlite:///{tmp_path_factory.mktemp('wide')}/wide.db"
    return url, build_wide_study(url)


def rank_lines(url: str, width: int, *args: str) -> list[str]:
    """`tuner rank wide ARGS` as a real process at $COLUMNS ``width``: its stdout lines."""
    proc = run_cli("rank", "wide", "--storage", url, *args, env={"COLUMNS": str(width)})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def value_text(value: object) -> str:
    """A searched value as the parameter table writes it."""
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else \
        f"{value:.4g}" if isinstance(value, float) else str(value)


@pytest.mark.parametrize("width", [80, 120])
def test_a_14_parameter_study_reads_whole_at_80_and_120_columns(wide: tuple[str, optuna.Study], width: int) -> None:
    url, study = wide
    lines = rank_lines(url, width)
    out = "\n".join(lines)
    assert "…" not in out and max(len(line) for line in lines) <= width
    # the default columns, in one table even at 80 (confirmed included; its notes in the caption)
    assert "(continued)" not in out
    assert [line.split() for line in lines if line.startswith("rank")] == [
        ["rank", "trial", "val", "NLL", "recon", "KL", "AU", "epochs", "flags", "confirmed"]]
    _, frame = rank_study(url, "wide")
    body = lines[3:]  # under the title, the header and its rule; the caption follows
    body = body[:next(i for i, line in enumerate(body) if not line.strip() or line.split()[0] == "confirmed:")]
    rows: dict[int, list[str]] = {}
    wrapped: dict[int, list[str]] = {}  # a row's text wrapped onto lines of its own (flags)
    for line in body:
        if line[:12].strip():  # rank and trial: a row
            last = int(line.split()[1])
            rows[last] = line.split()
        else:
            wrapped.setdefault(last, []).extend(line.split())
    assert len(rows) == len(frame)
    summaries = confirmed(study)
    for _, r in frame.iterrows():  # every number whole, as the study holds it
        cells = [str(r["rank"]), str(r["trial"]), f"{r['iwae_nll']:.2f}", f"{r['recon']:.2f}", f"{r['kl']:.2f}",
                 f"{r['active_units']}/{r['latent_size']}", "40"]
        assert rows[r["trial"]][:7] == cells, (cells, rows[r["trial"]])
        c = summaries.get(int(r["trial"]))
        assert " ".join(rows[r["trial"]][-2 if c else -1:]) == (f"{c.nll_mean:.2f}±{c.nll_sd:.2f} n=3" if c else "-")
    pareto = {n for n, row in rows.items() if "pareto" in row + wrapped.get(n, [])}
    assert pareto == set(frame.loc[frame["pareto"], "trial"])
    assert {n for n, row in rows.items() if "collapsed" in row} == {7}
    assert "trial 0 is worse than trial 3 over seeds" in " ".join(out.split())  # the caption
    assert rows[5][2:4] == ["1234.57", f"{frame.set_index('trial').loc[5, 'recon']:.2f}"]  # a wide cell, whole
    # below: the 14 searched parameters of the top 3, one row each, every value whole
    top = frame.head(3)
    assert [line.split() for line in lines if line.startswith("parameter")] == [
        ["parameter", *(word for n in top["trial"] for word in ("trial", str(n)))]]
    params = {line.split()[0]: line.split()[1:] for line in lines if line.startswith(("kl.", "model.", "optim."))}
    assert set(params) == set(WIDE_SPACE)
    for name, values in params.items():
        assert values == [value_text(v) for v in top[f"params.{name}"]], name
    assert params["model.prior_components"].count("-") == int((top["params.model.prior"] == "normal").sum())


def test_tables_split_where_the_columns_do_not_fit(wide: tuple[str, optuna.Study]) -> None:
    """Every column asked for at 80 columns, and the parameters of all 12 trials: more tables, rank
    and trial (or the parameter name) repeated in each, no line over 80, no number cut."""
    url, _ = wide
    columns = ",".join([*TABLE_COLUMNS, "params.optim.lr"])
    lines = rank_lines(url, 80, "--columns", columns, "--params", "12", "--states", "complete,pruned,fail")
    out = "\n".join(lines)
    assert "…" not in out and max(len(line) for line in lines) <= 80
    headers = [line.split() for line in lines if line.startswith(("rank", "parameter"))]
    ranking, parameters = [h for h in headers if h[0] == "rank"], [h for h in headers if h[0] == "parameter"]
    assert len(ranking) >= 3 and all(h[:2] == ["rank", "trial"] for h in ranking)
    assert sum(len(h) for h in ranking) - 2 * len(ranking) >= len(TABLE_COLUMNS) - 2  # every column, once
    assert len(parameters) >= 2 and sum(len(h) - 1 for h in parameters) == 2 * 12  # "trial N" per trial
    _, frame = rank_study(url, "wide")
    for lr in frame["params.optim.lr"]:
        assert f"{lr:.4g}" in out  # whole, wherever its table is
    assert set("data file missing on host b".split()) <= set(out.split())  # a reason, wrapped at words


def test_columns_choose_the_table_and_bad_names_are_one_line(wide: tuple[str, optuna.Study], capsys,
                                                            monkeypatch) -> None:
    url, _ = wide
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = cli(capsys, monkeypatch, "rank", "wide", "--storage", url, "--top", "2", "--params", "0",
                         "--columns", "trial,mutual_info,params.optim.lr,wall_s")
    assert code == 0, err
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("trial"))  # under the title (wrapped: narrow)
    assert lines[at].split() == ["trial", "MI", "optim.lr", "wall", "s"] and len(lines) == at + 4  # rule, 2 rows
    _, frame = rank_study(url, "wide", top=2)
    for line, (_, r) in zip(lines[at + 2:], frame.iterrows(), strict=True):
        assert line.split() == [str(r["trial"]), f"{r['mutual_info']:.2f}", f"{r['params.optim.lr']:.4g}",
                                f"{r['wall_s']:.0f}"]
    for args, words in {
        ("--columns", "rank,loss"): "--columns 'loss' is not a column; use rank, trial, state, value, iwae_nll",
        ("--columns", "params.optim.momentum"): "params.NAME of a searched parameter (here: params.kl.beta,",
        ("--columns", " , "): "--columns is empty",
        ("--columns", "rank", "--format", "csv"): "--format csv keeps every column (drop --columns)",
    }.items():
        code, out, err = cli(capsys, monkeypatch, "rank", "wide", "--storage", url, *args)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and words in err, (args, err)


def test_machine_formats_keep_every_column(wide: tuple[str, optuna.Study], capsys, monkeypatch) -> None:
    url, _ = wide
    code, out, _ = cli(capsys, monkeypatch, "rank", "wide", "--storage", url, "--format", "csv")
    _, frame = rank_study(url, "wide")
    csv = pd.read_csv(io.StringIO(out))
    assert code == 0 and list(csv.columns) == list(frame.columns)
    assert len([c for c in csv.columns if c.startswith("params.")]) == 14
    assert np.allclose(csv["params.optim.lr"], frame["params.optim.lr"], rtol=1e-12)  # full precision
