"""The training loop's batches, with a boundary where a rollback happens: :class:`Batches`.

``for batch in run.data(loader): ...`` yields what ``loader`` yields. Before it fetches the
batch for step ``S`` (the step of the next optimizer update), it takes the ``rollback`` commands
due at ``S``: every rank fetches that batch at the same point of the loop, so every rank rolls
back at the same step, as it applies other commands at the same pre-step hook. A rollback

1. loads the checkpoint file the collector resolved (``args.path``) into the model, optimizer,
   scheduler and random generators (a file that cannot be read, or does not fit, changes
   nothing and fails the command with the reason);
2. sets the step counter to the checkpoint's step;
3. drops the next ``skip_batches`` batches of ``loader`` (they are fetched and thrown away: a
   data loader still loads them); when ``loader`` runs out meanwhile, the loop ends normally;
4. cuts the learning rate by ``lr_factor`` for ``lr_steps`` steps (``lr_scale``) when
   ``lr_factor`` < 1.

Wrap only the training batches: a rollback due while an evaluation loop iterates a wrapped
loader would skip evaluation batches. An idle boundary costs one attribute check.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Generic, TypeVar

from runwatch.agent.control import AT_DATA, Control
from runwatch.agent.safety import Faults, swallow_internal

if TYPE_CHECKING:
    from runwatch import wire
    from runwatch.agent.hooks import Watcher

log = logging.getLogger("runwatch.agent")

T = TypeVar("T")

PART_DATA = "data.rollback"


class Batches(Generic[T]):
    """Iterates ``iterable``; takes rollbacks at its batch boundaries (see the module).

    ``watcher``: the run's current watcher, or None before ``run.watch`` (commands then wait).
    """

    def __init__(
        self,
        iterable: Iterable[T],
        control: Control,
        watcher: Callable[[], Watcher | None],
        faults: Faults,
    ) -> None:
        self._iterator: Iterator[T] = _Start(iter(iterable), self)
        self._control = control
        self._watcher = watcher
        self._faults = faults

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._control.busy:
            self._boundary()
        return next(self._iterator)

    def _start(self, iterator: Iterator[T]) -> None:
        """The first batch is fetched: from now on this boundary takes the rollbacks."""
        self._iterator = iterator
        if not self._faults.failed(PART_DATA):
            self._control.data_boundary = True

    def _boundary(self) -> None:
        """Take the rollbacks due at this boundary."""
        watcher = self._watcher()
        if watcher is None or self._faults.failed(PART_DATA):
            return
        due: list[wire.Command] = []
        with swallow_internal(PART_DATA, self._faults):
            due = self._control.due(watcher.next_step, AT_DATA)
        self._check()
        for command in due:
            self._rollback(watcher, command)

    def _rollback(self, watcher: Watcher, command: wire.Command) -> None:
        from runwatch.agent.checkpoint import CheckpointError

        step = watcher.next_step
        status, detail = "failed", "rollback: internal error in the agent (see its log)"
        try:
            with swallow_internal(PART_DATA, self._faults):
                try:
                    detail = watcher.rollback(command.args, step)
                    status = "applied"
                except CheckpointError as exc:
                    detail = f"rollback: {exc}"
                    log.warning("runwatch agent: rollback at step %d failed: %s", step, exc)
            if status == "applied":  # outside the guard: the data's own errors are the trainer's
                detail += self._skip(command.args["skip_batches"])
        finally:
            self._control.settle(command.id, status, detail, step)
            self._check()

    def _skip(self, n: int) -> str:
        """Drop ``n`` batches; the ack's words for it."""
        skipped = 0
        try:
            for _ in range(n):
                next(self._iterator)
                skipped += 1
        except StopIteration:  # the next fetch raises it again and ends the loop
            return f", skipped {skipped} of {n} batches: the data ran out"
        return f", skipped {n} batches"

    def _check(self) -> None:
        """Once this boundary failed, the pre-step hook fails rollbacks instead."""
        if self._faults.failed(PART_DATA):
            self._control.data_boundary = False


class _Start(Generic[T]):
    """The iterator of a :class:`Batches` until its first fetch, which starts the boundary and
    hands the batches their own iterator back: the fetches after it cost nothing more."""

    def __init__(self, iterator: Iterator[T], batches: Batches[T]) -> None:
        self._iterator = iterator
        self._batches = weakref.ref(batches)  # no cycle: a dropped loader goes at once

    def __next__(self) -> T:
        batches = self._batches()
        if batches is not None:
            batches._start(self._iterator)
        return next(self._iterator)
