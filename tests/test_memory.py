"""Slot budgets and size buckets: pure rules, with a fake device-memory probe standing in for CUDA."""

from __future__ import annotations

from tuner.study.memory import SlotBudget, bucket, next_pow2


class FakeProbe:
    """Bytes as a GPU would report them: `allocated`/`free` set by the test, the peak tracked."""

    def __init__(self, free: int) -> None:
        self._free, self._allocated, self._peak = free, 0, 0

    def take(self, n: int) -> None:
        self._allocated += n
        self._free -= n
        self._peak = max(self._peak, self._allocated)

    def give(self, n: int) -> None:
        self._allocated -= n
        self._free += n

    def free(self) -> int:
        return self._free

    def allocated(self) -> int:
        return self._allocated

    def peak(self) -> int:
        return self._peak

    def reset_peak(self) -> None:
        self._peak = self._allocated


def test_buckets_are_powers_of_two_capped_by_the_space() -> None:
    assert [next_pow2(n) for n in (1, 2, 3, 5, 64, 65)] == [1, 2, 4, 8, 64, 128]
    assert [bucket(n, 64) for n in (2, 3, 7, 33, 64)] == [2, 4, 8, 64, 64]
    assert [bucket(n, 1024) for n in (128, 192, 576, 1000)] == [128, 256, 1024, 1024]
    assert bucket(100, 90) == 100  # a size above the space's largest (a fixed base value) is its own bucket


def test_budget_grows_to_the_measured_memory_and_halves_on_out_of_memory() -> None:
    probe, lines = FakeProbe(free=10_000), []
    budget = SlotBudget(4, max_slots=64, probe=probe, adaptive=True, log=lines.append)
    probe.take(50)  # something else of the process
    base = budget.baseline()
    probe.take(4 * 100)  # a population of 4 slots: 100 bytes a slot at its epoch's peak ...
    probe.give(4 * 20)  # ... of which 20 a slot were activations, freed after the epoch
    budget.measure(base, capacity=4, running=4)
    # free is 9630: 80% of it holds 77 more slots of 100 bytes, capped at max_slots
    assert budget.per_slot == 100 and budget.limit == 64 and "slots: 4 -> 64" in lines[-1]
    tight = SlotBudget(4, max_slots=64, probe=FakeProbe(free=500), adaptive=True, log=lines.append)
    tight.probe.take(400)  # 4 slots of 100: 100 bytes left, 80 of which would hold no slot
    tight.measure(0, capacity=4, running=3)
    assert tight.limit == 3  # shrunk to what runs (never below it)
    assert budget.halve() == 32 and budget.halve() == 16 and not budget.adaptive
    budget.measure(base, capacity=4, running=4)
    assert budget.limit == 16  # no growth after an out-of-memory error
    fixed = SlotBudget(8, max_slots=64, probe=probe, adaptive=False, log=lines.append)
    fixed.measure(base, capacity=8, running=8)
    assert fixed.limit == 8  # the spec's (or --slots) count stays
    cpu = SlotBudget(1, max_slots=64, probe=None, adaptive=True, log=lines.append)
    assert cpu.baseline() == 0 and (cpu.measure(0, 1, 1) or cpu.limit) == 1
    assert SlotBudget(1, 64, None, True, lines.append).halve() == 1  # never below one slot
