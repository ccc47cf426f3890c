"""tuner.vae.noise: python-int counters fold in on the host with the same bits as tensor counters, and
the streams are pinned to the values they had before that change (recorded from the tensor-only
`derive`): a resumed checkpoint or a logged seed keeps drawing the same numbers."""

from __future__ import annotations

import pytest
import torch

from tuner.vae import noise

SEEDS = torch.tensor([0, 1, 7, 123456789, 2**40 + 5])


@pytest.fixture
def keys() -> torch.Tensor:
    return noise.keys_from_seeds(SEEDS)


@pytest.mark.parametrize(
    "counters",
    [(11,), (12, 0), (14, 3), (0,), (2**32 - 1,), (-1,), (2**33 + 7,), (2, 1, 5), (2**32 - 1, -1, 2**33 + 7)],
)
def test_int_counters_equal_the_same_counters_as_tensors(keys, counters) -> None:
    as_ints = noise.derive(keys, *counters)
    as_tensors = noise.derive(keys, *(torch.tensor(c, dtype=torch.int64) for c in counters))
    as_vectors = noise.derive(keys, *(torch.full((len(SEEDS),), c, dtype=torch.int64) for c in counters))
    assert as_ints.dtype == torch.int64
    assert torch.equal(as_ints, as_tensors) and torch.equal(as_ints, as_vectors)


def test_known_keys_and_draws_are_unchanged(keys) -> None:
    # recorded with the tensor-only derive (every int counter made into a device tensor)
    assert keys.tolist() == [0, 1753845952, 2492178918, 2834422664, 1548080446]
    assert noise.derive(keys, 11).tolist() == [871069208, 2097018661, 3450698710, 3165800604, 1077141329]
    assert noise.derive(keys, 12, 0).tolist() == [2975544701, 2175315311, 1482626821, 1296738497, 1817418108]
    assert noise.derive(keys, 14, 3).tolist() == [350942779, 3276235690, 497152797, 4267696375, 143491980]
    assert noise.derive(keys, 2**32 - 1, -1, 2**33 + 7).tolist() == [
        1626593482, 1913985395, 2199449396, 4252785314, 67142545,
    ]
    mixed = noise.derive(keys, 11, torch.tensor([0, 1, 2, 3, 4]))
    assert mixed.tolist() == [1141017351, 2746517621, 2910936869, 799009228, 2730250804]
    u = noise.uniform(noise.derive(keys, 2, 1), (3,))
    assert u[0].tolist() == [0.258125901222229, 0.7196633815765381, 0.8571394085884094]
    assert u[4].tolist() == [0.5081076622009277, 0.419802725315094, 0.6993533372879028]
    z = noise.normal(noise.derive(keys[:2], 1), (2,))
    assert z.tolist() == [[-0.6608433723449707, 0.7478794455528259], [0.5683225393295288, -0.8642423748970032]]


def test_int_counters_make_no_tensor(keys) -> None:
    """An int counter enters as a scalar operand: no torch.tensor (a host-to-device copy on CUDA)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Record():
        noise.derive(keys, 12, 3, 2**32 + 9)
    assert seen and not {"lift_fresh", "lift_fresh_copy", "_to_copy", "copy_", "_local_scalar_dense"} & set(seen)
