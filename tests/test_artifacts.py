"""Trial images as Optuna artifacts: what real workers upload (every complete trial, a traversal
included), the round trip through a real file-system store, pictures pixel by pixel, the cost
per trial, and a broken store that leaves the trial complete."""

from __future__ import annotations

import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from optuna.artifacts import get_all_artifact_meta
from optuna.trial import TrialState
from PIL import Image
from test_worker import study_yaml

from tuner.errors import TunerError
from tuner.spec import parse_config
from tuner.store.artifacts import IMAGE_NAMES, artifact_store, artifacts_root, save_images, trial_images
from tuner.store.attrs import set_trial_attrs, trial_config
from tuner.study.open import create_or_resume
from tuner.study.spec import parse_study_spec
from tuner.study.worker import Worker
from tuner.vae.data import load_splits
from tuner.vae.engine import Population
from tuner.vae.captions import Caption, caption_layout
from tuner.vae.images import (
    SAMPLES_CAPTION, ImagesUnavailable, reconstruction_caption, render_images, traversal_caption, traversal_dims,
)
from tuner.vae.population import PopulationShape

GRID = 8 * 56 + 7 * 2  # 8 tiles of 28 px scaled x2, 2 px between: 462 px


def _captioned(caption: Caption, width: int, height: int):
    """Where a grid of (width, height) px sits once `caption` is drawn around it (tests/test_captions.py)."""
    return caption_layout(caption, (width, height), (56, 56), 2)


@dataclass
class Built:
    url: str
    art: Path
    study: optuna.Study
    log: list[str]


def _study(tmp: Path, npz: Path, name: str, params: list[dict], epochs: int) -> tuple[str, optuna.Study]:
    url = f"sqlite:///{tmp}/{name}.db"
    spec = study_yaml(
        tmp, npz, name, url,
        base={"data": {"dataset": f"npz:{npz}"}, "model": {"hidden": 128, "depth": 1}, "optim": {"batch_size": 64},
              "kl": {"schedule": "constant"}, "train": {"iwae_k": 5, "gap_examples": 16, "gap_steps": 20}},
        space={"optim.lr": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
               "model.latent": {"type": "categorical", "choices": [3, 8]}},
        budget={"trials": len(params), "epochs": epochs},
    )
    study = create_or_resume(parse_study_spec(yaml.safe_load(spec.read_text())))
    for p in params:
        study.enqueue_trial(p)
    return url, study


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, small_npz: Path) -> Built:
    """Three real trials, one slot (so they complete in order): a good one, a hopeless one (lr 1e-6:
    collapsed and far worse), and a good one with 3 latent dims."""
    tmp = tmp_path_factory.mktemp("artifacts")
    params = [{"optim.lr": 1e-2, "model.latent": 8}, {"optim.lr": 1e-6, "model.latent": 8},
              {"optim.lr": 1e-2, "model.latent": 3}]
    url, study = _study(tmp, small_npz, "img", params, epochs=3)
    log: list[str] = []
    Worker(url, "img", slots=1, device="cpu", artifacts=tmp / "art", log=log.append).run()
    return Built(url, tmp / "art", study, log)


def _png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def test_every_complete_trial_has_its_images_and_a_traversal(built: Built) -> None:
    store = artifact_store(built.url, built.art)
    trials = sorted(built.study.get_trials(), key=lambda t: t.datetime_complete)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    for t in trials:
        assert "artifact_error" not in t.user_attrs
        images = trial_images(built.study, t, store)
        assert set(images) == set(IMAGE_NAMES)  # a traversal for every complete trial, not only a new best
        recon, samples = _png(images["reconstructions.png"]), _png(images["samples.png"])
        assert recon.mode == samples.mode == "L"  # MNIST is grayscale
        at = _captioned(reconstruction_caption(32), GRID, GRID)  # 32 inputs over outputs: 8 rows, each labelled
        assert recon.size == (at.width, at.height) and at.rows_drawn
        at = _captioned(SAMPLES_CAPTION, GRID, GRID)  # 64 samples under a title
        assert samples.size == (at.width, at.height) == (GRID, at.top + GRID)
        rows = min(8, t.params["model.latent"])
        width, height = 9 * 56 + 8 * 2, rows * 56 + (rows - 1) * 2
        layout = _captioned(traversal_caption(list(range(rows)), torch.zeros(8)), width, height)
        traversal = _png(images["traversal.png"])
        assert traversal.height == layout.height and traversal.width > width + 50  # + the dim/KL column
    # lr 1e-6 trains nothing: collapsed and far worse, and its traversal is kept all the same
    assert trials[1].user_attrs["collapsed"] and trials[1].values[0] > trials[0].values[0] + 100


