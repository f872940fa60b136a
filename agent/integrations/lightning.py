"""Lightning: :class:`RunwatchCallback` records a ``Trainer.fit`` in runwatch.

Works with ``lightning`` (``lightning.pytorch``) and with the older standalone
``pytorch_lightning`` package; ``lightning.pytorch`` is used when both are installed (Lightning
calls callbacks by duck typing, so either trainer takes the callback).

What goes where. The watcher that :meth:`Run.watch <runwatch.agent.run.Run.watch>` installs
records ``train/grad_norm``, ``train/lr``, ``train/step_time``, ``train/data_wait``, throughput,
per-layer norms and activation statistics; the callback adds what Lightning has already
computed, at Lightning's own cadence (every ``log_every_n_steps`` optimizer steps, at the end of
a training epoch, at the end of a validation run), so that it costs no extra device sync:

====================================================  =========================================
Lightning                                             runwatch
====================================================  =========================================
``self.log("loss" | "train_loss" | "train/loss")``    ``train/loss``
in ``training_step`` (``on_step=True``, the default)
any other ``self.log(name)`` in training, on step     ``train/<name>``, a leading ``train_`` or
                                                      ``train/`` removed
the loss ``training_step`` returned, when no logged   ``train/loss`` (times
name maps to ``train/loss``                           ``accumulate_grad_batches``: the last
                                                      micro-batch's loss)
``self.log(name, on_epoch=True)`` in training         ``train/<name>`` at the epoch's last step;
                                                      ``train/<name>_epoch`` when the metric is
                                                      also logged on step
``self.log("val_loss" | "val/loss" | "loss")`` in     ``val/loss``; any other name
validation                                            ``val/<name>``, a leading ``val_`` or
                                                      ``val/`` removed
``trainer.current_epoch``                             ``train/epoch``
====================================================  =========================================

A metric is training or validation by the loop that logged it, not by its name, so a
validation metric is never sent again as a training one (Lightning keeps the last validation
values in ``trainer.callback_metrics`` through the training steps that follow). The sanity
check's validation is not recorded. Values stay tensors: the agent reads them in its sender
thread, off the training step.

Steps: while watching, a value belongs to the watched optimizer's iteration (0-based), so the
loss of optimizer step ``i`` sits at step ``i`` next to that step's gradient norm; it is
``trainer.global_step - 1`` at the time of logging. With ``watch=False`` the callback uses
``trainer.global_step - 1`` itself. Validation lands on the step of the last optimizer step.

Stopping: when the collector's ``stop`` command has been applied (:attr:`Run.should_stop
<runwatch.agent.run.Run.should_stop>`), the callback sets ``trainer.should_stop`` at the end of
that batch; every rank applies the command at the same optimizer step.

Ranks: every rank creates its run in ``setup`` (the process group exists then) and watches; the
:class:`~runwatch.agent.run.Run` sends training scalars from rank 0 only and timings from
every rank. Automatic optimization, or manual optimization with one optimizer: with several
optimizers only ``trainer.optimizers[0]`` is watched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package, before Lightning 2.0's unified one
    import pytorch_lightning as pl  # type: ignore[no-redef]

import torch

from runwatch.agent.integrations.common import RunOwner
from runwatch.agent.safety import swallow_internal

if TYPE_CHECKING:
    pass

__all__ = ["RunwatchCallback"]

log = logging.getLogger("runwatch.agent")

PART = "lightning callback"
_TRAIN_PREFIXES = ("train/", "train_")
_VAL_PREFIXES = ("val/", "val_")
_DATALOADER_SUFFIX = "/dataloader_idx_"


class RunwatchCallback(RunOwner, pl.Callback):
    """Records a Lightning ``Trainer.fit`` in runwatch; see the module docstring for the keys.

    Give either ``run``, a run made with :func:`runwatch.init` (the callback then leaves
    finishing it to you), or the keyword arguments of :func:`runwatch.init` (``project`` at
    least, or ``RUNWATCH_PROJECT``): the callback then starts the run when ``fit`` sets up and
    finishes it when ``fit`` ends, ``failed`` when it ends with an exception. Bad options raise
    ``ValueError`` here; nothing raises into the trainer once it runs.

    ``watch``: hook the ``LightningModule`` and its optimizer (:meth:`Run.watch
    <runwatch.agent.run.Run.watch>`, with ``layer_every``, ``activation_every`` and
    ``activations``) when training starts.

    >>> import lightning.pytorch as pl
    >>> from runwatch.agent.integrations.lightning import RunwatchCallback
    >>> callback = RunwatchCallback(project="demo", name="mlp-lr3e-4", config={"lr": 3e-4})
    >>> trainer = pl.Trainer(max_steps=1000, callbacks=[callback])  # doctest: +SKIP
    >>> trainer.fit(model, train_loader, val_loader)  # doctest: +SKIP
    >>> callback.run.id  # doctest: +SKIP
    17
    """

    # -- Lightning hooks ------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Start the run for ``fit``: the process group exists by now, so ranks are known."""
        with swallow_internal(PART):
            if stage == "fit":
                self._start_run()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Hook the module and its first optimizer."""
        with swallow_internal(PART):
            self._watching = False
            if not trainer.optimizers:
                return
            configs = trainer.lr_scheduler_configs
            scheduler = configs[0].scheduler if configs else None
            self._watch_model(pl_module, trainer.optimizers[0], scheduler, trainer.global_step)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Note the optimizer step count, to tell a stepping batch from an accumulating one."""
        with swallow_internal(PART):
            self._steps_at_batch_start = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """At Lightning's log cadence: the training metrics of this step. On every step: stop
        when the collector asked to (``run.should_stop``; every rank applies the ``stop``
        command at the same step, so the ranks agree without a collective)."""
        with swallow_internal(PART):
            run = self.run
            if run is not None and run.should_stop:
                trainer.should_stop = True
            if run is None or trainer.global_step == self._steps_at_batch_start:
                return  # no optimizer step in this batch (gradient accumulation)
            if not _should_update_logs(trainer):
                return
            metrics = {
                _train_key(name): value for name, value in _loop_metrics(trainer, "step").items()
            }
            if "train/loss" not in metrics:
                loss = _returned_loss(trainer, pl_module, outputs)
                if loss is not None:
                    metrics["train/loss"] = loss
            metrics["train/epoch"] = trainer.current_epoch
            run.log(metrics, step=self._step(trainer))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The epoch-level training metrics (``self.log(..., on_epoch=True)``)."""
        with swallow_internal(PART):
            if self.run is None or trainer.global_step == 0:
                return
            metrics = _loop_metrics(trainer, "train_epoch")
            if metrics:
                self.run.log(
                    {_train_key(name): value for name, value in metrics.items()},
                    step=self._step(trainer),
                )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The validation metrics, at the step of the last optimizer step."""
        with swallow_internal(PART):
            if self.run is None or trainer.sanity_checking:
                return
            metrics = _loop_metrics(trainer, "validation")
            if metrics:
                self.run.log(
                    {_val_key(name): value for name, value in metrics.items()},
                    step=self._step(trainer),
                )

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Training failed: finish a run this callback started as ``failed``."""
        with swallow_internal(PART):
            self._finish_run("failed")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """``fit`` is over: finish a run this callback started (a no-op after ``on_exception``)."""
        with swallow_internal(PART):
            if stage == "fit":
                self._finish_run("finished")

    # -- internals ------------------------------------------------------------------------------
    def _step(self, trainer: pl.Trainer) -> int | None:
        """None (the watched optimizer's step) while watching, else the last optimizer step."""
        return None if self._watching else max(trainer.global_step - 1, 0)


def _should_update_logs(trainer: pl.Trainer) -> bool:
    """Lightning's own decision to send step metrics to its loggers, asked in the same place."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is not None and hasattr(connector, "should_update_logs"):
        return bool(connector.should_update_logs)
    every = trainer.log_every_n_steps
    return bool(every) and (trainer.global_step % every == 0 or trainer.should_stop)


def _loop_metrics(trainer: pl.Trainer, phase: str) -> dict[str, Any]:
    """What the running loop logged, from ``trainer.callback_metrics`` (tensors, no reads).

    ``phase``: ``"step"`` (metrics logged on step, in a training batch hook), ``"train_epoch"``
    (metrics logged on epoch, at the end of a training epoch) or ``"validation"``.
    """
    available = trainer.callback_metrics
    names = _loop_names(trainer, phase)
    if names is None:  # a Lightning without per-loop results: tell the phases by name
        validation = phase == "validation"
        names = [name for name in available if name.startswith(_VAL_PREFIXES) == validation]
    found: dict[str, Any] = {}
    for name in names:
        for key in _with_dataloader_keys(name, available):
            value = available[key]
            found[key] = value.detach() if isinstance(value, torch.Tensor) else value
    return found


def _loop_names(trainer: pl.Trainer, phase: str) -> list[str] | None:
    """Names under which the running loop's metrics sit in ``callback_metrics`` in ``phase``.

    Lightning keeps one result collection per loop (``trainer._results``, the running loop's);
    the metrics' ``meta`` says how each was logged. None when this Lightning has no such thing.
    """
    results = getattr(trainer, "_results", None)
    if results is None or not hasattr(results, "values"):
        return None
    names = []
    for metric in results.values():
        meta = getattr(metric, "meta", None)
        if meta is None or getattr(metric, "has_reset", False):
            continue  # has_reset: logged in an earlier epoch, not in this one
        if phase == "step":
            if meta.on_step:
                names.append(meta.name)
        elif meta.on_epoch:
            both = phase == "train_epoch" and meta.on_step
            names.append(f"{meta.name}_epoch" if both else meta.name)
    return names


def _with_dataloader_keys(name: str, available: Mapping[str, Any]) -> Iterator[str]:
    """``name`` and its ``name/dataloader_idx_<i>`` forms (several validation loaders)."""
    if name in available:
        yield name
    prefix = name + _DATALOADER_SUFFIX
    yield from (key for key in available if key.startswith(prefix))


def _returned_loss(trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any) -> Any:
    """The loss ``training_step`` returned, undoing automatic optimization's 1/accumulation."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        return None
    loss = loss.detach()
    accumulate = trainer.accumulate_grad_batches
    if pl_module.automatic_optimization and accumulate != 1:
        loss = loss * accumulate  # on the device: no sync
    return loss


def _train_key(name: str) -> str:
    for prefix in _TRAIN_PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix):
            return f"train/{name[len(prefix) :]}"
    return f"train/{name}"


def _val_key(name: str) -> str:
    for prefix in _VAL_PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix):
            return f"val/{name[len(prefix) :]}"
    return f"val/{name}"
