"""The training loop every scenario runs, with the places where a fault is injected in code.

One step: fetch the batch (``stream``; a scenario may wrap the iterator to corrupt or delay
batches), forward, backward, ``before_update`` (a scenario may poison gradients or change the
learning rate here), :func:`pace`, ``optimizer.step()``, ``scheduler.step()``,
``run.log({"train/loss": loss})``, ``after_update``, and every ``val_every`` steps a
validation loss logged as ``val/loss``. Steps are numbered like the agent numbers them: a
value logged after the ``i``-th ``optimizer.step()`` lands on step ``i`` (0-based).

Pacing: the small models here take 2-5 ms a step on a CPU core, so a 400-step run would be
over in a second or two, too fast for anything sampled on a clock (system metrics every
0.5 s, heartbeats every second, time-based detectors asked every second). :func:`pace` makes
each step's compute last ``pace_s`` (25 ms by default) by sleeping the rest, as a larger
model would keep an accelerator busy while the host waits. The sleep sits between backward
and ``optimizer.step()``: it is part of ``train/step_time`` and not of ``train/data_wait``.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from benchmarks.scenarios.base import PACE_S, Outcome
from runwatch.tinylm import TinyConfig, TinyLM, batches, corpus, warmup_cosine

if TYPE_CHECKING:
    from runwatch.agent import Run

Batch = tuple[torch.Tensor, torch.Tensor]
Stream = Iterator[Batch]
BeforeUpdate = Callable[[int, nn.Module, torch.optim.Optimizer], None]
AfterUpdate = Callable[[int], None]
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

SMALL = TinyConfig(width=32, heads=2, layers=2, context=32)
"""43k parameters, ~2.5 ms a step at batch 8 on one CPU core."""
BATCH = 8
LR = 3e-3
WARMUP = 40
WEIGHT_DECAY = 0.01
VAL_EVERY = 20
VAL_WINDOWS = 16
VAL_SEED = 1234
HELD_OUT = 0.1
"""The last 10 % of the corpus is never trained on: the validation text."""


def pace(since: float, pace_s: float) -> None:
    """Sleep until ``pace_s`` seconds after ``since`` (``time.perf_counter()``)."""
    left = since + pace_s - time.perf_counter()
    if left > 0:
        time.sleep(left)


@functools.cache
def split_corpus() -> tuple[bytes, bytes]:
    """(training text, held-out validation text) of :func:`runwatch.tinylm.corpus`."""
    text = corpus()
    cut = int(len(text) * (1 - HELD_OUT))
    return text[:cut], text[cut:]


def lm_stream(seed: int, *, batch_size: int = BATCH, context: int = SMALL.context) -> Stream:
    """Endless random training windows, in the order ``seed`` gives."""
    return batches(split_corpus()[0], batch_size=batch_size, context=context, seed=seed)


def lm_val_batch(context: int = SMALL.context) -> Batch:
    """Fixed held-out windows, the same for every run."""
    held_out = split_corpus()[1]
    return next(batches(held_out, batch_size=VAL_WINDOWS, context=context, seed=VAL_SEED))


def lm_model(
    seed: int,
    *,
    config: TinyConfig = SMALL,
    lr: float = LR,
    warmup: int = WARMUP,
    total: int,
) -> tuple[TinyLM, torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """A fresh TinyLM (initialised from ``seed``), AdamW and warm-up + cosine to ``total``."""
    torch.manual_seed(seed)
    model = TinyLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    return model, optimizer, warmup_cosine(optimizer, warmup=warmup, total=total)


@dataclass
class Trace:
    """What the loop saw: train loss per step, validation losses, and when each step began."""

    losses: list[float] = field(default_factory=list)
    val: dict[int, float] = field(default_factory=dict)
    starts: list[float] = field(default_factory=list)
    """``time.time()`` at the start of each step, before its batch is fetched."""
    end_time: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.starts)

    def mean_loss(self, start: int, stop: int) -> float:
        """Mean train loss over steps ``[start, stop)`` (NaN if there are none, or any is)."""
        window = self.losses[max(0, start) : max(0, stop)]
        return statistics.fmean(window) if window else math.nan

    def max_loss(self, start: int, stop: int) -> float:
        window = self.losses[max(0, start) : max(0, stop)]
        return max(window) if window else math.nan

    def step_ms(self, start: int, stop: int) -> float:
        """Median wall time of steps ``[start, stop)`` in milliseconds."""
        times = [*self.starts, self.end_time]
        gaps = [b - a for a, b in zip(times[start:stop], times[start + 1 : stop + 1], strict=False)]
        return 1000 * statistics.median(gaps) if gaps else math.nan

    def first_nonfinite(self) -> int | None:
        return next((i for i, v in enumerate(self.losses) if not math.isfinite(v)), None)

    def outcome(self, onset: int | None, effect: str, **notes: float | int | str | None) -> Outcome:
        onset_time = self.starts[onset] if onset is not None and onset < self.steps else None
        return Outcome(self.steps, onset, onset_time, self.end_time, effect, dict(notes))


def lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-byte cross-entropy, as :func:`runwatch.tinylm.loss_of`."""
    logits = model(inputs)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train_loop(
    run: Run,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    stream: Stream,
    val_batch: Batch,
    steps: int,
    pace_s: float = PACE_S,
    loss_fn: LossFn = lm_loss,
    before_update: BeforeUpdate | None = None,
    after_update: AfterUpdate | None = None,
    val_every: int = VAL_EVERY,
) -> Trace:
    """Train ``steps`` steps under ``run.watch(model, optimizer, scheduler)``; see the module
    docstring for the order of things within a step."""
    trace = Trace()
    # Detection only: the agent's own skip of non-finite steps would hide the faults under test.
    run.watch(model, optimizer, scheduler, skip_nonfinite=False)
    val_inputs, val_targets = val_batch
    for step in range(steps):
        trace.starts.append(time.time())
        inputs, targets = next(stream)
        computing = time.perf_counter()
        loss = loss_fn(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if before_update is not None:
            before_update(step, model, optimizer)
        pace(computing, pace_s)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        run.log({"train/loss": loss})
        if after_update is not None:
            after_update(step)
        trace.losses.append(loss.item())
        if (step + 1) % val_every == 0:
            with torch.no_grad():
                val = loss_fn(model, val_inputs, val_targets).item()
            run.log({"val/loss": val})
            trace.val[step] = val
    trace.end_time = time.time()
    return trace


def train_lm(
    run: Run,
    seed: int,
    *,
    steps: int,
    pace_s: float = PACE_S,
    lr: float = LR,
    warmup: int = WARMUP,
    schedule_total: int | None = None,
    stream: Stream | None = None,
    wrap_stream: Callable[[Stream], Stream] | None = None,
    before_update: BeforeUpdate | None = None,
    after_update: AfterUpdate | None = None,
) -> Trace:
    """The default run: :data:`SMALL` TinyLM, batch 8, AdamW ``lr`` with warm-up and cosine
    decay over ``schedule_total`` (default: the run) steps, validation every 20 steps."""
    model, optimizer, scheduler = lm_model(
        seed, lr=lr, warmup=warmup, total=schedule_total or steps
    )
    data = stream if stream is not None else lm_stream(seed)
    return train_loop(
        run,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        stream=wrap_stream(data) if wrap_stream is not None else data,
        val_batch=lm_val_batch(),
        steps=steps,
        pace_s=pace_s,
        before_update=before_update,
        after_update=after_update,
    )


def fmt(value: float) -> str:
    """A loss for the effect column: 2 decimals, or NaN/inf spelled out."""
    return f"{value:.2f}" if math.isfinite(value) else str(value)