def test_images_round_trip_through_the_file_store(built: Built) -> None:
    store = artifact_store(built.url, built.art)
    root = built.art / "optuna"
    assert root.is_dir()
    for t in built.study.get_trials():
        metas = get_all_artifact_meta(t, storage=built.study._storage)
        images = trial_images(built.study, t, store)
        assert sorted(m.filename for m in metas) == sorted([*images, "config.yaml"]) and set(images) <= set(IMAGE_NAMES)
        for meta in metas:
            if meta.filename == "config.yaml":  # beside the images (tests/test_dashboard.py reads it)
                assert meta.mimetype.startswith("text/yaml")
                continue
            assert meta.mimetype == "image/png"
            assert images[meta.filename] == (root / meta.artifact_id).read_bytes()
    # the recon grid's first row holds the first val inputs, binarized or not, as 0..255 pixels
    splits = load_splits(parse_config(trial_config(built.study.trials[0])).data, 64)
    first = np.asarray(_png(trial_images(built.study, built.study.trials[0], store)["reconstructions.png"]))
    at = _captioned(reconstruction_caption(32), GRID, GRID)  # the tiles start right of the row labels
    tile = first[at.top : at.top + 56 : 2, at.left : at.left + 56 : 2]  # tile 0, undo the x2 upscaling
    want = np.rint(splits.val[0].reshape(28, 28).numpy() * 255)
    assert np.array_equal(tile, want)


def test_saved_images_round_trip_any_png_and_other_names_are_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/u.db"
    study = optuna.create_study(storage=url, study_name="u")
    trial = study.ask()
    rgb = Image.fromarray(np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3))
    gray = Image.fromarray(np.full((3, 2), 7, dtype=np.uint8))
    store = artifact_store(url)  # default root: beside the SQLite file
    assert artifacts_root(url) == tmp_path / "artifacts" and (tmp_path / "artifacts" / "optuna").is_dir()
    attrs = save_images({"a.png": rgb, "samples.png": gray}, store)
    with pytest.raises(ValueError, match="PNG file names"):
        save_images({"../escape.png": gray}, store)
    set_trial_attrs(trial, system=attrs)
    study.tell(trial, 1.0)
    got = trial_images(study, study.trials[0], store)
    assert sorted(got) == ["a.png", "samples.png"]
    # the attrs are what Optuna's upload_artifact writes: its own reader lists them
    metas = get_all_artifact_meta(study.trials[0], storage=study._storage)
    assert sorted((m.filename, m.mimetype, m.encoding) for m in metas) == [
        ("a.png", "image/png", None), ("samples.png", "image/png", None)]
    assert np.array_equal(np.asarray(_png(got["a.png"])), np.asarray(rgb)) and _png(got["a.png"]).mode == "RGB"
    assert np.array_equal(np.asarray(_png(got["samples.png"])), np.asarray(gray))
    other = study.ask()
    study.tell(other, 2.0)
    assert trial_images(study, study.trials[1], store) == {}  # no images: an empty dict


def test_artifact_store_root_follows_override_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    artifact_store(url, tmp_path / "given")
    assert (tmp_path / "given" / "optuna").is_dir()
    monkeypatch.setenv("TUNER_ARTIFACTS", str(tmp_path / "env"))
    artifact_store(url)
    assert (tmp_path / "env" / "optuna").is_dir()
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(TunerError, match="--artifacts"):
        artifact_store(url, tmp_path / "file")


def _model(small_npz: Path, tiny, latent: int, latent_max: int, hidden: int = 64):
    """A fresh one-slot model using `latent` of a population's `latent_max` dims, and its splits."""
    config = tiny(model={"latent": latent, "hidden": hidden})
    splits = load_splits(config.data, config.optim.batch_size)
    pop = Population(PopulationShape.of(config), splits, slots=1, latent_max=latent_max, hidden_max=hidden)
    pop.assign(0, config)
    return pop.slot_model(0, best=False), splits


