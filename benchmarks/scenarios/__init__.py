"""Fault-injection scenario benchmark: do the detectors find real faults in real training runs,
how soon, and how often do they cry wolf?

Run by hand from the repository root (never from the tests or CI)::

    .venv/bin/python -m benchmarks.scenarios [--only NAME ...] [--seeds N] [--json FILE]
        [--threads N] [--settle SECONDS]

One collector (``python -m runwatch server``, a fresh SQLite file in a temporary directory,
a free loopback port, ``RUNWATCH_DETECTOR_CHECK_SECONDS=1`` so that time-based detectors are
asked every second) serves every run and is stopped on exit, on errors and on Ctrl-C.

Each scenario is a small, real PyTorch training run on the CPU (a TinyLM byte-level
transformer, or an MLP), paced to ~25 ms a step (:mod:`.loop`), with one fault injected in
code at a known step, the ground truth ``onset``:

    scenario            fault                                                   steps  onset
    healthy (x3)        none; every anomaly is a false alarm                      400  -
    lr_spike            learning rate x50 for 10 steps                            400  200
    corrupted_batches   20 consecutive batches of random token ids                400  200
    nan_gradients       one step's gradients multiplied by NaN; training goes on  300  200
    overfitting         64-window training set trained long                       400  val-loss min
    input_scale_shift   MLP inputs arrive unnormalised (x100 + 50)                400  200
    high_peak_lr        warm-up to 30x the healthy peak LR                        400  100
    dataloader_stall    data iterator hangs 5 s, then 4 batches of 1 s            300  200
    memory_growth       +5 MB of host memory held per step (60 ms steps)          300  150
    slow_rank           2 DDP ranks (gloo), rank 1 +100 % step time               300  150

Each module's docstring says exactly what it does. Every run is watched by the agent as a
user would watch it: ``runwatch.init(server=..., name=f"{scenario}-{seed}",
system_interval=0.5, heartbeat_interval=1, spool_dir=tmp)``, ``run.watch(model, optimizer,
scheduler)``, ``run.log({"train/loss": loss})`` every step and ``run.log({"val/loss": ...})``
every 20 steps. After ``run.finish()`` the benchmark polls
``GET /api/v1/runs/{id}/anomalies`` until the list has not changed for 2 s (at most
``--settle``, 10 s) and scores it (:mod:`.scoring`): detected or not, the delay in steps
and seconds, the kinds that detected it, false alarms. Overall: recall over the fault
runs, false alarms per 1,000 healthy steps (healthy runs and the steps before a fault's
onset), the median delay, the total wall time. ``--json FILE`` writes every run's outcome,
anomalies and score.

A collector without the anomalies endpoint (404) is reported with a note, and every run
then counts 0 anomalies. The exit status is 0 whatever was detected (it is a benchmark,
not a test); it is 1 only when the benchmark itself could not run (no collector).
"""

from __future__ import annotations

from benchmarks.scenarios import (
    corrupted_batches,
    dataloader_stall,
    healthy,
    high_peak_lr,
    input_scale_shift,
    lr_spike,
    memory_growth,
    nan_gradients,
    overfitting,
    slow_rank,
)
from benchmarks.scenarios.base import AgentSetup, Outcome, Scenario

__all__ = ["SCENARIOS", "AgentSetup", "Outcome", "Scenario"]

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        healthy.scenario(),
        lr_spike.scenario(),
        corrupted_batches.scenario(),
        nan_gradients.scenario(),
        overfitting.scenario(),
        input_scale_shift.scenario(),
        high_peak_lr.scenario(),
        dataloader_stall.scenario(),
        memory_growth.scenario(),
        slow_rank.scenario(),
    )
}
"""Every scenario with its default settings, in the order the suite runs them."""
