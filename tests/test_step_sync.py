"""The training step never waits on the host (tuner.vae.engine): no host-to-device copy and no
device-to-host read in `Population.train_epoch`, and one read-back per `run_epoch`.

On CUDA each of those is a sync (the host stops queueing work until the GPU catches up) and an error
under CUDA graph capture. A CPU has no devices to tell apart, so the test counts the operations
that would sync or copy on CUDA: scalar reads (`_local_scalar_dense`, `item`, `is_nonzero`), tensors
made from Python data (`lift_fresh`, what `torch.tensor(...)` and `t[i] = 3.0` dispatch), `_to_copy`
to a device, `copy_` from such a fresh tensor, and Python-level reads that dispatch nothing
(`tolist`, `numpy`). The optimizer takes CUDA's path: the compiled update's function, run eagerly so
that the dispatch mode sees every op inside it (torch.compile steps aside under a dispatch mode).
"""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tuner.vae import optim
from tuner.vae.engine import Population

SCALAR_READS = {"_local_scalar_dense", "item", "is_nonzero"}
FRESH = {"lift_fresh", "lift_fresh_copy"}

FAMILIES: dict[str, dict[str, Any]] = {
    "mlp": {},
    "conv": {"arch": "conv", "channels": 4},
    "gaussian": {"likelihood": "gaussian"},
    "iaf": {"posterior": "iaf", "flow_steps": 2},
    "mog": {"prior": "mog", "prior_components": 3},
    "vamp": {"prior": "vamp", "prior_components": 3},
    "ladder": {"hierarchy": "ladder", "latent2": 4},
    "diffusion": {"prior": "diffusion", "diffusion_steps": 4, "diffusion_hidden": 8},
    "mixture": {"mixture": 2},
    "ortho": {"ortho_weight": 30.0},
}


class CountSyncs(TorchDispatchMode):
    """Records every op that would copy host data to the device or read device data on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []
        self.active = False
        self._fresh: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()

    def __enter__(self) -> CountSyncs:
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.active = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SCALAR_READS or name in FRESH or (name == "_to_copy" and "device" in kwargs):
            self.seen.append(str(func))
        if name == "copy_" and len(args) > 1 and isinstance(args[1], torch.Tensor) and args[1] in self._fresh:
            self.seen.append(f"{func} from a tensor made on the host")
        out = func(*args, **kwargs)
        if name in FRESH:
            self._fresh.add(out)
        return out


@pytest.fixture
def count_syncs(monkeypatch: pytest.MonkeyPatch) -> CountSyncs:
    """A CountSyncs mode (enter it with `with`) that also records Tensor.tolist/numpy calls made
    while it is active: host reads that dispatch no op."""
    mode = CountSyncs()
    for method in ("tolist", "numpy"):
        original = getattr(torch.Tensor, method)

        def reading(self, *args, _original=original, _name=method, **kwargs):
            if mode.active:
                mode.seen.append(f"Tensor.{_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, reading)
    return mode


def cuda_path(pop: Population) -> Population:
    """The optimizer path CUDA takes (`compiled`), with the function left uncompiled."""
    pop.optimizer.update = "compiled"
    return pop


@pytest.fixture
def eager_update(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optim, "_compiled_update", optim._update)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_train_epoch_makes_no_host_copy_or_read(family, tiny, splits_for, count_syncs, eager_update) -> None:
    # every host-side switch on: dropout, clipping, weight decay, dynamic binarization, a warmup
    configs = [
        tiny(seed=1, model={**FAMILIES[family], "dropout": 0.1}, optim={"grad_clip": 5.0, "weight_decay": 0.01}),
        tiny(seed=2, model=FAMILIES[family], optim={"warmup_epochs": 1, "decay": "cosine"}),
    ]
    splits = splits_for(configs[0])
    assert splits.binarize == "dynamic"
    pop = cuda_path(Population.for_configs(configs, splits))
    assert pop._clipping and pop.optimizer._decay and pop.model._any_dropout and pop.steps_per_epoch >= 10
    with count_syncs as mode:
        out = pop.train_epoch()
    assert mode.seen == []  # zero in every one of the epoch's steps
    assert pop.optimizer.update == "compiled" and bool(out["finite"].all())


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_compiled_update_function_makes_no_host_copy_or_read(kind, count_syncs) -> None:
    """The function torch.compile fuses on CUDA, run eagerly under the mode: every op visible."""
    p = torch.nn.Parameter(torch.randn(3, 4, 5))
    p.grad = torch.randn(3, 4, 5)
    opt = optim.StackedOptimizer([p], kind, slots=3, update="vectorized")
    opt.configure_slot(1, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, momentum=0.5)
    view = (3, 1, 1)
    hp = [getattr(opt, n).view(view) for n in ("beta1", "beta2", "eps", "weight_decay", "momentum")]
    buffers = [bufs[0] for bufs in opt.state.values()] + ([None] if kind == "sgd" else [])
    lr, on, steps = torch.full(view, 1e-3), torch.tensor([True, False, True]).view(view), torch.ones(view)
    before = p.detach().clone()
    with count_syncs as mode, torch.no_grad():
        optim._update(p, p.grad, *buffers, lr, on, *hp, steps, kind)
    assert mode.seen == []
    assert torch.equal(p[1], before[1]) and not torch.equal(p[0], before[0])


def test_run_epoch_reads_back_once_and_copies_nothing_up(tiny, splits_for, count_syncs, eager_update) -> None:
    configs = [tiny(seed=1, train={"epochs": 3}), tiny(seed=2, model={"dropout": 0.1}, train={"epochs": 3})]
    pop = cuda_path(Population.for_configs(configs, splits_for(configs[0])))
    pop.run_epoch()  # the first epoch after assign: best values already match (inf)
    with count_syncs as mode:
        results = pop.run_epoch()  # no slot finishes in epoch 2: no status written to the device
    assert [r.status for r in results] == ["running", "running"]
    assert mode.seen == ["Tensor.tolist"]
    # the best-weights decision stayed on the device and agrees with the host's bookkeeping
    assert pop.best_val.tolist() == [st.best_val for st in pop.state]
