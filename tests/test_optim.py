"""tuner.vae.optim.StackedOptimizer against torch.optim run on each slot's slice alone."""

from __future__ import annotations

import io

import pytest
import torch

from tuner.vae.optim import StackedOptimizer

S = 4
FUSED = True  # set per test by the `impl` fixture: every test runs on both update paths


@pytest.fixture(autouse=True, params=[True, False], ids=["fused", "vectorized"])
def impl(request: pytest.FixtureRequest):
    """The fused per-slot kernels (CPU default) and the vectorized all-slots update (GPU default)."""
    global FUSED
    FUSED = request.param
    yield request.param
SHAPES = ((S, 5, 3), (S, 3))  # a weight and a bias, slot axis first
LRS = (1e-3, 3e-3, 1e-2, 5e-4)
CONFIGS = (  # per slot: betas, eps, weight_decay, momentum
    dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, momentum=0.9),
    dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, momentum=0.5),
    dict(betas=(0.5, 0.9), eps=1e-7, weight_decay=0.01, momentum=0.0),
    dict(betas=(0.95, 0.98), eps=1e-8, weight_decay=0.3, momentum=0.99),
)


def _reference(kind: str, param: torch.Tensor, slot: int, lr: float) -> torch.optim.Optimizer:
    """The torch optimizer the stacked one must match on ``slot``."""
    c = CONFIGS[slot]
    adam_args = dict(lr=lr, betas=c["betas"], eps=c["eps"], weight_decay=c["weight_decay"])
    if kind == "adam":
        return torch.optim.Adam([param], **adam_args)
    if kind == "adamw":
        return torch.optim.AdamW([param], **adam_args)
    return torch.optim.SGD([param], lr=lr, momentum=c["momentum"], weight_decay=c["weight_decay"])


class Setup:
    """Stacked params + StackedOptimizer, and per (slot, param) reference params + torch optimizers."""

    def __init__(self, kind: str, seed: int = 0, fused: bool | None = None):
        g = torch.Generator().manual_seed(seed)
        self.kind = kind
        self.params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in SHAPES]
        self.opt = StackedOptimizer(self.params, kind, slots=S, fused=FUSED if fused is None else fused)
        for slot in range(S):
            self.opt.configure_slot(slot, **CONFIGS[slot])
        self.refs = [[torch.nn.Parameter(p[slot].detach().clone()) for p in self.params] for slot in range(S)]
        self.ref_opts = [self._fresh_reference(slot) for slot in range(S)]

    def _fresh_reference(self, slot: int) -> list[torch.optim.Optimizer]:
        return [_reference(self.kind, r, slot, LRS[slot]) for r in self.refs[slot]]

    def reset(self, slot: int) -> None:
        self.opt.reset_slot(slot)
        self.ref_opts[slot] = self._fresh_reference(slot)

    def step(self, grads: list[torch.Tensor], lr: torch.Tensor, active: torch.Tensor) -> None:
        for p, g in zip(self.params, grads):
            p.grad = g.clone()
        self.opt.step(lr, active)
        for slot in range(S):
            if not active[slot]:
                continue
            for r, o, g in zip(self.refs[slot], self.ref_opts[slot], grads):
                r.grad = g[slot].clone()
                o.param_groups[0]["lr"] = float(lr[slot])
                o.step()

    def assert_matches(self, slots=range(S), atol: float = 1e-6) -> None:
        for slot in slots:
            for p, r in zip(self.params, self.refs[slot]):
                torch.testing.assert_close(p[slot].detach(), r.detach(), atol=atol, rtol=0)


