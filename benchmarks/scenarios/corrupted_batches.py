"""``corrupted_batches``: from the onset, 20 consecutive batches of garbage.

The healthy run (same seed) until step ``onset``; the data iterator then yields 20 batches of
uniformly random byte ids, inputs and targets alike (a corrupted shard: no structure to
learn, so the loss jumps towards ln 256 = 5.5 and beyond, and the gradients with it), then
clean batches again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from benchmarks.scenarios.base import PACE_S, Outcome, Scenario
from benchmarks.scenarios.loop import Stream, fmt, train_lm
from runwatch.tinylm import corrupt_batches

if TYPE_CHECKING:
    from runwatch.agent import Run

STEPS = 400
ONSET = 200
LENGTH = 20


def corrupt(stream: Stream, onset: int, length: int, seed: int) -> Stream:
    """``stream`` with batches ``[onset, onset + length)`` replaced by random byte ids."""
    return corrupt_batches(stream, onset, length, seed=10_000 + seed)


def scenario(*, steps: int = STEPS, onset: int = ONSET, pace_s: float = PACE_S) -> Scenario:
    def train(run: Run, seed: int) -> Outcome:
        trace = train_lm(
            run,
            seed,
            steps=steps,
            pace_s=pace_s,
            wrap_stream=lambda stream: corrupt(stream, onset, LENGTH, seed),
        )
        effect = (
            f"loss {fmt(trace.mean_loss(onset - 20, onset))}->"
            f"{fmt(trace.mean_loss(onset, onset + LENGTH))}"
        )
        return trace.outcome(onset, effect)

    return Scenario(
        "corrupted_batches", f"{LENGTH} batches of random ids", steps, onset, train=train
    )
