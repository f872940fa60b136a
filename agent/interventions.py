"""What commands and the non-finite guard do to an optimizer step: :class:`Interventions`.

The :class:`~runwatch.agent.hooks.Watcher` calls in at three points of each optimizer step: the
pre-step hook (:meth:`Interventions.before_step`: take the commands due at this step, scale the
learning rate), the moment the gradients are final (:meth:`Interventions.on_gradients`: skip,
clip, guard against non-finite values) and the post-step hook
(:meth:`Interventions.after_step`: restore the learning rate). Nothing here reads a device value
on the host, except the non-finite check of a gradient norm that lives on the CPU.

Interventions (DESIGN.md, "Interventions"):

- ``lr_scale(factor, steps)``: every param group's ``lr`` times ``factor`` from the pre-step
  hook to the post-step hook of ``steps`` optimizer steps. The scheduler never sees the scaled
  value (it runs after ``optimizer.step()``), so its own bookkeeping, chainable or closed-form,
  is untouched and the schedule resumes exactly where it would have been.
- ``clip(max_norm)``: from then on (until the next ``clip``), gradients times
  ``min(1, max_norm / (norm + 1e-6))`` where ``norm`` is the global gradient norm the watcher
  computed anyway: one fused multiply by a 0-d tensor, no host sync. ``clip(mode="adaptive")``
  is ZClip (arXiv 2504.02507): EMA mean and variance of the norm (momentum ``alpha``), after
  ``warmup`` steps clip to ``mean + z * std``; the EMA takes the clipped norm. On the device.
- ``skip_step``: this step's gradients are dropped (``p.grad = None``), so the optimizer moves
  no parameter and touches no state.
- ``checkpoint(reason)``: the state after ``step`` updates is saved at the pre-step hook of
  ``step`` (:class:`~runwatch.agent.checkpoint.Checkpointer`; rank 0 writes, every rank acks);
  ``checkpoint_every=N`` does the same at every N-th step (not at the step a run started,
  resumed or rolled back at: that state is on disk already).
- ``stop``: a checkpoint (when a checkpointer is configured; a failed save does not prevent the
  stop), then :attr:`Control.should_stop <runwatch.agent.control.Control.should_stop>`.
- ``rollback`` is applied at a batch boundary of ``run.data`` (:mod:`runwatch.agent.data`);
  one that reaches the pre-step hook (the loop does not iterate ``run.data``) fails.

Non-finite gradients (``skip_nonfinite``, local, no round trip, not acknowledged). A NaN or an
infinity in one gradient makes the global norm non-finite:

- norm on the CPU: checked on the host (no device involved) and the step skipped exactly as
  ``skip_step`` does.
- norm on an accelerator, optimizer with a fused step that takes ``found_inf`` (``fused=True``
  Adam, AdamW, SGD, Adagrad: the protocol ``GradScaler`` uses): the flag is handed to the
  fused kernel, which skips the update and leaves the state (``step`` included) untouched.
  Exact, and no host sync.
- any other optimizer on an accelerator: the gradients are zeroed on the device
  (``masked_fill_`` by the 0-d flag, one small kernel per gradient tensor) instead of reading
  the flag on the host, which would cost a sync every step. Nothing non-finite reaches the
  parameters or the optimizer state, but a stateful optimizer still takes a step with zero
  gradients: Adam's moments decay and its step count advances (the parameters move along the
  decayed momentum), SGD with momentum coasts, decoupled weight decay shrinks the weights. Only
  plain SGD skips exactly. Use a fused optimizer for an exact skip without a sync.

Recorded (primary rank, at the step): ``control/{type}`` for each applied command (the factor
of ``lr_scale``, the ``max_norm`` of a clip or the ``z`` of an adaptive one, the target step of
a rollback, 1 otherwise), ``control/checkpoint`` = the step of every checkpoint saved,
``control/clip_coef`` (and ``control/clip_threshold``, adaptive) on every clipped step,
``control/skipped_step`` = 1 on a skipped step (on an accelerator without a host read: every
step, 0 or 1).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from runwatch import wire
from runwatch.agent.buffer import CRITICAL
from runwatch.agent.checkpoint import CheckpointError
from runwatch.agent.control import AT_STEP

if TYPE_CHECKING:
    from runwatch.agent.buffer import Sink
    from runwatch.agent.checkpoint import Checkpointer
    from runwatch.agent.control import Control

log = logging.getLogger("runwatch.agent")

NEEDS_DATA = (
    "rollback: the training loop does not iterate run.data(...), so the data cannot be moved; "
    "wrap the training batches: for batch in run.data(loader): ..."
)
NO_CHECKPOINTER = "no checkpointer: watch the model with run.watch(...) to save checkpoints"

NEVER = sys.maxsize
"""``pre_step_at`` when no step's pre-step hook has work (no step gets that far)."""

