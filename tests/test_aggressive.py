"""Aggressive encoder training (tuner.vae.aggressive, ``train.aggressive_epochs``, He et al. 2019): the
encoder/decoder split of every family's weights, the two-clock optimizer against two torch Adams,
which columns move in the inner and the decoder steps, slots with and without it sharing a
population bit for bit, checkpoint resume mid-phase, the ``inner_steps`` history, `tuner train` +
`load_run`, and the config's errors and export.

The inner loop is shortened here (CHECK_EVERY 2, MAX_INNER 6) so an aggressive epoch costs a few
ordinary ones; the `tuner train` subprocess runs the real constants on two steps an epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from population_runs import history, run, straight_and_resumed
from test_families import train_one_epoch
from test_step_sync import FAMILIES, count_syncs, cuda_path, eager_update  # noqa: F401  (fixtures)

from tuner.errors import TunerError
from tuner.results.exported_config import settings_that_apply
from tuner.spec import parse_config
from tuner.train import load_run
from tuner.vae import aggressive
from tuner.vae.engine import Population
from tuner.vae.optim import StackedOptimizer
from tuner.vae.population import PopulationShape

SMALL = {"latent": 4, "hidden": 32}  # with batches of 256: two steps an epoch


@pytest.fixture
def short_inner(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aggressive, "CHECK_EVERY", 2)
    monkeypatch.setattr(aggressive, "MAX_INNER", 6)


def small(tiny, seed: int, aggressive_epochs: int, epochs: int = 2, batch_size: int = 256, **model):
    return tiny(seed=seed, data={"binarize": "static"}, model={**SMALL, **model}, optim={"batch_size": batch_size},
                train={"epochs": epochs, "aggressive_epochs": aggressive_epochs})


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_split_covers_every_weight_once_and_the_encoder_is_what_computes_q(family, tiny, splits_for) -> None:
    cfg = tiny(model=FAMILIES[family])
    pop = Population(PopulationShape.of(cfg), splits_for(cfg), slots=1, latent_max=8, hidden_max=64)
    pop.assign(0, cfg)
    mask = aggressive.encoder_columns(pop.names, pop.offsets)
    assert mask.shape == (pop.flat.shape[1],)  # one flag per column: each weight on exactly one side
    encoder = {n for n in pop.names if aggressive.is_encoder(n)}
    # autograd, not the prefix list: the weights q(z|x)'s local parameters depend on are the encoder's
    local = pop.model.local_posterior(pop.splits.val[:8].unsqueeze(0))
    grads = torch.autograd.grad(sum(v.sum() for v in local.values()), pop.params, allow_unused=True)
    touched = {n for n, g in zip(pop.names, grads) if g is not None and bool(g.abs().sum() > 0)}
    assert touched <= encoder and {n for n in encoder - touched if not n.startswith("flow.")} == set()
    assert any(n.startswith("dec_out.") for n in set(pop.names) - encoder)
    for name, (a, b) in zip(pop.names, pop.offsets):
        assert bool(mask[a:b].all()) if name in encoder else not bool(mask[a:b].any())
    if family == "ladder":  # the bottom-up q(z2|x) is the encoder's; the top-down p(z1|z2) the decoder's
        assert "ladder.up_mu.weight" in encoder and "ladder.down_mu.weight" not in encoder
    assert not aggressive.is_encoder("diffusion.net.0.weight") and aggressive.is_encoder("mixture.enc_mu.weight")


@pytest.mark.parametrize("update", ["per_slot", "vectorized"])
def test_step_columns_equals_two_torch_adams_one_per_part(update) -> None:
    """He et al.'s two optimizers: the encoder's columns and the decoder's, each with its own clock."""
    g = torch.Generator().manual_seed(3)
    flat = torch.nn.Parameter(torch.randn(3, 10, generator=g))
    enc = torch.tensor([True] * 3 + [False] * 4 + [True] * 2 + [False])
    opt = StackedOptimizer([flat], "adam", slots=3, update=update)
    opt.set_encoder_columns(enc)
    parts = [torch.nn.Parameter(flat[1, enc].detach().clone()), torch.nn.Parameter(flat[1, ~enc].detach().clone())]
    torch_opts = [torch.optim.Adam([p], lr=0.01) for p in parts]
    frozen = flat[0].detach().clone()
    for part in ("encoder", "encoder", "encoder", "decoder", "both", "encoder", "both"):
        grad = torch.randn(3, 10, generator=g)
        flat.grad = grad.clone()
        opt.step_columns(torch.full((3,), 0.01), torch.tensor([False, True, True]), part)
        for i, (p, o) in enumerate(zip(parts, torch_opts)):
            if part in ("both", ("encoder", "decoder")[i]):
                p.grad = grad[1, enc if i == 0 else ~enc].clone()
                o.step()
    assert torch.allclose(flat[1, enc], parts[0], atol=1e-6) and torch.allclose(flat[1, ~enc], parts[1], atol=1e-6)
    assert torch.equal(flat[0], frozen) and opt.steps.tolist() == [0, 3, 3] and opt.encoder_steps.tolist() == [0, 6, 6]


