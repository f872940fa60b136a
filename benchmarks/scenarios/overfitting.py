"""``overfitting``: a tiny training set trained far too long; validation loss turns and rises.

The training data is a fixed pool of 64 windows (2,048 bytes) of the training text; every
step draws a batch of 8 from that pool. AdamW 3e-3 with 20 warm-up steps and then a
constant learning rate, 400 steps; validation on the fixed held-out windows every 20 steps.
The training loss falls towards zero while the validation loss reaches its minimum (around
step 140 on seed 0) and then climbs for the rest of the run: a growing
generalisation gap, with nothing else abnormal (no spike, no NaN, steady timings).

Onset: unknown in advance, so it is taken from the run itself: the step of the lowest
validation loss (``argmin`` over the validation steps). A pool of 8 windows, as first
planned, memorises within ~40 steps, leaving a detector two validation points before the
turn; 64 windows leave about six.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from benchmarks.scenarios.base import PACE_S, Outcome, Scenario
from benchmarks.scenarios.loop import BATCH, Stream, fmt, split_corpus, train_lm
from runwatch.tinylm import batches

if TYPE_CHECKING:
    from runwatch.agent import Run

STEPS = 400
POOL = 64
WARMUP = 20
CONSTANT = 10**9
"""``schedule_total`` far beyond the run: the cosine decay never starts."""


def tiny_dataset(seed: int, *, pool: int = POOL, batch_size: int = BATCH) -> Stream:
    """Batches drawn (with replacement) from ``pool`` fixed windows of the training text."""
    inputs, targets = next(batches(split_corpus()[0], batch_size=pool, context=32, seed=seed))
    generator = torch.Generator().manual_seed(20_000 + seed)
    while True:
        pick = torch.randint(0, pool, (batch_size,), generator=generator)
        yield inputs[pick], targets[pick]


def scenario(*, steps: int = STEPS, pace_s: float = PACE_S) -> Scenario:
    def train(run: Run, seed: int) -> Outcome:
        trace = train_lm(
            run,
            seed,
            steps=steps,
            pace_s=pace_s,
            warmup=WARMUP,
            schedule_total=CONSTANT,
            stream=tiny_dataset(seed),
        )
        onset = min(trace.val, key=lambda step: trace.val[step])
        last = max(trace.val)
        effect = (
            f"val min {fmt(trace.val[onset])}@{onset}->{fmt(trace.val[last])}, "
            f"train {fmt(trace.mean_loss(steps - 20, steps))}"
        )
        if onset == last:
            effect += " (val never rose: no onset)"
        return trace.outcome(onset, effect, val_min=trace.val[onset], val_last=trace.val[last])

    return Scenario(
        "overfitting",
        f"{POOL}-window training set; onset = val-loss minimum",
        steps,
        None,
        train=train,
    )
