"""tuner.vae.engine: a slot in a population trains exactly like the same config alone, resumes from a
checkpoint as if never stopped, is isolated from a diverging neighbour, and refills cleanly."""

from __future__ import annotations

import math

import pytest
import torch
from population_runs import history, run, straight_and_resumed

from tuner.vae.engine import Population
from tuner.vae.population import PopulationShape


def slot_params(pop: Population, slot: int) -> list[torch.Tensor]:
    """The slot's weights, trimmed to what a population of one of this config would hold."""
    return [p[slot].detach().clone() for p in pop.params]


def trimmed_equal(big: list[torch.Tensor], small: list[torch.Tensor], atol: float) -> bool:
    for b, s in zip(big, small):
        region = tuple(slice(0, n) for n in s.shape)
        if not torch.allclose(b[region], s, atol=atol, rtol=1e-4):
            return False
        pad = b.clone()
        pad[region] = 0
        if pad.abs().max() != 0:  # padding must have stayed exactly zero
            return False
    return True


def mixed_configs(tiny):
    """Eight different configs of one shape: sizes, lr, schedules, dropout, weight decay, free bits."""
    return [
        tiny(seed=1),
        tiny(seed=2, model={"latent": 4, "hidden": 32}),
        tiny(seed=3, optim={"lr": 3e-3, "warmup_epochs": 1, "decay": "cosine"}),
        tiny(seed=4, kl={"schedule": "cyclical", "cycles": 2, "beta": 2.0}),
        tiny(seed=5, model={"dropout": 0.2}),
        tiny(seed=6, optim={"weight_decay": 1e-3, "grad_clip": 5.0}),
        tiny(seed=7, kl={"schedule": "capacity", "capacity": 5.0, "free_bits": 0.1}),
        tiny(seed=8, model={"latent": 12, "hidden": 48}, kl={"schedule": "sigmoid"}),
    ]


def test_slot_in_population_of_8_matches_alone(tiny, splits_for) -> None:
    configs = mixed_configs(tiny)
    splits = splits_for(configs[0])
    pop = Population.for_configs(configs, splits)
    assert pop.model.latent_max == 12 and pop.model.hidden_max == 64
    run(pop)
    for slot in (1, 2, 4, 6):
        alone = Population.for_configs([configs[slot]], splits)
        run(alone)
        assert history(pop, slot) == pytest.approx(history(alone, 0), rel=1e-4)
        assert history(pop, slot, "kl_weight") == pytest.approx(history(alone, 0, "kl_weight"), rel=1e-6)
        # Adam turns last-bit differences of near-zero gradients (batched vs single matmul sums)
        # into lr-sized steps, so weights agree to about lr (1e-3), while the curves agree to 1e-4
        assert trimmed_equal(slot_params(pop, slot), slot_params(alone, 0), atol=2e-3)
    # the configs really differ: different curves
    finals = [history(pop, s)[-1] for s in range(8)]
    assert len({round(v, 3) for v in finals}) == 8
    assert all(st.status == "finished" for st in pop.state)


def test_checkpoint_resume_gives_the_same_numbers(tiny, splits_for, tmp_path) -> None:
    config = tiny(train={"epochs": 3}, model={"dropout": 0.1}, optim={"decay": "cosine"})
    # resume into slot 2 of a wider population holding other runs
    other = tiny(seed=9, model={"latent": 16, "hidden": 96}, train={"epochs": 3})
    straight, resumed, _ = straight_and_resumed(config, [other, other], splits_for(config), tmp_path)
    assert history(resumed, 2) == pytest.approx(history(straight, 0), rel=1e-5)
    assert trimmed_equal(slot_params(resumed, 2), slot_params(straight, 0), atol=1e-5)


