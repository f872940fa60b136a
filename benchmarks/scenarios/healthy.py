"""``healthy``: the default TinyLM run with nothing wrong; every anomaly on it is a false alarm.

TinyLM (width 32, 2 heads, 2 layers, context 32), batch 8 of the training text, AdamW 3e-3
with 40 warm-up steps and cosine decay, 400 steps, validation every 20 steps. The fault
scenarios built on the same run (``lr_spike``, ``corrupted_batches``, ``nan_gradients``)
use the same seed, so before their onset they are this run step for step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from benchmarks.scenarios.base import PACE_S, Outcome, Scenario
from benchmarks.scenarios.loop import fmt, train_lm

if TYPE_CHECKING:
    from runwatch.agent import Run

STEPS = 400


def scenario(*, steps: int = STEPS, pace_s: float = PACE_S, seeds: int = 3) -> Scenario:
    def train(run: Run, seed: int) -> Outcome:
        trace = train_lm(run, seed, steps=steps, pace_s=pace_s)
        last_val = trace.val[max(trace.val)] if trace.val else float("nan")
        effect = (
            f"loss {fmt(trace.mean_loss(0, 20))}->{fmt(trace.mean_loss(steps - 20, steps))}, "
            f"val {fmt(last_val)}"
        )
        return trace.outcome(None, effect, val_loss=last_val)

    return Scenario("healthy", "nothing wrong", steps, None, fault=False, train=train, seeds=seeds)
