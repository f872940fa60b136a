"""``nan_gradients``: one faulty step whose gradients are NaN; training goes on regardless.

The healthy run (same seed) until step ``onset``; there, after ``backward()`` and before
``optimizer.step()``, the token embedding's gradient is multiplied by NaN (a faulty kernel or
an overflow nobody caught). AdamW applies it, so the embedding and everything computed from
it are NaN from then on; the loop does not stop (that is the fault). The agent's
``train/grad_norm`` of step ``onset`` is NaN, and ``train/loss`` from step ``onset + 1``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from benchmarks.scenarios.base import PACE_S, Outcome, Scenario
from benchmarks.scenarios.loop import train_lm

if TYPE_CHECKING:
    from runwatch.agent import Run

STEPS = 300
ONSET = 200


def poison(step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Multiply the first parameter's gradient (the token embedding) by NaN."""
    grad = next(model.parameters()).grad
    if grad is not None:
        grad.mul_(math.nan)


def scenario(*, steps: int = STEPS, onset: int = ONSET, pace_s: float = PACE_S) -> Scenario:
    def faulty(step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if step == onset:
            poison(step, model, optimizer)

    def train(run: Run, seed: int) -> Outcome:
        trace = train_lm(run, seed, steps=steps, pace_s=pace_s, before_update=faulty)
        first = trace.first_nonfinite()
        effect = f"NaN grads at {onset}, loss NaN from step {first}"
        return trace.outcome(onset, effect, first_nan_loss=first)

    return Scenario("nan_gradients", "one step of NaN gradients", steps, onset, train=train)