def test_diverging_slot_is_stopped_and_neighbours_are_untouched(tiny, splits_for) -> None:
    good = tiny(seed=3)
    bad = tiny(seed=4, optim={"name": "adam", "lr": 10.0}, model={"hidden": 64})
    bad = bad.model_copy(update={"optim": bad.optim.model_copy(update={"lr": 1e6})})
    splits = splits_for(good)
    pop = Population.for_configs([good, bad, good], splits)
    run(pop)
    assert pop.state[1].status == "stopped"
    assert "non-finite" in pop.state[1].reason
    # frozen weights stay finite; neighbours finish and match the config alone
    assert all(torch.isfinite(p[1]).all() for p in pop.params)
    alone = Population.for_configs([good], splits)
    run(alone)
    for slot in (0, 2):
        assert pop.state[slot].status == "finished"
        assert history(pop, slot) == pytest.approx(history(alone, 0), rel=1e-4)


def test_refilled_slot_starts_fresh(tiny, splits_for) -> None:
    a, b = tiny(seed=1, train={"epochs": 1}), tiny(seed=2, train={"epochs": 3})
    fresh = tiny(seed=5, optim={"lr": 2e-3}, train={"epochs": 2})
    splits = splits_for(a)
    pop = Population.for_configs([a, b], splits)
    pop.run_epoch()
    assert pop.state[0].status == "finished" and pop.state[1].status == "running"
    pop.assign(0, fresh)  # refill while slot 1 is mid-run
    run(pop)
    alone = Population.for_configs([fresh], splits)
    run(alone)
    # a shared Adam step count would make the refilled slot's first updates too large
    assert int(pop.optimizer.steps[0]) == int(alone.optimizer.steps[0]) == 2 * pop.steps_per_epoch
    assert history(pop, 0) == pytest.approx(history(alone, 0), rel=1e-4)


def test_early_stopping_and_best_restore(tiny, splits_for) -> None:
    # Adam at lr 0.1 plateaus and wobbles on this seeded data: val -ELBO first fails to improve at
    # epoch 7, so patience 1 ends the run there (seeded, so this repeats)
    config = tiny(optim={"lr": 0.1}, train={"epochs": 12, "patience": 1})
    pop = Population.for_configs([config], splits_for(config))
    run(pop)
    st, vals = pop.state[0], history(pop, 0)
    assert st.status == "finished" and st.reason.startswith("early stop")
    assert st.epoch < 12 and len(vals) == st.epoch
    assert vals[-1] > min(vals[:-1])
    assert st.best_epoch == vals.index(min(vals)) + 1 == st.epoch - 1
    # the restored model is the best epoch's, not the last one's
    best = pop.slot_model(0, best=True)
    check = Population.for_configs([config], pop.splits)
    with torch.no_grad():
        for p, src in zip(check.params, best.parameters()):
            p[0] = src[0]
    assert float(check.validate()["neg_elbo"][0]) == pytest.approx(min(vals), rel=1e-5)


def test_diverged_run_reports_its_epoch_and_keeps_finite_best(tiny, splits_for) -> None:
    config = tiny(optim={"name": "sgd", "lr": 0.1, "momentum": 0.9}, train={"epochs": 3})
    pop = Population.for_configs([config], splits_for(config))
    run(pop)
    st = pop.state[0]
    assert st.status == "stopped" and st.epoch == 1 and st.best_epoch == 0
    assert st.reason == "non-finite loss or gradient in epoch 1 (lr 0.1); slot frozen"
    assert all(torch.isfinite(p).all() for p in pop.slot_model(0, best=False).parameters())


def test_conv_population_matches_alone(tiny, splits_for) -> None:
    conv = {"arch": "conv", "channels": 4, "hidden": 32, "latent": 4}
    configs = [tiny(seed=s, model=conv, train={"epochs": 1}) for s in (1, 2, 3)]
    configs[1] = tiny(seed=2, model={**conv, "hidden": 16}, train={"epochs": 1})
    splits = splits_for(configs[0])
    assert PopulationShape.of(configs[0]).arch == "conv"
    pop = Population.for_configs(configs, splits)
    run(pop)
    alone = Population.for_configs([configs[1]], splits)
    run(alone)
    assert history(pop, 1) == pytest.approx(history(alone, 0), rel=1e-4)
    assert math.isfinite(history(pop, 0)[0]) and history(pop, 0)[0] < 550


