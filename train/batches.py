"""The global batch of each step and the samples each data-parallel rank reads from it; pure arithmetic.

A run's data position is the number of samples consumed, c. The step that starts at c takes the global
batch B = BatchSchedule.at(c) (train.global_batch_size, or a step of train.batch_ramp) and reads samples
[c, c + B); dp rank r reads its contiguous share `rank_samples(c, B, r, dp)`. So every sample index is
read once whatever the steps' sizes, the number of ranks, or where a run stopped and resumed.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .config import BatchRamp, TrainConfig


@dataclass(frozen=True)
class BatchSchedule:
    """The global batch (sequences) of a step as a function of the samples consumed before it:
    train.global_batch_size, or with train.batch_ramp Megatron's ramp (rampup_batch_size): `start`, plus
    `increment` after every ramp_samples / ((global_batch_size - start) / increment) samples."""

    final: int
    ramp: BatchRamp | None = None

    @classmethod
    def of(cls, t: TrainConfig) -> "BatchSchedule":
        return cls(t.global_batch_size, t.batch_ramp)

    def at(self, consumed: int) -> int:
        r = self.ramp
        if r is None or consumed >= r.ramp_samples:
            return self.final
        per_increment = r.ramp_samples / ((self.final - r.start) // r.increment)
        return r.start + int(consumed / per_increment) * r.increment

    def batches(self, steps: int, consumed: int = 0) -> Iterator[int]:
        """The global batch of each of `steps` steps, starting with `consumed` samples consumed."""
        for _ in range(steps):
            b = self.at(consumed)
            yield b
            consumed += b

    def consumed_after(self, steps: int) -> int:
        """Samples consumed by the first `steps` steps (a closed form past the ramp)."""
        consumed = 0
        while steps > 0 and self.at(consumed) != self.final:
            consumed += self.at(consumed)
            steps -= 1
        return consumed + steps * self.final

    def sizes(self, steps: int) -> list[int]:
        """The distinct global batches of a run of `steps` steps, ascending."""
        n_ramp, consumed, out = 0, 0, {self.final}
        while n_ramp < steps and self.at(consumed) != self.final:
            out.add(self.at(consumed))
            consumed += self.at(consumed)
            n_ramp += 1
        return sorted(out)


def rank_samples(first: int, global_batch: int, dp_rank: int, dp_size: int) -> range:
    """The sample indices dp rank `dp_rank` of `dp_size` reads from the global batch [first, first + global_batch)."""
    if global_batch % dp_size:
        raise ValueError(f"a global batch of {global_batch} sequences does not split over dp={dp_size}")
    n = global_batch // dp_size
    return range(first + dp_rank * n, first + (dp_rank + 1) * n)
