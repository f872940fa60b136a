"""Hugging Face: :class:`RunwatchCallback` records a ``transformers.Trainer`` run in runwatch.

The callback needs none of the Trainer's ``report_to`` integrations: pass
``report_to="none"`` and ``callbacks=[RunwatchCallback(...)]`` (see the class's example).

What goes where. The watcher that :meth:`Run.watch <runwatch.agent.run.Run.watch>` installs
records ``train/grad_norm``, ``train/lr``, ``train/step_time``, ``train/data_wait``, throughput,
per-layer norms and activation statistics on every step; the callback adds what the Trainer has
already turned into numbers, when the Trainer logs (every ``logging_steps``, after each
evaluation, at the end), so that it costs no device sync of its own:

==================================================  ===========================================
Trainer ``logs`` / evaluation ``metrics``           runwatch
==================================================  ===========================================
``loss`` (mean over the steps since the last log)   ``train/loss``
``epoch`` (fractional)                              ``train/epoch``
``grad_norm`` (before the Trainer's clipping)       ``train/grad_norm`` with ``watch=False``;
                                                    ``train/grad_norm_unclipped`` while
                                                    watching (the watcher's ``train/grad_norm``
                                                    is what the optimizer applies, after
                                                    ``max_grad_norm`` clipping)
``learning_rate``                                   ``train/lr`` with ``watch=False``; left
                                                    out while watching (the watcher's)
any other training key (``total_flos``,             ``train/<name>``, unchanged
``train_runtime``, ``train_loss``: the end-of-
training summary, a mean over the whole run)
``eval_loss``, ``eval_<name>``                      ``val/loss``, ``val/<name>``
(``Trainer.evaluate``, ``eval_strategy``)
==================================================  ===========================================

Evaluation metrics come from ``on_evaluate``; the copy of them that ``on_log`` also receives is
skipped. Only the world's process zero sends these scalars (``state.is_world_process_zero``);
every process watches, and the :class:`~runwatch.agent.run.Run` sends only timings from ranks
other than 0.

Steps: while watching, a value belongs to the watched optimizer's iteration (0-based), so the
loss logged after optimizer step ``i`` sits at step ``i``, next to that step's gradient norm; it
is ``state.global_step - 1``. With ``watch=False`` the callback uses ``state.global_step - 1``
itself. An evaluation lands on the step of the last optimizer step.

Stopping: once the collector's ``stop`` command has been applied (:attr:`Run.should_stop
<runwatch.agent.run.Run.should_stop>`), ``on_step_end`` sets ``control.should_training_stop``;
every rank applies the command at the same optimizer step.

Exceptions: ``TrainerCallback`` has no hook for a training that raises, so a run the callback
started stays open when ``train()`` fails; at interpreter exit it is finished as ``crashed``
(the exception was not caught) or ``finished``. To mark a failure yourself, pass your own run:
``with runwatch.init(...) as run: trainer.train()`` finishes it ``failed`` on an exception.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from runwatch.agent.integrations.common import RunOwner
from runwatch.agent.safety import swallow_internal

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments


__all__ = ["RunwatchCallback"]

log = logging.getLogger("runwatch.agent")

PART = "transformers callback"
_WATCHED = {"grad_norm": "train/grad_norm", "learning_rate": "train/lr"}
"""Trainer log keys the watcher records itself: sent only with ``watch=False``."""
_EVAL_PREFIX = "eval_"
UNCLIPPED = "train/grad_norm_unclipped"
"""The Trainer's own gradient norm, taken before it clips, at its logging cadence."""