def _grads(g: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(shape, generator=g) for shape in SHAPES]


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_matches_torch_per_slot_with_schedule_and_inactive_steps(kind):
    setup = Setup(kind)
    g = torch.Generator().manual_seed(1)
    moved = [p.detach().clone() for p in setup.params]
    for t in range(20):
        lr = torch.tensor(LRS) * (1.0 + 0.05 * t)  # a per-slot lr that changes every step
        active = torch.tensor([True, True, t % 3 != 0, t % 2 == 0])  # slots 2, 3 skip some steps
        setup.step(_grads(g), lr, active)
    setup.assert_matches()
    assert setup.opt.steps.tolist() == [20.0, 20.0, 13.0, 10.0]
    for p, before in zip(setup.params, moved):
        assert (p.detach() - before).abs().amin(dim=tuple(range(1, p.dim()))).gt(0).all()  # every slot moved


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_reset_slot_matches_a_fresh_optimizer(kind):
    setup = Setup(kind)
    g = torch.Generator().manual_seed(2)
    lr, active = torch.tensor(LRS), torch.ones(S, dtype=torch.bool)
    for _ in range(5):
        setup.step(_grads(g), lr, active)
    setup.reset(2)
    assert setup.opt.steps.tolist() == [5.0, 5.0, 0.0, 5.0]
    before = [p[2].detach().clone() for p in setup.params]
    setup.step(_grads(g), lr, active)
    setup.assert_matches()
    if kind != "sgd":  # Adam's first update has size ~lr per element (bias correction at step 1)
        first = (setup.params[0][2].detach() - before[0]).abs()
        assert first.mean().item() == pytest.approx(LRS[2], rel=0.1)


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_inactive_slots_stay_bit_identical_even_with_nan_grads(kind):
    setup = Setup(kind)
    g = torch.Generator().manual_seed(3)
    lr = torch.tensor(LRS)
    setup.step(_grads(g), lr, torch.ones(S, dtype=torch.bool))
    params = [p.detach().clone() for p in setup.params]
    state = {k: [b.clone() for b in v] for k, v in setup.opt.state.items()}
    grads = _grads(g)
    for grad in grads:
        grad[1] = float("nan")
        grad[3, 0] = float("inf")
    setup.step(grads, lr, torch.tensor([True, False, True, False]))
    for p, before in zip(setup.params, params):
        assert torch.equal(p[1], before[1]) and torch.equal(p[3], before[3])
        assert not torch.equal(p[0], before[0]) and not torch.equal(p[2], before[2])
    for name, bufs in setup.opt.state.items():
        for buf, before in zip(bufs, state[name]):
            assert torch.equal(buf[1], before[1]) and torch.equal(buf[3], before[3])
    assert setup.opt.steps.tolist() == [2.0, 1.0, 2.0, 1.0]
    setup.assert_matches()


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_nan_grad_in_an_active_slot_does_not_leak(kind):
    setup = Setup(kind)
    g = torch.Generator().manual_seed(4)
    lr, active = torch.tensor(LRS), torch.ones(S, dtype=torch.bool)
    for t in range(4):
        grads = _grads(g)
        if t == 1:
            grads[0][2, 0, 0] = float("nan")
        for p, grad in zip(setup.params, grads):
            p.grad = grad.clone()
        setup.opt.clip_grad_norm_(torch.full((S,), 1.0))  # the NaN norm of slot 2 must not spread either
        clipped = [p.grad.clone() for p in setup.params]
        setup.step(clipped, lr, active)
    assert torch.isnan(setup.params[0][2]).any()
    setup.assert_matches(slots=[0, 1, 3])
    for p in setup.params:
        assert torch.isfinite(p[[0, 1, 3]]).all()


