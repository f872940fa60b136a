"""``dataloader_stall``: from the onset the data iterator stalls: one 5 s hang, then 4 slow
batches of 1 s each.

The healthy run (same seed); the iterator sleeps before yielding batches ``onset`` to
``onset + 4`` (5, 1, 1, 1 and 1 s; a normal step is 25 ms), as a loader waiting on a network
file system would. No step completes during a stall while the agent's heartbeats and
system samples go on, so a detector can see it as it happens (no progress for seconds) and
afterwards (``train/data_wait`` and ``train/step_time`` of those steps). The model, loss
and gradients are untouched.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from benchmarks.scenarios.base import PACE_S, Outcome, Scenario
from benchmarks.scenarios.loop import Stream, train_lm

if TYPE_CHECKING:
    from runwatch.agent import Run

STEPS = 300
ONSET = 200
STALLS = (5.0, 1.0, 1.0, 1.0, 1.0)


def stalling(stream: Stream, onset: int, stalls: tuple[float, ...] = STALLS) -> Stream:
    """``stream``, sleeping ``stalls[i]`` seconds before yielding batch ``onset + i``."""
    for index, batch in enumerate(stream):
        if onset <= index < onset + len(stalls):
            time.sleep(stalls[index - onset])
        yield batch


def scenario(*, steps: int = STEPS, onset: int = ONSET, pace_s: float = PACE_S) -> Scenario:
    def train(run: Run, seed: int) -> Outcome:
        trace = train_lm(
            run,
            seed,
            steps=steps,
            pace_s=pace_s,
            wrap_stream=lambda stream: stalling(stream, onset),
        )
        stall_s = [
            round(trace.starts[i + 1] - trace.starts[i], 2)
            for i in range(onset, min(onset + len(STALLS), trace.steps - 1))
        ]
        effect = f"step {trace.step_ms(onset - 50, onset):.0f} ms, stalled steps {stall_s} s"
        return trace.outcome(onset, effect)

    return Scenario(
        "dataloader_stall",
        f"data iterator sleeps {'+'.join(f'{s:g}' for s in STALLS)} s",
        steps,
        onset,
        train=train,
    )