class RunwatchCallback(RunOwner, TrainerCallback):
    """Records a ``transformers.Trainer`` run in runwatch; see the module docstring for the keys.

    Give either ``run``, a run made with :func:`runwatch.init` (the callback then leaves
    finishing it to you), or the keyword arguments of :func:`runwatch.init` (``project`` at
    least, or ``RUNWATCH_PROJECT``): the callback then starts the run when training begins and
    finishes it when training ends. Bad options raise ``ValueError`` here; nothing raises into
    the Trainer once it runs.

    ``watch``: hook the model and the optimizer (:meth:`Run.watch
    <runwatch.agent.run.Run.watch>`, with ``layer_every``, ``activation_every`` and
    ``activations``) when training begins.

    >>> from transformers import Trainer, TrainingArguments
    >>> from runwatch.agent.integrations.transformers import RunwatchCallback
    >>> callback = RunwatchCallback(project="demo", name="gpt2-lr3e-4")
    >>> args = TrainingArguments("out", logging_steps=10, report_to="none")  # doctest: +SKIP
    >>> trainer = Trainer(model, args, train_dataset=train, callbacks=[callback])  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    """

    # -- TrainerCallback events -----------------------------------------------------------------
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler: object | None = None,
        **kwargs: Any,
    ) -> None:
        """Start the run (if this callback owns it) and hook the model and optimizer."""
        with swallow_internal(PART):
            self._start_run()
            self._watching = False
            if model is None or optimizer is None:
                return
            self._watch_model(model, _torch_optimizer(optimizer), lr_scheduler, state.global_step)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """The Trainer's training logs, mapped onto runwatch's keys."""
        with swallow_internal(PART):
            if self.run is None or not logs or not state.is_world_process_zero:
                return
            metrics = _train_metrics(logs, watching=self._watching)
            if metrics:
                self.run.log(metrics, step=self._step(state))

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """The evaluation metrics as ``val/...``, at the step of the last optimizer step."""
        with swallow_internal(PART):
            if self.run is None or not metrics or not state.is_world_process_zero:
                return
            values = _val_metrics(metrics)
            if values:
                self.run.log(values, step=self._step(state))

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """End training when the collector asked to (``run.should_stop``); every rank applies
        the ``stop`` command at the same optimizer step, so the ranks agree."""
        with swallow_internal(PART):
            if self.run is not None and self.run.should_stop:
                control.should_training_stop = True

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Finish a run this callback started."""
        with swallow_internal(PART):
            self._finish_run("finished")

    # -- internals ------------------------------------------------------------------------------
    def _step(self, state: TrainerState) -> int | None:
        """None (the watched optimizer's step) while watching, else the last optimizer step."""
        return None if self._watching else max(state.global_step - 1, 0)


def _torch_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's ``AcceleratedOptimizer`` (and similar wrappers).

    The wrapper is itself an ``Optimizer`` but runs no step hooks of its own; its ``step``
    calls the inner optimizer's, whose hooks fire.
    """
    inner = getattr(optimizer, "optimizer", None)
    while isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
        optimizer = inner
        inner = getattr(optimizer, "optimizer", None)
    return optimizer


def _is_number(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _train_metrics(logs: Mapping[str, Any], *, watching: bool) -> dict[str, Any]:
    """Training keys of one ``on_log`` call; evaluation keys are ``on_evaluate``'s."""
    if any(key.startswith(_EVAL_PREFIX) for key in logs):
        return {}  # the evaluation's own log line (metrics and epoch): on_evaluate has it
    metrics: dict[str, Any] = {}
    for key, value in logs.items():
        if not _is_number(value):
            continue
        if key in _WATCHED:
            if not watching:
                metrics[_WATCHED[key]] = value
            elif key == "grad_norm":  # the watcher only sees it after clipping
                metrics[UNCLIPPED] = value
        else:
            metrics[f"train/{key}"] = value
    return metrics


def _val_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``eval_<name>`` -> ``val/<name>``; ``epoch`` is training bookkeeping, left out."""
    values: dict[str, Any] = {}
    for key, value in metrics.items():
        if key == "epoch" or not _is_number(value):
            continue
        name = key[len(_EVAL_PREFIX) :] if key.startswith(_EVAL_PREFIX) else key
        values[f"val/{name}"] = value
    return values
