"""The faults the recovery benchmark injects, keyed to what a real fault is tied to.

A rollback replays steps, so a fault must not be tied to a step number, or it would strike
again at the same step after every rollback. A transient fault (a bad kernel, a flipped bit, an
operator's typo in a live LR override) is tied to the *iteration*, the count of loop passes
since the process started, which only grows; corrupted data is tied to the *position in the
data stream*, so that skipping batches skips it, as it does in a real run.

    fault               what                                                   when
    healthy             none                                                   -
    lr_spike            learning rate x50 for 10 iterations                    iteration 200
    corrupted_batches   20 consecutive batches of random byte ids              batch 200
    nan_gradients       one iteration's gradients multiplied by NaN            iteration 200
    loss_explosion      learning rate x1000 for 3 iterations                   iteration 200
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.scenarios.corrupted_batches import corrupt
from benchmarks.scenarios.loop import BeforeUpdate, Stream

ONSET = 200
"""The iteration (or batch position) at which every fault strikes."""


@dataclass(frozen=True)
class Fault:
    name: str
    summary: str
    onset: int | None
    before_update: BeforeUpdate | None = None
    wrap_stream: Callable[[Stream, int], Stream] | None = None
    """``(stream, seed)`` -> the stream the loop reads, below ``run.data``."""


def _lr_times(factor: float, length: int) -> BeforeUpdate:
    def spike(iteration: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if ONSET <= iteration < ONSET + length:
            for group in optimizer.param_groups:
                group["lr"] *= factor  # the scheduler's next step() sets its own value again

    return spike


def _nan_once(iteration: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    if iteration == ONSET:
        grad = next(model.parameters()).grad
        if grad is not None:
            grad.mul_(math.nan)


FAULTS: dict[str, Fault] = {
    f.name: f
    for f in (
        Fault("healthy", "no fault", None),
        Fault("lr_spike", "LR x50 for 10 iterations", ONSET, before_update=_lr_times(50.0, 10)),
        Fault(
            "corrupted_batches",
            "20 batches of random ids",
            ONSET,
            wrap_stream=lambda stream, seed: corrupt(stream, ONSET, 20, seed),
        ),
        Fault("nan_gradients", "NaN gradients once", ONSET, before_update=_nan_once),
        Fault(
            "loss_explosion",
            "LR x1000 for 3 iterations",
            ONSET,
            before_update=_lr_times(1000.0, 3),
        ),
    )
}