def test_kl_schedule_and_lr_reach_the_slots(tiny, splits_for) -> None:
    config = tiny(kl={"schedule": "linear", "warmup_epochs": 4, "beta": 2.0}, train={"epochs": 2},
                  optim={"warmup_epochs": 4})
    pop = Population.for_configs([config], splits_for(config))
    run(pop)
    # the values logged are those of the epoch's last step: clock = epoch exactly
    assert history(pop, 0, "kl_weight") == pytest.approx([0.5, 1.0])
    assert history(pop, 0, "lr") == pytest.approx([2.5e-4, 5e-4])


def test_shape_mismatch_is_refused(tiny, splits_for) -> None:
    config = tiny()
    pop = Population.for_configs([config], splits_for(config))
    with pytest.raises(ValueError, match="does not fit"):
        pop.assign(0, tiny(optim={"batch_size": 32}))


def test_vectorized_optimizer_path_trains_like_the_fused_one(tiny, splits_for) -> None:
    """GPUs use the vectorized all-slots update (no host sync); CPUs the fused per-slot kernels."""
    configs = [tiny(seed=1, model={"dropout": 0.1}), tiny(seed=2, optim={"weight_decay": 0.01, "grad_clip": 2.0}),
               tiny(seed=3, model={"latent": 4})]
    splits = splits_for(configs[0])
    fused = Population.for_configs(configs, splits)
    vectorized = Population.for_configs(configs, splits)
    assert fused.optimizer.fused
    vectorized.optimizer.fused = False
    run(fused)
    run(vectorized)
    for s in range(3):
        assert history(vectorized, s) == pytest.approx(history(fused, s), rel=1e-4)


def test_validation_is_deterministic_and_dropout_free(tiny, splits_for) -> None:
    config = tiny(model={"dropout": 0.5})
    pop = Population.for_configs([config], splits_for(config))
    pop.run_epoch()
    a, b = pop.validate()["neg_elbo"], pop.validate()["neg_elbo"]
    assert torch.equal(a, b)
    pop.model.dropout_rate.zero_()  # the same weights without dropout: same validation value
    pop.model._any_dropout = False
    assert torch.equal(pop.validate()["neg_elbo"], a)


# ---------------------------------------------------------------- speed features, CPU-checkable parts


def test_precision_resolves_per_device(tiny, splits_for) -> None:
    config = tiny()
    splits, shape = splits_for(config), PopulationShape.of(config)

    def precision(value: str) -> str:
        return Population(shape, splits, slots=1, latent_max=8, hidden_max=64, precision=value).precision

    # TF32 is a CUDA tensor-core format: a CPU computes fp32, and that is what gets recorded
    assert [precision(p) for p in ("auto", "fp32", "tf32", "bf16")] == ["fp32", "fp32", "fp32", "bf16"]
    with pytest.raises(ValueError, match=r"precision must be one of \[.*'bf16'\], but got precision='fp16'"):
        precision("fp16")
    assert Population.for_configs([config], splits).graph.enabled is False  # no CUDA graph on a CPU


def test_bf16_autocast_trains_close_to_fp32(tiny, splits_for) -> None:
    configs = [tiny(seed=1, train={"epochs": 3}), tiny(seed=2, model={"dropout": 0.1}, train={"epochs": 3})]
    splits = splits_for(configs[0])
    fp32 = Population.for_configs(configs, splits)
    bf16 = Population.for_configs(configs, splits)
    bf16.precision = "bf16"
    run(fp32)
    run(bf16)
    for s in range(2):
        low, full = history(bf16, s), history(fp32, s)
        assert all(math.isfinite(v) for v in low) and low[-1] < low[0] - 50  # it trains
        assert low == pytest.approx(full, rel=2e-3) and low != full  # bf16 rounding, but close
        assert history(bf16, s, "train_loss") == pytest.approx(history(fp32, s, "train_loss"), rel=2e-3)
    # validation stays fp32: the same weights validate to the same number in either population
    with torch.no_grad():
        fp32.flat.copy_(bf16.flat)
    assert torch.equal(fp32.validate()["neg_elbo"], bf16.validate()["neg_elbo"])