EPS = 1e-6
"""Added to the norm in the clip coefficient, as ``torch.nn.utils.clip_grad_norm_`` does."""

GradLists = Callable[[], list[list[torch.Tensor]]]
"""The optimizer's gradients, one list per device and dtype (each one fused call)."""


class FixedClip:
    """Clip the global gradient norm to ``max_norm``.

    >>> coef, _ = FixedClip(1.0).coefficient(torch.tensor(4.0))
    >>> round(coef.item(), 6)
    0.25
    """

    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm

    def coefficient(self, norm: torch.Tensor) -> tuple[torch.Tensor, None]:
        """The factor for the gradients (a 0-d tensor), and no threshold to report."""
        return torch.clamp(self.max_norm / (norm + EPS), max=1.0), None


class AdaptiveClip:
    """ZClip: clip the norm to ``mean + z * std`` of its EMA, after ``warmup`` steps.

    All on the norm's device: the warm-up norms go into a small tensor, the EMA state is two
    0-d tensors. A non-finite norm changes no state.

    >>> clip = AdaptiveClip(z=2.5, alpha=0.97, warmup=3)
    >>> [clip.coefficient(torch.tensor(n)) for n in (1.0, 1.2, 0.8)]
    [None, None, None]
    >>> coef, threshold = clip.coefficient(torch.tensor(10.0))
    >>> round(threshold.item(), 3), round(coef.item(), 3)
    (1.408, 0.141)
    """

    def __init__(self, z: float = 2.5, alpha: float = 0.97, warmup: int = 25) -> None:
        self.z = z
        self.alpha = alpha
        self.warmup = warmup
        self._seen = 0
        self._warm: torch.Tensor | None = None
        self._mean: torch.Tensor | None = None
        self._var: torch.Tensor | None = None

    def coefficient(self, norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The factor for the gradients and the threshold; None during the warm-up."""
        if self._mean is None or self._var is None:
            if self._warm is None:
                self._warm = torch.full((self.warmup,), math.nan, device=norm.device)
            self._warm[self._seen] = norm  # a copy kernel: no host read
            self._seen += 1
            if self._seen == self.warmup:
                warm = torch.where(torch.isfinite(self._warm), self._warm, math.nan)
                self._mean = torch.nanmean(warm)
                self._var = torch.nanmean((warm - self._mean).square())
                self._warm = None
            return None
        mean, var = self._mean, self._var
        threshold = mean + self.z * var.sqrt()
        # No baseline (a warm-up without one finite norm): NaN, and no clipping.
        coef = torch.clamp(threshold / (norm + EPS), max=1.0).nan_to_num(1.0)
        clipped = torch.fmin(norm, threshold)  # fmin: a NaN threshold gives the norm
        new_mean = self.alpha * mean + (1 - self.alpha) * clipped
        new_var = self.alpha * var + (1 - self.alpha) * (clipped - new_mean).square()
        fresh = torch.isnan(mean)
        new_mean = torch.where(fresh, clipped, new_mean)
        new_var = torch.where(fresh, torch.zeros_like(var), new_var)
        finite = torch.isfinite(norm)
        self._mean = torch.where(finite, new_mean, mean)
        self._var = torch.where(finite, new_var, var)
        return coef, threshold


class Interventions:
    """Applies commands and the non-finite guard to the steps of ``optimizer``.

    ``acting`` is what the watcher checks in its hooks (with ``control.busy`` and
    ``skip_nonfinite``): False while nothing is in force, so an idle step pays one check;
    ``pre_step_at`` likewise for the pre-step hook: the first step whose pre-step hook has work
    (0 while something is in force, the next routine checkpoint's step with
    ``checkpoint_every``, else :data:`NEVER`), so an idle step pays one integer comparison.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        sink: Sink,
        control: Control,
        *,
        primary: bool = True,
        skip_nonfinite: bool = True,
        checkpointer: Checkpointer | None = None,
        checkpoint_every: int | None = None,
        start_step: int = 0,
    ) -> None:
        if checkpoint_every is not None and (
            type(checkpoint_every) is not int or checkpoint_every < 1
        ):
            raise ValueError(f"checkpoint_every must be an integer >= 1, not {checkpoint_every!r}")
        self.optimizer = optimizer
        self.sink = sink
        self.control = control
        self.primary = primary
        self.skip_nonfinite = skip_nonfinite
        self.checkpointer = checkpointer
        self.checkpoint_every = checkpoint_every if checkpointer is not None else None
        self.acting = False
        self.pre_step_at = NEVER
        self._save_at: int | None = None
        self._saved_at: int | None = None
        self._lr_factor = 1.0
        self._lr_left = 0
        self._lr_saved: list[Any] | None = None
        self._clip: FixedClip | AdaptiveClip | None = None
        self._skip = False
        self._found_inf_set = False
        self._warned = False
        self.restarted(start_step)

    # -- the three points of a step -----------------------------------------------------------
    def before_step(self, step: int) -> None:
        """Pre-step hook: the commands due at ``step``, then the learning rate."""
        self._cleanup()  # a step that raised never reached its post-step hook
        if self.control.busy:
            kinds = AT_STEP if self.control.data_boundary else None
            for command in self.control.due(step, kinds):
                self._apply(command, step)
        if self._save_at is not None and step >= self._save_at:
            self._save_at = self._next_save(step)
            if self._saved_at != step:  # a checkpoint or stop command saved it already
                with contextlib.suppress(CheckpointError):  # logged by save_checkpoint
                    self.save_checkpoint(step, "routine")
        if self._lr_left:
            self._scale_lr()
        self._update()

    def on_gradients(self, step: int, norm: torch.Tensor | None, grads: GradLists) -> None:
        """The gradients are final: skip, clip, guard. ``norm``: their global norm.

        ``grads`` is passed in, not kept: the watcher owns the model, and a reference back to
        it would keep the model alive past the watcher (a cycle only the GC breaks, perhaps
        after the process group the model's DDP wrapper needs is gone).
        """
        if norm is None:  # no gradients at all: nothing to clip or skip
            if self._skip:
                self._skip = False
                self._update()
            return
        on_host = norm.device.type == "cpu"
        nonfinite = self.skip_nonfinite and on_host and not bool(torch.isfinite(norm))
        if self._skip or nonfinite:
            self._drop_gradients(step, nonfinite=nonfinite and not self._skip)
            return
        if self._clip is not None:
            self._apply_clip(step, norm, grads)
        if self.skip_nonfinite and not on_host:
            self._guard_on_device(step, norm, grads)

    def after_step(self, step: int) -> None:
        """Post-step hook: restore the learning rate; count the window down."""
        if self._lr_saved is not None:
            self._restore_lr()
            self._lr_left -= 1
        self._cleanup()
        self._skip = False
        self._update()

    def close(self) -> None:
        """Undo what is in force: the learning rate, a ``found_inf`` flag; stop acting."""
        self._cleanup()
        self._lr_left = 0
        self._clip = None
        self._skip = False
        self.skip_nonfinite = False
        self._save_at = None
        self._update()

    # -- checkpoints and rollback -------------------------------------------------------------
    def save_checkpoint(self, step: int, reason: str, command: int | None = None) -> str | None:
        """Save the state at ``step``; the path (rank 0) or None (other ranks). Raises
        :class:`~runwatch.agent.checkpoint.CheckpointError` (logged) when it failed."""
        if self.checkpointer is None:
            raise CheckpointError(NO_CHECKPOINTER)
        try:
            path = self.checkpointer.save(step, reason, command)
        except CheckpointError as exc:
            log.warning("runwatch agent: checkpoint at step %d failed: %s", step, exc)
            raise
        self._saved_at = step
        self._record(step, {"control/checkpoint": float(step)})
        return path

    def scale_lr(self, factor: float, steps: int) -> None:
        """Every param group's learning rate times ``factor`` for the next ``steps`` steps."""
        self._cleanup()
        self._lr_factor, self._lr_left = factor, steps
        self._update()

    def cleanup(self) -> None:
        """Undo what a step that never reached its post-step hook left (it raised): the
        learning rate it scaled, a ``found_inf`` flag. What is in force stays in force."""
        self._cleanup()
        self._update()

    def restarted(self, step: int) -> None:
        """The state is now that of ``step`` (a start, resume or rollback): plan the routine
        checkpoints after it."""
        self._cleanup()
        self._save_at = self._next_save(step)
        self._saved_at = None
        self._update()

    def _next_save(self, step: int) -> int | None:
        """The first routine checkpoint step after ``step``."""
        every = self.checkpoint_every
        return None if every is None else (step // every + 1) * every

    # -- commands -----------------------------------------------------------------------------
    def _apply(self, command: wire.Command, step: int) -> None:
        args = command.args
        value = 1.0
        if command.type == "lr_scale":
            self._lr_factor, self._lr_left = args["factor"], args["steps"]  # from this step on
            value = args["factor"]
            detail = f"lr x {args['factor']:g} for {args['steps']} steps"
        elif command.type == "clip" and args["mode"] == "adaptive":
            self._clip = AdaptiveClip(args["z"], args["alpha"], args["warmup"])
            value = args["z"]
            detail = (
                f"adaptive clip (z {args['z']:g}, alpha {args['alpha']:g}, "
                f"warm-up {args['warmup']} steps)"
            )
        elif command.type == "clip":
            self._clip = FixedClip(args["max_norm"])
            value = args["max_norm"]
            detail = f"gradient norm clipped to {args['max_norm']:g}"
        elif command.type == "skip_step":
            self._skip = True
            detail = "step skipped"
        elif command.type == "checkpoint":
            try:
                detail = _saved(step, self.save_checkpoint(step, args["reason"], command.id))
            except CheckpointError as exc:
                self.control.settle(command.id, "failed", f"checkpoint: {exc}", step)
                return
            value = float(step)
        elif command.type == "stop":
            reason = args.get("reason") or "no reason given"
            detail = f"stop requested: {reason}"
            try:  # the stop holds whatever becomes of its checkpoint
                if self.checkpointer is not None:
                    path = self.save_checkpoint(step, f"stop: {reason}", command.id)
                    detail = f"{detail}; {_saved(step, path)}"
            except CheckpointError as exc:
                detail = f"{detail}; checkpoint failed: {exc}"
            finally:
                self.control.should_stop = True
        elif command.type == "rollback":
            self.control.settle(command.id, "failed", NEEDS_DATA, step)
            return
        else:  # Control refuses these on arrival; a new type reaching here is a bug
            self.control.settle(command.id, "failed", f"cannot apply {command.type!r}", step)
            return
        self.control.settle(command.id, "applied", detail, step)
        self._record(step, {f"control/{command.type}": value})

    # -- learning rate ------------------------------------------------------------------------
    def _scale_lr(self) -> None:
        factor = self._lr_factor
        saved = []
        for group in self.optimizer.param_groups:
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):  # capturable / fused: scale in place
                saved.append(lr.clone())
                lr.mul_(factor)
            else:
                saved.append(lr)
                group["lr"] = lr * factor
        self._lr_saved = saved

    def _restore_lr(self) -> None:
        saved, self._lr_saved = self._lr_saved, None
        assert saved is not None
        for group, lr in zip(self.optimizer.param_groups, saved, strict=False):
            if isinstance(lr, torch.Tensor):
                group["lr"].copy_(lr)
            else:
                group["lr"] = lr  # the very value the scheduler left: no rounding drift

    # -- gradients ----------------------------------------------------------------------------
    def _drop_gradients(self, step: int, *, nonfinite: bool) -> None:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self._skip = False
        self._update()
        self._record(step, {"control/skipped_step": 1.0})
        if nonfinite:
            self.control.count_skip()
            if not self._warned:
                self._warned = True
                log.warning(
                    "runwatch agent: non-finite gradient norm at step %d: step skipped "
                    "(further skips are counted in run.stats.steps_skipped)",
                    step,
                )

    def _apply_clip(self, step: int, norm: torch.Tensor, grads: GradLists) -> None:
        assert self._clip is not None
        found = self._clip.coefficient(norm)
        if found is None:  # adaptive, warming up
            return
        coef, threshold = found
        for same_kind in grads():
            torch._foreach_mul_(same_kind, coef.to(same_kind[0].device))
        values: dict[str, Any] = {"control/clip_coef": coef}
        if threshold is not None:
            values["control/clip_threshold"] = threshold
        self._record(step, values)

    def _guard_on_device(self, step: int, norm: torch.Tensor, grads: GradLists) -> None:
        """Non-finite gradients on an accelerator, without reading the flag on the host."""
        bad = ~torch.isfinite(norm)
        optimizer = self.optimizer
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            flag = bad.to(torch.float32)
            current = getattr(optimizer, "found_inf", None)
            if current is None:
                optimizer.found_inf = flag  # type: ignore[attr-defined]
                self._found_inf_set = True
                self.acting = True  # the post-step hook must take it away again
            else:  # GradScaler's own flag (it removes it after the step)
                optimizer.found_inf = torch.maximum(current, flag.to(current.device))  # type: ignore[attr-defined]
        else:
            for same_kind in grads():
                mask = bad.to(same_kind[0].device)
                for grad in same_kind:
                    grad.masked_fill_(mask, 0.0)
        self.control.count_skip(bad)
        self._record(step, {"control/skipped_step": bad.to(torch.float32)})

    # -- internals ------------------------------------------------------------------------------
    def _cleanup(self) -> None:
        if self._lr_saved is not None:
            self._restore_lr()
        if self._found_inf_set:
            self._found_inf_set = False
            if hasattr(self.optimizer, "found_inf"):
                del self.optimizer.found_inf  # type: ignore[attr-defined]

    def _update(self) -> None:
        self.acting = bool(
            self._lr_left or self._clip is not None or self._skip or self._found_inf_set
        )
        if self.acting:
            self.pre_step_at = 0
        else:
            self.pre_step_at = NEVER if self._save_at is None else self._save_at

    def _record(self, step: int, values: dict[str, Any]) -> None:
        if self.primary:
            self.sink.put_scalars(step, values, CRITICAL)


def _saved(step: int, path: str | None) -> str:
    """An ack's words for a checkpoint: where rank 0 saved it."""
    if path is None:
        return f"checkpoint of step {step} written by rank 0"
    return f"checkpoint of step {step} saved to {path}"
