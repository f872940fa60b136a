"""What the Lightning and Hugging Face callbacks share: the run they record into.

A callback either records into a run the user made (and leaves finishing it to
the user) or starts one from :func:`runwatch.init` arguments when training
begins and finishes it when training ends.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from runwatch.agent import init
from runwatch.agent.options import resolve

if TYPE_CHECKING:
    import torch

    from runwatch.agent import DisabledRun
    from runwatch.agent.run import Run

log = logging.getLogger("runwatch.agent")


class RunOwner:
    """Mixin of both callbacks: options checked at construction, run started, watched, ended."""

    def __init__(
        self,
        *,
        run: Run | DisabledRun | None = None,
        watch: bool = True,
        layer_every: int = 10,
        activation_every: int = 10,
        activations: str | Sequence[str] | None = "auto",
        **init_kwargs: Any,
    ) -> None:
        if run is not None and init_kwargs:
            names = ", ".join(sorted(init_kwargs))
            raise ValueError(f"give run= or runwatch.init arguments, not both (got {names})")
        for label, every in (("layer_every", layer_every), ("activation_every", activation_every)):
            if every < 0:
                raise ValueError(f"{label} must be >= 0 (0 = never), not {every}")
        if run is None:
            project = init_kwargs.pop("project", None)
            resolve(project, **init_kwargs)  # fail here, at set-up, on a bad option
            init_kwargs["project"] = project
        self.run = run
        """The run being recorded (after training: the last one); None before training starts."""
        self.watch = watch
        self.layer_every = layer_every
        self.activation_every = activation_every
        self.activations = activations
        self.init_kwargs = init_kwargs
        self._owns_run = run is None
        self._open = False
        """Whether this callback holds a run it started and has not finished."""
        self._watching = False
        super().__init__()

    def _start_run(self) -> None:
        if self._owns_run and not self._open:
            self.run = init(**self.init_kwargs)
            self._open = True

    def _watch_model(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: object | None,
        start_step: int,
    ) -> None:
        """``run.watch``; unknown ``activations`` names are the user's mistake: warn, go on."""
        self._watching = False
        if self.run is None or not self.watch:
            return
        every = {"layer_every": self.layer_every, "activation_every": self.activation_every}
        try:
            self.run.watch(
                model,
                optimizer,
                scheduler,
                activations=self.activations,
                start_step=start_step,
                **every,
            )
        except ValueError as exc:
            log.warning("runwatch: %s; watching without activation statistics", exc)
            self.run.watch(
                model, optimizer, scheduler, activations=None, start_step=start_step, **every
            )
        self._watching = True

    def _finish_run(self, state: str) -> None:
        self._watching = False
        if self._owns_run and self._open and self.run is not None:
            self._open = False
            self.run.finish(state)
