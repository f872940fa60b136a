"""``Run``: what ``runwatch.init`` returns, and the only object a training script touches.

The training thread's share of the work is :meth:`Run.log` (a dict copy and a
deque append under a lock, a few microseconds) and the hooks :meth:`Run.watch`
installs. Sending, retrying and spooling happen in the sender thread
(:mod:`runwatch.agent.worker`), system metrics in the sampler thread
(:mod:`runwatch.agent.system`).

Nothing here raises into the trainer once ``init`` has returned: failures are
contained (:mod:`runwatch.agent.safety`). A process forked from the trainer
(DataLoader workers) gets an inert run: its threads did not survive the fork,
and its points would duplicate the parent's.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import suppress
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from runwatch.agent.buffer import CRITICAL, PointBuffer
from runwatch.agent.control import Control
from runwatch.agent.data import Batches
from runwatch.agent.distributed import Placement, agreed_name, local_gpu
from runwatch.agent.options import Options, resume_from
from runwatch.agent.safety import FAULTS, Faults, swallow_internal
from runwatch.agent.worker import Sender, Stats

if TYPE_CHECKING:
    import torch

    from runwatch.agent.hooks import Watcher
    from runwatch.agent.system import SystemSampler

log = logging.getLogger("runwatch.agent")

T = TypeVar("T")

_LIVE_RUNS: weakref.WeakSet[Run] = weakref.WeakSet()


class Run:
    """A watched training run; see :func:`runwatch.init`.

    >>> with runwatch.init(project="demo") as run:            # doctest: +SKIP
    ...     run.watch(model, optimizer)
    ...     for batch in loader:
    ...         loss = step(batch)
    ...         run.log({"train/loss": loss})
    """

    def __init__(self, options: Options, where: Placement, *, faults: Faults | None = None) -> None:
        self.options = options
        self.rank = where.rank
        self.world_size = where.world_size
        self.primary = where.rank == 0 or options.all_ranks
        """Whether this rank sends training scalars (rank 0, or every rank with all_ranks)."""
        self.name = agreed_name(options.name)
        self.faults = faults if faults is not None else Faults(parent=FAULTS)
        """This run's failed parts; also counted in the process-wide ``FAULTS``."""
        self._buffer = PointBuffer(options.queue_points)
        self._buffer.ready_size = options.batch_points
        self._control = Control(single_process=where.world_size == 1)
        self._sender = Sender(
            options,
            self._buffer,
            name=self.name,
            rank=where.rank,
            owns_run=where.rank == 0,
            world_size=where.world_size,
            control=self._control,
            faults=self.faults,
        )
        self._watcher: Watcher | None = None
        self._sampler: SystemSampler | None = None
        self._next_step = 0
        self._pid = os.getpid()
        self._finished = False
        self._lock = threading.Lock()
        self._sender.open_spool()
        self._sender.start()
        if options.system_interval > 0:
            self._start_sampler(where)
        _LIVE_RUNS.add(self)
        atexit.register(self._at_exit)

    # -- what the run is ------------------------------------------------------------------------
    @property
    def id(self) -> int | None:
        """The collector's run id, once the collector has answered (None before, or offline)."""
        return self._sender.run_id

    @property
    def step(self) -> int:
        """The current step: the watched optimizer's iteration, else the next implicit step."""
        return self._watcher.step if self._watcher is not None else self._next_step

    @property
    def stats(self) -> Stats:
        """Batches and points sent and spooled, points dropped by reason, steps skipped.

        ``steps_skipped`` (non-finite gradients, see :meth:`watch`) is read from a device
        counter when the gradients live on an accelerator: reading ``stats`` then syncs once.
        """
        stats = self._sender.stats
        with swallow_internal("stats", self.faults):
            stats.steps_skipped = self._control.steps_skipped()
        return stats

    @property
    def should_stop(self) -> bool:
        """Whether the collector asked this run to stop (a ``stop`` command was applied).

        Read-only. The command names the step at which every rank applies it, so all ranks see
        True after the same optimizer step; the Lightning and Hugging Face callbacks end the
        training loop there. A plain loop checks it itself::

            for batch in loader:
                train_step(batch)
                if run.should_stop:
                    break
        """
        return self._control.should_stop

    # -- the training thread's API -----------------------------------------------------------
    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Record ``metrics`` (name -> number or one-element tensor) at ``step``; never blocks.

        Without ``step``: the watched optimizer's current iteration after :meth:`watch`,
        else one more than the previous call's step (the first call is step 0). Tensors are
        read in the background (detached from the graph), so logging a GPU loss costs no
        device sync; do not modify a logged tensor in place afterwards. On ranks other than 0,
        training scalars are not sent unless ``all_ranks=True``.
        """
        if self._finished or not self.primary or self._pid != os.getpid():
            return
        try:
            if step is None:
                watcher = self._watcher
                if watcher is None:
                    step = self._next_step
                    self._next_step = step + 1
                else:
                    step = watcher.step
            else:
                self._next_step = step + 1 if type(step) is int else self._next_step
            values = dict(metrics)
            for key, value in values.items():
                if type(value) is not float and getattr(value, "requires_grad", False):
                    # A loss that still carries its graph would keep every activation of the
                    # step alive until the sender reads it.
                    values[key] = value.detach()
            self._buffer.put_scalars(step, values, CRITICAL, copy=False)
        except Exception as exc:
            self.faults.record("log", exc)
            if self.faults.reraise:
                raise

    def watch(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: object | None = None,
        *,
        layer_every: int = 10,
        activation_every: int = 10,
        activations: str | Sequence[str] | None = "auto",
        start_step: int | None = None,
        skip_nonfinite: bool = True,
        save: Callable[[str, dict[str, Any]], object] | None = None,
        load: Callable[[str], dict[str, Any]] | None = None,
        checkpoint_every: int | None = None,
    ) -> None:
        """Hook ``model`` and ``optimizer``: gradient norm, learning rates and step timing every
        step; per-layer gradient/parameter norms and update ratios every ``layer_every`` steps;
        activation statistics of the ``activations`` modules every ``activation_every`` steps.
        The hooks also apply the collector's commands at step boundaries (``lr_scale``,
        ``clip``, ``skip_step``, ``checkpoint``, ``stop``; see
        :mod:`runwatch.agent.interventions`; ``rollback`` needs :meth:`data`): without ``watch``
        commands wait unapplied.

        ``activations``: ``"auto"`` (the blocks of the model's largest ModuleList), a list of
        module names, or None. An unknown module name raises ``ValueError`` here, at set-up.
        ``start_step``: the first iteration's step (a resumed run's global step); default: the
        step after the last ``log``.
        ``skip_nonfinite``: skip an optimizer step whose gradients hold a NaN or an infinity,
        locally, without a round trip (counted in ``stats.steps_skipped``, recorded as
        ``control/skipped_step``). Exact for gradients on the CPU and for fused optimizers;
        other optimizers on an accelerator get zeroed gradients instead, to avoid a host sync
        per step (see :mod:`runwatch.agent.interventions` for what that means for Adam).

        Checkpoints (:mod:`runwatch.agent.checkpoint`): ``checkpoint_every`` saves one every N
        steps (at the optimizer's pre-step hook), as do the ``checkpoint`` and ``stop``
        commands, rank 0 writing ``<checkpoint_dir>/<run name>/step-<step>.pt``; ``save(path,
        state)`` and ``load(path) -> state`` replace ``torch.save`` / ``torch.load``.
        """
        from runwatch.agent.checkpoint import Checkpointer, folder_name
        from runwatch.agent.hooks import Watcher

        if self._finished or self._pid != os.getpid():
            return
        checkpointer = Checkpointer(
            model,
            optimizer,
            scheduler,
            directory=self.options.checkpoint_dir / folder_name(self.name),
            rank=self.rank,
            control=self._control,  # used by rank 0 alone: the others save nothing
            keep=self.options.keep_checkpoints,
            save=save,
            load=load,
        )
        watcher = Watcher(
            model,
            optimizer,
            self._buffer,
            scheduler=scheduler,
            layer_every=layer_every,
            activation_every=activation_every,
            activations=activations,
            primary=self.primary,
            start_step=self._next_step if start_step is None else start_step,
            control=self._control,
            skip_nonfinite=skip_nonfinite,
            checkpointer=checkpointer,
            checkpoint_every=checkpoint_every,
            faults=self.faults,
        )
        with self._lock:
            if self._watcher is not None:
                self._watcher.remove()
            self._watcher = watcher

    def checkpoint(self, reason: str = "manual") -> str | None:
        """Save a checkpoint of the watched objects now, between two steps, and register it
        with the collector; the path on rank 0 (other ranks save nothing: None), None when it
        failed (logged) or nothing is watched."""
        watcher = self._watcher
        if watcher is None or self._finished or self._pid != os.getpid():
            if watcher is None:
                log.warning("runwatch agent: run.checkpoint() before run.watch(): nothing saved")
            return None
        from runwatch.agent.checkpoint import CheckpointError

        with swallow_internal("checkpoint", self.faults):
            try:
                return watcher.checkpoint(str(reason))
            except CheckpointError:
                return None  # logged where it failed
        return None

    def data(self, iterable: Iterable[T]) -> Iterator[T]:
        """Iterate the training batches through this: a ``rollback`` command is applied at a
        batch boundary (it also drops batches), on every rank at the same step. See
        :mod:`runwatch.agent.data`. Wrap one training loader at a time, not the evaluation's."""
        if self._finished or self._pid != os.getpid():
            return iter(iterable)
        return Batches(iterable, self._control, lambda: self._watcher, self.faults)

    def resume_checkpoint(self) -> str | None:
        """The checkpoint this process should resume from: ``$RUNWATCH_RESUME_FROM`` (set by
        ``runwatch supervise`` when it restarts a trainer), else None."""
        return resume_from()

    def resume(self) -> int | None:
        """Load :meth:`resume_checkpoint` into the watched objects (call after :meth:`watch`)
        and continue the step count from it; its step, or None without one. A file that cannot
        be read or does not fit changes nothing: the error is logged and None returned."""
        path = self.resume_checkpoint()
        if path is None:
            return None
        watcher = self._watcher
        if watcher is None or self._finished or self._pid != os.getpid():
            log.error("runwatch agent: resume needs run.watch(...) first; %s not loaded", path)
            return None
        from runwatch.agent.checkpoint import CheckpointError

        with swallow_internal("resume", self.faults):
            try:
                step = watcher.resume(path)
            except CheckpointError as exc:
                log.error("runwatch agent: cannot resume: %s", exc)
                return None
            self._next_step = step
            return step
        return None

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything logged so far reached the collector; False on timeout."""
        if self._finished or self._pid != os.getpid():
            return False
        return self._sender.flush(self.options.finish_timeout if timeout is None else timeout)

    def finish(self, state: str = "finished") -> None:
        """Stop hooks and threads, deliver what is queued within ``finish_timeout`` (the rest
        goes to the spool, replayed by the next process of this run), and mark the run
        ``state`` (``finished``, ``failed`` or ``crashed``). Idempotent.
        """
        with self._lock:
            if self._finished:
                return
            self._finished = True
        if self._pid != os.getpid():
            return
        with swallow_internal("finish", self.faults):
            if self._watcher is not None:
                self._watcher.remove()
            if self._sampler is not None:
                self._sampler.stop()
            self._sender.close(self.options.finish_timeout, state)
        atexit.unregister(self._at_exit)

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.finish("finished" if kind is None else "failed")

    # -- internals ----------------------------------------------------------------------------
    def _start_sampler(self, where: Placement) -> None:
        from runwatch.agent.system import SystemSampler

        with swallow_internal("system sampler", self.faults):
            self._sampler = SystemSampler(
                self._buffer,
                step=lambda: self.step,
                interval=self.options.system_interval,
                gpu_indices=local_gpu(where.local_rank, where.world_size),
                faults=self.faults,
            )
            self._sampler.start()

    def _at_exit(self) -> None:
        """The script ended without ``finish()``: deliver, and say how it ended."""
        self.finish("crashed" if _uncaught.seen else "finished")

    def _forked(self) -> None:
        """In a forked child: this run is inert (see the module docstring)."""
        self._finished = True
        self._buffer.reset_after_fork()
        watcher, self._watcher = self._watcher, None
        if watcher is not None:  # the child's copy of the model computes no norms for nobody
            with suppress(Exception):
                watcher.remove()


class _Uncaught:
    """Chains ``sys.excepthook`` to tell a crash from a clean exit at interpreter exit."""

    def __init__(self) -> None:
        self.seen = False
        self._previous = sys.excepthook
        sys.excepthook = self._hook

    def _hook(self, *args: Any) -> None:
        self.seen = True
        self._previous(*args)


_uncaught = _Uncaught()


def _after_fork_in_child() -> None:
    for run in list(_LIVE_RUNS):
        run._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
