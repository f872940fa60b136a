"""``memory_growth``: from the onset the trainer leaks 5 MB of host memory every step.

The healthy model and data, 300 steps of 60 ms (slower than the default 25 ms so that the
system sampler, every 0.5 s, takes ~18 samples before the onset and ~18 during the growth).
From step ``onset`` (150) every step appends 5 MB of written bytes to a list the trainer
holds (a cache that never evicts, tensors kept for logging, ...): the process's RSS
(``sys/proc_rss_gb``) grows steadily by 750 MB over the remaining 150 steps, about 80 MB/s.
The list is freed when the run ends. Loss, gradients and timings are untouched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import psutil

from benchmarks.scenarios.base import Outcome, Scenario
from benchmarks.scenarios.loop import train_lm

if TYPE_CHECKING:
    from runwatch.agent import Run

STEPS = 300
ONSET = 150
PACE_S = 0.06
LEAK_BYTES = 5 * 2**20
MB = 2**20


def scenario(*, steps: int = STEPS, onset: int = ONSET, pace_s: float = PACE_S) -> Scenario:
    def train(run: Run, seed: int) -> Outcome:
        hoard: list[bytes] = []
        process = psutil.Process()
        rss: dict[str, float] = {}

        def leak(step: int) -> None:
            if step == onset:
                rss["onset"] = process.memory_info().rss / MB
            if step >= onset:
                hoard.append(b"\x01" * LEAK_BYTES)  # written, so resident

        try:
            trace = train_lm(run, seed, steps=steps, pace_s=pace_s, after_update=leak)
            grown = process.memory_info().rss / MB - rss.get("onset", 0.0)
            held = len(hoard) * LEAK_BYTES / MB
        finally:
            hoard.clear()
        effect = f"RSS +{grown:.0f} MB ({held:.0f} MB held)"
        return trace.outcome(onset, effect, rss_growth_mb=round(grown, 1))

    return Scenario(
        "memory_growth",
        f"+{LEAK_BYTES // MB} MB host memory per step",
        steps,
        onset,
        train=train,
    )