def test_inner_steps_move_only_the_encoder_and_the_decoder_step_only_the_decoder(tiny, splits_for, short_inner) -> None:
    configs = [small(tiny, 1, 1, epochs=1), small(tiny, 2, 0, epochs=1)]
    pop = Population.for_configs(configs, splits_for(configs[0]))
    enc = aggressive.encoder_columns(pop.names, pop.offsets)
    opt, moved = pop.optimizer, []
    original = opt.step_columns

    def watched(lr, active, part):
        before = (pop.flat.detach().clone(), opt.state["exp_avg"][0].clone())
        original(lr, active, part)
        after = (pop.flat.detach(), opt.state["exp_avg"][0])
        for what, b, a in zip(("weights", "moments"), before, after):
            changed = b != a  # (S, P)
            moved.append((part, what, bool(changed[0][enc].any()), bool(changed[0][~enc].any()), bool(changed[1].any())))

    opt.step_columns = watched
    pop.run_epoch()
    inner = [m for m in moved if m[0] == "encoder"]
    decoder = [m for m in moved if m[0] == "decoder"]
    assert inner and decoder and not any(any(m[2:]) for m in moved if m[0] == "both")  # none is past its phase
    assert all(e and not d and not plain for _, _, e, d, plain in inner)  # slot 0's encoder alone
    assert all(d and not e and not plain for _, _, e, d, plain in decoder)  # slot 0's decoder alone
    steps = pop.steps_per_epoch
    assert opt.steps.tolist() == [steps, steps]  # one decoder (slot 0) or joint (slot 1) update per step
    assert opt.encoder_steps[0] == history(pop, 0, "inner_steps")[0] * steps >= 2 * 2 * steps
    assert opt.encoder_steps[1] == 0 and history(pop, 1, "inner_steps") == [0.0]


def test_slots_with_and_without_it_share_a_population_and_train_as_alone(tiny, splits_for, short_inner) -> None:
    configs = [small(tiny, 1, 1), small(tiny, 2, 0, latent=8)]  # wider maxima together
    assert len({PopulationShape.of(c) for c in configs}) == 1  # per slot: no split
    splits = splits_for(configs[0])
    together = Population.for_configs(configs, splits)
    run(together)
    for slot, config in enumerate(configs):
        alone = Population.for_configs([config], splits)
        run(alone)
        for key in ("val_neg_elbo", "train_loss", "inner_steps"):
            assert history(together, slot, key) == history(alone, 0, key), (slot, key)  # bit for bit on the CPU
    inner = [history(together, s, "inner_steps") for s in range(2)]
    assert inner[0][0] >= 4 and inner[0][1] == 0.0 and inner[1] == [0.0, 0.0]  # its aggressive epoch, then joint


def test_resume_mid_phase_equals_uninterrupted(tiny, splits_for, short_inner, tmp_path: Path) -> None:
    cfg = small(tiny, 5, 2)
    wider = small(tiny, 9, 0, latent=6, hidden=40)  # wider maxima, a slot outside its phase beside it
    straight, resumed, ckpt = straight_and_resumed(cfg, [wider], splits_for(cfg), tmp_path)
    assert float(ckpt["optimizer"]["encoder_steps"]) > float(ckpt["optimizer"]["steps"]) > 0  # both clocks saved
    for key in ("val_neg_elbo", "inner_steps"):
        assert history(resumed, 1, key) == history(straight, 0, key)
    assert min(history(straight, 0, "inner_steps")) > 0


def test_tuner_train_runs_it_and_load_run_reloads(tiny, small_npz: Path, tmp_path: Path) -> None:
    # the real inner loop costs 20 to 100 epochs' worth of steps: 150 digits (105 train), one step an epoch
    np.savez(tmp_path / "d150.npz", x=np.load(small_npz)["x"][:150])
    raw = tiny(seed=4, data={"dataset": f"npz:{tmp_path / 'd150.npz'}", "binarize": "static"}, model=SMALL,
               optim={"batch_size": 100}, train={"aggressive_epochs": 1, "gap_examples": 0}).model_dump(mode="json")
    m = train_one_epoch(raw, tmp_path)
    assert m["neg_elbo"] == pytest.approx(m["recon"] + m["kl"], rel=1e-5)
    inner = pd.read_csv(tmp_path / "run" / "history.csv")["inner_steps"]
    assert 2 * aggressive.CHECK_EVERY <= inner[0] <= aggressive.MAX_INNER
    cfg, _ = load_run(tmp_path / "run")
    assert cfg.train.aggressive_epochs == 1


def test_config_errors_and_export() -> None:
    with pytest.raises(TunerError, match="train.aggressive_epochs") as error:
        parse_config({"train": {"aggressive_epochs": -1}})
    assert "\n" not in str(error.value).strip()
    assert settings_that_apply(parse_config({"train": {"aggressive_epochs": 5}}))["train"]["aggressive_epochs"] == 5
    assert "aggressive_epochs" not in settings_that_apply(parse_config({}))["train"]
    from quality import family_config  # benchmarks/ (conftest puts it on the path)

    row = family_config(parse_config({}), "aggressive")
    assert row.train.aggressive_epochs > 0 and row.model == parse_config({}).model


def test_past_its_phase_a_slot_adds_no_host_copy_or_read_to_the_step(tiny, splits_for, short_inner, count_syncs,
                                                                       eager_update) -> None:
    """After the phase, two-clock joint updates on CUDA's path (the compiled update, run eagerly):
    no sync, so such a population still runs as a CUDA graph."""
    configs = [small(tiny, 1, 1, epochs=3), small(tiny, 2, 0, epochs=3)]
    pop = cuda_path(Population.for_configs(configs, splits_for(configs[0])))
    pop.run_epoch()  # slot 0's aggressive epoch
    assert aggressive.in_use(pop) and not aggressive.in_phase(pop)
    steps, encoder_steps = pop.optimizer.steps.clone(), pop.optimizer.encoder_steps.clone()
    with count_syncs as mode:
        out = pop.train_epoch()
    assert mode.seen == [] and bool(out["finite"].all())
    assert (pop.optimizer.steps - steps).tolist() == [2.0, 2.0]  # both slots: one update a step
    assert (pop.optimizer.encoder_steps - encoder_steps).tolist() == [2.0, 0.0]  # slot 0's encoder clock too