def test_render_images_grids_pixels_and_determinism(small_npz: Path, tiny) -> None:
    model, splits = _model(small_npz, tiny, latent=3, latent_max=8)
    # the tiles alone (captions=False): captions are tested in tests/test_images.py
    images = render_images(model, splits.val, splits.image_shape, seed=5, traversal=True, captions=False)
    assert list(images) == list(IMAGE_NAMES)
    assert all(im.mode == "L" for im in images.values())
    assert images["reconstructions.png"].size == images["samples.png"].size == (GRID, GRID)
    # 3 of 8 latent dims in use: 3 rows (padding dims are never traversed), 9 values -3..3
    traversal = np.asarray(images["traversal.png"])
    assert traversal.shape == (3 * 56 + 2 * 2, 9 * 56 + 8 * 2)
    for row in range(3):
        tiles = [traversal[row * 58 : row * 58 + 56, c * 58 : c * 58 + 56] for c in range(9)]
        assert not np.array_equal(tiles[0], tiles[-1])  # the varied dim changes the picture
    again = render_images(model, splits.val, splits.image_shape, seed=5, traversal=False, captions=False)
    assert list(again) == ["reconstructions.png", "samples.png"]
    for name in again:
        assert np.array_equal(np.asarray(again[name]), np.asarray(images[name]))
    other = render_images(model, splits.val, splits.image_shape, seed=6, traversal=False, captions=False)
    assert not np.array_equal(np.asarray(other["samples.png"]), np.asarray(images["samples.png"]))


def test_render_images_without_pillow_fails_before_any_work(
    small_npz: Path, tiny, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, splits = _model(small_npz, tiny, latent=3, latent_max=8)
    calls: list[int] = []
    monkeypatch.setattr(model, "encode", lambda *a: calls.append(1))  # the first step of rendering
    monkeypatch.setitem(sys.modules, "PIL", None)  # as on a slim worker host
    with pytest.raises(ImagesUnavailable, match="pip install pillow"):
        render_images(model, splits.val, splits.image_shape, seed=5, traversal=True)
    assert calls == []


def test_traversal_dims_are_the_used_dims_with_the_most_kl() -> None:
    kl = torch.tensor([0.5, 3.0, 0.0, 2.0, 9.0, 1.0, 4.0, 0.2, 0.3, 5.0])
    mask = torch.tensor([1.0] * 4 + [0.0] + [1.0] * 5)  # dim 4 is padding: never chosen
    assert traversal_dims(kl, mask) == [9, 6, 1, 3, 5, 0, 8, 7]  # top 8 of 9 used dims, largest first
    assert traversal_dims(kl, mask, k=2) == [9, 6]
    assert traversal_dims(kl[:3], torch.tensor([1.0, 1.0, 0.0])) == [1, 0]


def test_render_and_upload_cost_well_under_a_second(tmp_path: Path, small_npz: Path, tiny) -> None:
    # the default model size (hidden 512, latent 32) on CPU; three images, as for a new best
    model, splits = _model(small_npz, tiny, latent=32, latent_max=32, hidden=512)
    url = f"sqlite:///{tmp_path}/t.db"
    study = optuna.create_study(storage=url, study_name="t")
    store = artifact_store(url)
    render_images(model, splits.val, splits.image_shape, seed=0, traversal=True)  # warm-up (first-call costs)
    costs = []
    for _ in range(3):
        trial = study.ask()
        start = time.perf_counter()
        images = render_images(model, splits.val, splits.image_shape, 0, traversal=True)
        set_trial_attrs(trial, system=save_images(images, store))
        costs.append(time.perf_counter() - start)
        study.tell(trial, 1.0)
    assert min(costs) < 0.5, costs
    assert all(len(trial_images(study, t, store)) == 3 for t in study.trials)


def test_a_broken_store_does_not_fail_the_trial(tmp_path: Path, small_npz: Path) -> None:
    url, study = _study(tmp_path, small_npz, "broken", [{"optim.lr": 1e-2, "model.latent": 8}], epochs=1)
    log: list[str] = []
    worker = Worker(url, "broken", slots=1, device="cpu", artifacts=tmp_path / "art", log=log.append)
    root = tmp_path / "art" / "optuna"
    root.rmdir()
    root.write_text("the store's folder is gone: every write fails")  # what a lost mount looks like
    summary = worker.run()
    (t,) = study.get_trials()
    assert t.state == TrialState.COMPLETE and summary.complete == 1
    assert t.values[0] == pytest.approx(t.user_attrs["iwae_nll"])  # the trial's results are all there
    assert t.user_attrs["artifact_error"].startswith("NotADirectoryError")
    assert any("images not stored" in line for line in log)
    root.unlink()
    # files are written before the attrs that point at them: the trial records no missing artifact
    assert get_all_artifact_meta(t, storage=study._storage) == []
    assert trial_images(study, t, artifact_store(url, tmp_path / "art")) == {}