def test_per_slot_clipping_equals_torch_on_each_slot():
    g = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in SHAPES]
    params.append(torch.nn.Parameter(torch.zeros(S, 2)))  # no gradient: skipped
    opt = StackedOptimizer(params, "adam", slots=S)
    grads = [torch.randn(shape, generator=g) * 3 for shape in SHAPES]
    for p, grad in zip(params, grads):
        p.grad = grad.clone()
    max_norm = torch.tensor([1.0, 0.0, float("inf"), 100.0])  # clip, off, off, above the norm
    norms = opt.clip_grad_norm_(max_norm)
    for slot in range(S):
        alone = [grad[slot].clone() for grad in grads]
        refs = [torch.nn.Parameter(torch.zeros_like(a)) for a in alone]
        for r, a in zip(refs, alone):
            r.grad = a
        want_norm = torch.linalg.vector_norm(torch.cat([a.flatten() for a in alone]))
        if max_norm[slot] > 0 and torch.isfinite(max_norm[slot]):
            want_norm = torch.nn.utils.clip_grad_norm_(refs, max_norm[slot].item())
        torch.testing.assert_close(norms[slot], want_norm, atol=1e-5, rtol=1e-6)
        for p, r in zip(params, refs):
            torch.testing.assert_close(p.grad[slot], r.grad, atol=1e-6, rtol=0)
    assert norms[0].item() > 1.0 and norms[3].item() < 100.0
    clipped = torch.sqrt(sum(p.grad[0].pow(2).sum() for p in params[:2]))
    assert clipped.item() == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(params[0].grad[1], grads[0][1]) and torch.equal(params[0].grad[2], grads[0][2])
    assert params[2].grad is None


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_slot_state_round_trip_into_another_slot(kind):
    a = Setup(kind)
    g = torch.Generator().manual_seed(6)
    lr, active = torch.tensor(LRS), torch.ones(S, dtype=torch.bool)
    for _ in range(5):
        a.step(_grads(g), lr, active)
    buffer = io.BytesIO()
    torch.save(a.opt.slot_state(1), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert all(t.device.type == "cpu" for t in state.values())
    assert state["steps"].item() == 5.0

    # a second population with other weights and other settings; slot 3 takes over slot 1
    b = Setup(kind, seed=7)
    with torch.no_grad():
        for pa, pb in zip(a.params, b.params):
            pb[3] = pa[1]
    b.opt.load_slot_state(3, state)
    assert b.opt.steps[3].item() == 5.0 and b.opt.beta1[3].item() == pytest.approx(0.8)
    for _ in range(5):
        grads_a = _grads(g)
        grads_b = [torch.randn(shape) for shape in SHAPES]
        for gb, ga in zip(grads_b, grads_a):
            gb[3] = ga[1]
        lr_b = torch.tensor([0.1, 0.2, 0.3, LRS[1]])
        for p, grad in zip(a.params, grads_a):
            p.grad = grad
        for p, grad in zip(b.params, grads_b):
            p.grad = grad
        a.opt.step(lr, active)
        b.opt.step(lr_b, active)
        for pa, pb in zip(a.params, b.params):
            assert torch.equal(pa[1], pb[3])


def test_load_slot_state_rejects_a_mismatched_state():
    adam = StackedOptimizer([torch.nn.Parameter(torch.zeros(S, 3))], "adam", slots=S)
    sgd = StackedOptimizer([torch.nn.Parameter(torch.zeros(S, 3))], "sgd", slots=S)
    with pytest.raises(ValueError, match="missing"):
        sgd.load_slot_state(0, adam.slot_state(0))
    wide = StackedOptimizer([torch.nn.Parameter(torch.zeros(S, 4))], "adam", slots=S)
    with pytest.raises(ValueError, match="shape"):
        wide.load_slot_state(0, adam.slot_state(0))


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's import
class TestCompiledUpdate:
    """The torch.compile'd update (CUDA's default path), compiled here by inductor's CPU backend:
    it must agree with torch.optim on each slot alone and with the vectorized path, and leave
    inactive slots bit-identical."""

    @pytest.fixture(autouse=True)
    def impl(self):  # replaces the module's fused/vectorized parametrization: these tests pick paths
        yield "compiled"

    @pytest.mark.slow  # inductor compiles C++ on first use: ~18 s for the first kind, ~4 s each after
    @pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
    def test_matches_torch_and_the_vectorized_path(self, kind):
        compiled, vectorized = Setup(kind, fused=False), Setup(kind, fused=False)
        compiled.opt.update = "compiled"
        g = torch.Generator().manual_seed(1)
        for t in range(20):
            lr = torch.tensor(LRS) * (1.0 + 0.05 * t)
            active = torch.tensor([True, True, t % 3 != 0, t % 2 == 0])
            grads = _grads(g)
            for grad in grads:  # an inactive slot's gradient may hold anything
                grad[~active] = float("nan")
            params = [p.detach().clone() for p in compiled.params]
            state = {k: [b.clone() for b in v] for k, v in compiled.opt.state.items()}
            compiled.step(grads, lr, active)
            vectorized.step(grads, lr, active)
            for p, before in zip(compiled.params, params):
                assert torch.equal(p[~active], before[~active])
            for name, bufs in compiled.opt.state.items():
                for buf, before in zip(bufs, state[name]):
                    assert torch.equal(buf[~active], before[~active])
        assert compiled.opt.update == "compiled"  # compiled and ran: no fallback
        assert compiled.opt.steps.tolist() == [20.0, 20.0, 13.0, 10.0]
        compiled.assert_matches()
        for p, q in zip(compiled.params, vectorized.params):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0)

    def test_a_failure_warns_once_and_each_parameter_is_updated_once(self, monkeypatch):
        from tuner.vae import optim

        calls = []

        def fails_on_the_second_parameter(*args, **kwargs):
            calls.append(args[0].shape)
            if len(calls) == 2:
                raise RuntimeError("no C++ compiler\nsecond line")
            return optim._update(*args, **kwargs)

        monkeypatch.setattr(optim, "_compiled_update", fails_on_the_second_parameter)
        setup = Setup("adamw", fused=False)
        setup.opt.update = "compiled"
        g = torch.Generator().manual_seed(2)
        with pytest.warns(RuntimeWarning) as record:
            for _ in range(3):
                setup.step(_grads(g), torch.tensor(LRS), torch.ones(S, dtype=torch.bool))
        messages = [str(w.message) for w in record if "compiled" in str(w.message)]
        assert messages == [
            "StackedOptimizer: the compiled adamw update failed (RuntimeError: no C++ compiler); "
            "using the vectorized update from now on"
        ]
        assert setup.opt.update == "vectorized" and len(calls) == 2
        setup.assert_matches()  # the first parameter took the compiled step, the second the vectorized one

    def test_update_modes(self):
        p = [torch.nn.Parameter(torch.zeros(S, 3))]
        assert StackedOptimizer(p, "adam", slots=S).update == "per_slot"  # auto on a CPU
        assert StackedOptimizer(p, "adam", slots=S, update="compiled").update == "compiled"
        assert StackedOptimizer(p, "adam", slots=S, fused=False).update == "vectorized"
        opt = StackedOptimizer(p, "adam", slots=S, update="vectorized")
        assert not opt.fused
        opt.fused = True
        assert opt.update == "per_slot"
        with pytest.raises(ValueError, match="update must be one of .* but got update='fast'"):
            StackedOptimizer(p, "adam", slots=S, update="fast")