class StandInGraph:
    """torch.cuda.CUDAGraph's part in the epoch, on a CPU: capture records the steps without running
    them; replay runs them and writes the results into the same static output tensors each time."""

    def __init__(self, steps) -> None:
        self.steps, self.outputs, self.replays = steps, {}, 0

    def replay(self) -> None:
        self.replays += 1
        for k, v in self.steps().items():
            if k in self.outputs:
                self.outputs[k].copy_(v)
            else:
                self.outputs[k] = v.clone()


def force_graph(pop: Population, monkeypatch: pytest.MonkeyPatch, capture) -> None:
    """Turn the CUDA-graph path on for a CPU population: warm-up without a side stream (a CPU has
    none), and `capture` in place of torch.cuda.graph."""
    from tuner.vae import epoch_graph

    monkeypatch.setattr(epoch_graph.EpochGraph, "_warm_up", lambda self, steps: steps())
    monkeypatch.setattr(epoch_graph, "_capture", capture)
    pop.graph.enabled = True


def test_graph_path_replays_recaptures_and_trains_exactly_like_eager(tiny, splits_for, monkeypatch) -> None:
    configs = [tiny(seed=1, train={"epochs": 5}), tiny(seed=2, model={"dropout": 0.1}, train={"epochs": 5})]
    splits = splits_for(configs[0])
    eager, graphed = Population.for_configs(configs, splits), Population.for_configs(configs, splits)
    graphs: list[StandInGraph] = []

    def capture(steps, stream):
        graphs.append(StandInGraph(steps))
        return graphs[-1], graphs[-1].outputs

    force_graph(graphed, monkeypatch, capture)
    for pop in (eager, graphed):
        for epoch in range(5):
            if epoch == 3:  # a refill that turns weight decay on: new kernels, so warm up and capture again
                pop.assign(0, tiny(seed=7, optim={"weight_decay": 0.01}, train={"epochs": 2}))
            pop.run_epoch()
    # epochs: 1 warm-up, 2 capture + replay, 3 replay, 4 (new key) warm-up, 5 capture + replay
    assert [g.replays for g in graphs] == [2, 1] and graphed.graph.captures == 2
    for s in range(2):
        assert history(graphed, s) == history(eager, s)  # bit for bit: the same eager kernels ran
        assert history(graphed, s, "train_loss") == history(eager, s, "train_loss")
    assert torch.equal(graphed.flat, eager.flat) and torch.equal(graphed.best_flat, eager.best_flat)


def test_train_epoch_returns_copies_of_the_graph_outputs(tiny, splits_for, monkeypatch) -> None:
    config = tiny(train={"epochs": 5})
    pop = Population.for_configs([config], splits_for(config))
    force_graph(pop, monkeypatch, lambda steps, stream: (g := StandInGraph(steps), g.outputs))
    pop.train_epoch()  # warm-up
    first, second = pop.train_epoch(), pop.train_epoch()  # capture + replay, replay
    assert first["neg_elbo"].data_ptr() != pop.graph.outputs["neg_elbo"].data_ptr()
    assert not torch.equal(first["neg_elbo"], second["neg_elbo"])  # the second replay did not overwrite the first


def test_failed_capture_warns_once_then_trains_eagerly_and_exactly(tiny, splits_for, monkeypatch) -> None:
    configs = [tiny(seed=1, train={"epochs": 4}), tiny(seed=2, optim={"grad_clip": 1.0}, train={"epochs": 4})]
    splits = splits_for(configs[0])
    eager, graphed = Population.for_configs(configs, splits), Population.for_configs(configs, splits)
    attempts = []

    def capture(steps, stream):  # as torch.cuda.graph refusing to capture: it records, nothing ran
        attempts.append(1)
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    force_graph(graphed, monkeypatch, capture)
    run(eager)
    with pytest.warns(RuntimeWarning) as record:
        run(graphed)
    messages = [str(w.message) for w in record if "CUDA graph" in str(w.message)]
    assert messages == [
        "CUDA graph of the training epoch failed (RuntimeError: operation not permitted when stream is "
        "capturing); this population runs eagerly from now on"
    ]
    assert len(attempts) == 1 and graphed.graph.enabled is False
    for s in range(2):
        assert history(graphed, s) == history(eager, s)
    assert torch.equal(graphed.flat, eager.flat)


