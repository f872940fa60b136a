"""One run of the recovery benchmark, in one of three modes, and what it left behind.

- ``none``: a plain PyTorch loop; runwatch is not imported.
- ``detect``: the agent watches (``run.watch(..., skip_nonfinite=False)``) and reports to a
  collector whose policy is off: detection only, nothing acts on the run.
- ``policy``: what a user gets by default: the agent with its local guard against non-finite
  gradients, a routine checkpoint every :data:`CHECKPOINT_EVERY` steps, the loop iterating
  ``run.data(stream)`` so that a rollback can skip batches, and a collector running the default
  policy.

The loop runs until the optimizer has made :data:`STEPS` steps (a rollback sets the step back,
so a run that rolled back makes more iterations), the run is told to stop, or
:data:`MAX_ITERATIONS` iterations have passed.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.recovery.faults import Fault
from benchmarks.scenarios.loop import (
    VAL_EVERY,
    Stream,
    lm_loss,
    lm_model,
    lm_stream,
    lm_val_batch,
    pace,
)

STEPS = 400
MAX_ITERATIONS = 1000
CHECKPOINT_EVERY = 50
KEEP_CHECKPOINTS = 3
PACE_S = 0.025
PROJECT = "recovery"
MODES = ("none", "detect", "policy")


@dataclass
class Trace:
    """Per iteration: the optimizer step it made, its train loss and its start time."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)
    end_time: float = 0.0
    final_val: float = math.nan
    stopped: bool = False
    run_id: int | None = None

    @property
    def iterations(self) -> int:
        return len(self.losses)

    def iteration_s(self) -> float:
        """Median wall time of an iteration."""
        times = [*self.starts, self.end_time]
        return statistics.median(b - a for a, b in itertools.pairwise(times))

    def nonfinite_at_end(self, last: int = 20) -> bool:
        return any(not math.isfinite(v) for v in self.losses[-last:])


def train(mode: str, fault: Fault, seed: int, *, server: str | None, workdir: Path) -> Trace:
    """Train one run of ``fault`` in ``mode``; ``server``: the collector (not for ``none``)."""
    model, optimizer, scheduler = lm_model(seed, total=STEPS)
    stream: Stream = lm_stream(seed)
    if fault.wrap_stream is not None:
        stream = fault.wrap_stream(stream, seed)
    val_inputs, val_targets = lm_val_batch()
    trace = Trace()
    run: Any = None
    if mode != "none":
        import runwatch

        run = runwatch.init(
            project=PROJECT,
            name=f"{fault.name}-{mode}-{seed}",
            server=server,
            spool_dir=workdir / "spool",
            checkpoint_dir=workdir / "checkpoints",
            keep_checkpoints=KEEP_CHECKPOINTS,
            system_interval=0.5,
            heartbeat_interval=1.0,
        )
        if mode == "policy":
            run.watch(model, optimizer, scheduler, checkpoint_every=CHECKPOINT_EVERY)
            stream = iter(run.data(stream))
        else:
            run.watch(model, optimizer, scheduler, skip_nonfinite=False)
    step = 0
    try:
        for iteration in range(MAX_ITERATIONS):
            trace.starts.append(time.time())
            inputs, targets = next(stream)
            computing = time.perf_counter()
            loss = lm_loss(model, inputs, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if fault.before_update is not None:
                fault.before_update(iteration, model, optimizer)
            pace(computing, PACE_S)
            optimizer.step()
            scheduler.step()
            if run is not None:
                step = run.step  # this update's step; after a rollback, counted from its step
            trace.steps.append(step)
            trace.losses.append(loss.item())
            if run is not None:
                run.log({"train/loss": loss}, step=step)
            step += 1
            if run is not None and (step % VAL_EVERY == 0):
                run.log({"val/loss": _val(model, val_inputs, val_targets)}, step=step - 1)
            if run is not None and run.should_stop:
                trace.stopped = True
                break
            if step >= STEPS:
                break
        trace.end_time = time.time()
        trace.final_val = _val(model, val_inputs, val_targets)
    finally:
        if run is not None:
            run.finish()
            trace.run_id = run.id
    return trace


def _val(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    with torch.no_grad():
        return lm_loss(model, inputs, targets).item()
