"""``high_peak_lr``: warm-up to a peak learning rate 30 times the healthy one.

The healthy model and data, but AdamW's peak learning rate is 9e-2 instead of 3e-3, reached
by a linear warm-up over 100 steps, then cosine decay to step 400. Onset: the end of the
warm-up (step 100), when the peak is applied. On this pre-norm transformer the run does not
blow up: it stalls, its loss stays around 2.8-3.2 while the healthy run's falls to 2.3-2.5,
with occasional gradient-norm spikes. A detector must notice a run that stops learning, or
its noisy gradients; any anomaly during the warm-up is counted as a false alarm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from benchmarks.scenarios.base import PACE_S, Outcome, Scenario
from benchmarks.scenarios.loop import LR, fmt, train_lm

if TYPE_CHECKING:
    from runwatch.agent import Run

STEPS = 400
WARMUP = 100
FACTOR = 30.0


def scenario(*, steps: int = STEPS, warmup: int = WARMUP, pace_s: float = PACE_S) -> Scenario:
    def train(run: Run, seed: int) -> Outcome:
        trace = train_lm(run, seed, steps=steps, pace_s=pace_s, lr=LR * FACTOR, warmup=warmup)
        last_val = trace.val[max(trace.val)] if trace.val else float("nan")
        effect = (
            f"loss {fmt(trace.mean_loss(warmup - 20, warmup))}->"
            f"{fmt(trace.mean_loss(steps - 20, steps))}, val {fmt(last_val)}"
        )
        return trace.outcome(warmup, effect, val_loss=last_val)

    return Scenario(
        "high_peak_lr",
        f"peak LR x{FACTOR:g}; onset = end of warm-up",
        steps,
        warmup,
        train=train,
    )
