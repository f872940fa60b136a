"""``lr_spike``: the learning rate multiplied by 50 for 10 steps at the onset, then restored.

The healthy run (same seed) until step ``onset``; for steps ``[onset, onset + 10)`` every
parameter group's learning rate is multiplied by 50 just before ``optimizer.step()`` (after
the scheduler set it), and the scheduler's next ``step()`` puts the schedule's value back.
The agent reads ``train/lr`` after the optimizer step, so the spike is in the recorded LR as
well as in its consequences (loss and gradient-norm jumps from step ``onset + 1``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from benchmarks.scenarios.base import PACE_S, Outcome, Scenario
from benchmarks.scenarios.loop import fmt, train_lm

if TYPE_CHECKING:
    from runwatch.agent import Run

STEPS = 400
ONSET = 200
FACTOR = 50.0
LENGTH = 10


def scenario(*, steps: int = STEPS, onset: int = ONSET, pace_s: float = PACE_S) -> Scenario:
    def spike(step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if onset <= step < onset + LENGTH:
            for group in optimizer.param_groups:
                group["lr"] *= FACTOR

    def train(run: Run, seed: int) -> Outcome:
        trace = train_lm(run, seed, steps=steps, pace_s=pace_s, before_update=spike)
        effect = (
            f"loss {fmt(trace.mean_loss(onset - 20, onset))}->max "
            f"{fmt(trace.max_loss(onset, onset + LENGTH + 10))}"
        )
        return trace.outcome(onset, effect)

    return Scenario("lr_spike", f"LR x{FACTOR:g} for {LENGTH} steps", steps, onset, train=train)