def test_graph_forced_on_a_cpu_falls_back_with_one_warning(tiny, splits_for) -> None:
    config = tiny(train={"epochs": 2})
    splits = splits_for(config)
    eager, forced = Population.for_configs([config], splits), Population.for_configs([config], splits)
    forced.graph.enabled = True  # no CUDA here: making the side stream fails before anything runs
    run(eager)
    with pytest.warns(RuntimeWarning, match="CUDA graph of the training epoch failed"):
        run(forced)
    assert forced.graph.enabled is False and history(forced, 0) == history(eager, 0)


def test_best_weights_and_values_are_kept_on_the_device(tiny, splits_for, tmp_path) -> None:
    # Adam at lr 0.1 wobbles (test_early_stopping_and_best_restore): some epochs do not improve
    config = tiny(optim={"lr": 0.1}, train={"epochs": 8})
    splits = splits_for(config)
    pop = Population.for_configs([config], splits)
    weights, improved = {}, []
    while pop.running():
        (result,) = pop.run_epoch()
        weights[result.epoch] = pop.flat[0].detach().clone()
        st = pop.state[0]
        improved.append(result.improved)
        assert result.improved == (st.best_epoch == result.epoch)
        assert pop.best_val.tolist() == [st.best_val]
        assert torch.equal(pop.best_flat[0], weights[st.best_epoch])
    assert True in improved[1:] and False in improved  # both decisions were taken
    # a slot loaded from a checkpoint brings its best value: the device learns it before deciding
    first = Population.for_configs([config], splits)
    for _ in range(3):
        first.run_epoch()
    torch.save(first.slot_checkpoint(0), tmp_path / "ckpt.pt")
    resumed = Population.for_configs([tiny(seed=5), tiny(seed=6)], splits)
    resumed.load_slot_checkpoint(1, torch.load(tmp_path / "ckpt.pt", weights_only=True))
    resumed.run_epoch()
    first.run_epoch()
    assert resumed.state[1].best_val == first.state[0].best_val
    assert resumed.best_val[1].item() == first.best_val[0].item()
    assert torch.equal(resumed.best_flat[1], first.best_flat[0])


@pytest.mark.slow  # inductor compiles the update's C++ for this shape: ~20 s
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's import
def test_compiled_update_trains_like_the_vectorized_one(tiny, splits_for) -> None:
    """CUDA's default update, compiled here by inductor's CPU backend, in a whole population."""
    configs = [
        tiny(seed=1), tiny(seed=2, optim={"weight_decay": 0.01, "grad_clip": 2.0}), tiny(seed=3, model={"latent": 4}),
    ]
    splits = splits_for(configs[0])
    vectorized, compiled = Population.for_configs(configs, splits), Population.for_configs(configs, splits)
    vectorized.optimizer.update, compiled.optimizer.update = "vectorized", "compiled"
    run(vectorized)
    run(compiled)
    assert compiled.optimizer.update == "compiled"  # no fallback
    for s in range(3):
        assert history(compiled, s) == pytest.approx(history(vectorized, s), rel=1e-4)


def test_tf32_switch_is_scoped_and_keeps_both_flag_apis_readable() -> None:
    """CUDA's precision switch, checkable on any build: PyTorch raises when code reads the older
    flags (inductor's cache key does) after only the newer `fp32_precision` ones were set."""
    import warnings

    from tuner.vae.epoch_graph import tf32

    def state() -> tuple[bool, bool]:
        return torch.backends.cuda.matmul.fp32_precision == "tf32", torch.backends.cudnn.conv.fp32_precision == "tf32"

    before = state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warning either
        for enabled in (True, False, True):
            with tf32(enabled):
                assert state() == (enabled, enabled)
                assert torch.get_float32_matmul_precision() == ("high" if enabled else "highest")  # older readers work
                assert torch.backends.cuda.matmul.allow_tf32 == enabled and torch.backends.cudnn.allow_tf32 == enabled
            assert state() == before
            torch.get_float32_matmul_precision()
