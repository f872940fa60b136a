"""Training signals from a plain PyTorch loop, taken through hooks: :class:`Watcher`.

The training step pays for whatever runs in a hook, so the hooks do as little as possible
and never wait for the device: every measurement is a tensor computed where the data lives
and handed to the sink as it is; the sender thread turns it into a number later. Nothing here
calls ``.item()``, ``float()`` or ``.tolist()`` on a tensor.

What is measured, and how often:

- every step: the global gradient norm (one fused ``torch._foreach_norm`` per device and
  dtype, in an optimizer pre-step hook) and the learning rates (post-step hook), on the
  primary rank; step time, data wait and throughput on every rank.
- every ``layer_every`` steps: per-layer gradient norms, parameter norms and update ratios.
- every ``activation_every`` steps: statistics of the outputs of a few modules. Their forward
  hooks exist only during the sampled steps: on CPU, forward hooks on 49 modules add 14-17 %
  to a 2 ms step when they run every step (DESIGN.md, "Performance notes").

A part that fails is switched off (:mod:`runwatch.agent.safety`); the others keep going.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from runwatch.agent.activations import (
    ACTIVATION_STATS,
    activation_moments,
    auto_activation_modules,
    finish_activation_stats,
    first_output,
)
from runwatch.agent.buffer import CRITICAL, DETAIL, SYSTEM
from runwatch.agent.checkpoint import CheckpointError
from runwatch.agent.control import Control
from runwatch.agent.interventions import NO_CHECKPOINTER, Interventions
from runwatch.agent.safety import FAULTS, Faults, swallow_internal

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from runwatch.agent.buffer import Sink
    from runwatch.agent.checkpoint import Checkpointer

PART_COUNTER = "hooks.counter"
"""The step counter: never switched off (its work cannot fail, and everything needs it)."""
PART_STEP = "hooks.step"
"""Step timings and throughput."""
PART_GRAD_NORM = "hooks.grad_norm"
PART_LR = "hooks.lr"
PART_LAYERS = "hooks.layers"
PART_ACTIVATIONS = "hooks.activations"
PART_CONTROL = "hooks.control"
"""Commands and the non-finite guard (:mod:`runwatch.agent.interventions`)."""
PARTS = (PART_STEP, PART_GRAD_NORM, PART_LR, PART_LAYERS, PART_ACTIVATIONS, PART_CONTROL)
CONTROL_OFF = "interventions switched off on this rank after an internal error"

MAX_GRAD_PATTERNS = 16
"""Index tensors cached for sets of parameters without gradient (see ``grad_slot_index``)."""

_TOKEN_DTYPES = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64})
_HALF_DTYPES = frozenset({torch.float16, torch.bfloat16})
_TINY = torch.finfo(torch.float32).tiny


def _norms(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """L2 norm of each tensor (same device and dtype) as one float32 vector on ``device``.

    One fused kernel for the lot; 16-bit tensors are reduced in float32, so that a float16 norm
    cannot overflow.
    """
    dtype = torch.float32 if tensors[0].dtype in _HALF_DTYPES else None
    return torch.stack(torch._foreach_norm(tensors, 2.0, dtype=dtype)).to(device, torch.float32)


def _first_tensor(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """The batch a forward was called with: its first tensor argument, positional first."""
    for value in args:
        if isinstance(value, torch.Tensor):
            return value
    for value in kwargs.values():
        if isinstance(value, torch.Tensor):
            return value
    return None


class _Group(NamedTuple):
    """Optimizer parameters of one device and dtype: what one fused call can take."""

    params: list[torch.Tensor]
    slots: list[int]
    """Layer of each parameter, as an index into :attr:`_ParamIndex.layers`."""
    slot_index: torch.Tensor
    """``slots`` as an int64 tensor on the gathering device, for ``index_add_``."""


class _ParamIndex:
    """The optimizer's parameters, their layers and their grouping, computed once.

    A layer is the module owning a parameter (its name less the last component; a top-level
    parameter is its own layer). Optimizer parameters the model does not hold are named
    ``param{i}``, ``i`` counting over all the optimizer's parameters.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        names = {id(p): name for name, p in model.named_parameters()}
        params: list[torch.Tensor] = []
        seen: set[int] = set()
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        layers: dict[str, int] = {}
        kinds: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[int]]] = {}
        for i, p in enumerate(params):
            name = names.get(id(p), f"param{i}")
            slot = layers.setdefault(name.rpartition(".")[0] or name, len(layers))
            members, slots = kinds.setdefault((p.device, p.dtype), ([], []))
            members.append(p)
            slots.append(slot)
        self.n_groups = len(optimizer.param_groups)
        self.device = params[0].device if params else torch.device("cpu")
        """Where results from several devices are gathered: the first parameter's device."""
        self.layers = list(layers)
        self.groups = [
            _Group(members, slots, torch.tensor(slots, dtype=torch.long, device=self.device))
            for members, slots in kinds.values()
        ]
        self.grad_keys = [f"grad_norm/{layer}" for layer in self.layers]
        self.param_keys = [f"param_norm/{layer}" for layer in self.layers]
        self.ratio_keys = [f"update_ratio/{layer}" for layer in self.layers]
        self._partial: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}

    def grads(self, group: _Group) -> list[torch.Tensor]:
        """The group's gradients; parameters without one are left out."""
        return [p.grad for p in group.params if p.grad is not None]

    def grad_slot_index(self, group: _Group, n_grads: int) -> torch.Tensor:
        """``slot_index`` aligned with :meth:`grads`.

        When some parameters have no gradient (frozen, or unused by the forward) the index is
        built once per pattern and cached: copying a list to a CUDA device waits for it.
        """
        if n_grads == len(group.params):
            return group.slot_index
        present = tuple(i for i, p in enumerate(group.params) if p.grad is not None)
        key = (id(group), present)
        index = self._partial.get(key)
        if index is None:
            if len(self._partial) >= MAX_GRAD_PATTERNS:
                self._partial.clear()
            slots = [group.slots[i] for i in present]
            index = self._partial[key] = torch.tensor(slots, dtype=torch.long, device=self.device)
        return index


class Watcher:
    """Puts training signals of ``model`` and ``optimizer`` into ``sink``, through hooks.

    Steps: iteration ``i`` is the forward/backward passes and the optimizer step ``i``;
    :attr:`step` starts at ``start_step``. The optimizer's post-step hook marks iteration ``i``
    done, and the counter moves to ``i + 1`` at the next grad-enabled forward of ``model`` (or
    at the next optimizer step if no forward comes first), so a value logged right after
    ``optimizer.step()``, or from an evaluation under ``torch.no_grad()``, lands on step ``i``.
    Everything measured about iteration ``i`` is put at step ``i``.

    Signals (``primary=False``, for ranks other than 0, keeps only the timing ones):

    - ``train/grad_norm`` (CRITICAL): global L2 norm of the gradients the optimizer is about to
      apply, as ``clip_grad_norm_`` computes it, a 0-d float32 tensor.
    - ``train/lr`` (CRITICAL): learning rate of param group 0, and ``train/lr/{i}`` for every
      group when there are several; read after the step, before a scheduler changes it.
    - ``train/step_time``, ``train/data_wait``, ``train/samples_per_s``, ``train/tokens_per_s``
      (SYSTEM, every rank): seconds between optimizer steps (the first from the first forward),
      seconds between an optimizer step and the next training forward (the data loader, and any
      evaluation in between), and samples / tokens per second. Samples are the leading size of
      the first tensor argument of the model's training forwards, summed over the step's
      micro-batches; tokens are its element count when it is an integer tensor with two
      dimensions or more (token ids). Host time: on CUDA, the host runs ahead of the device
      between the trainer's own syncs, so single steps jitter while the average is right.
    - every ``layer_every`` steps (DETAIL, one vector each): ``grad_norm/{layer}``,
      ``param_norm/{layer}`` (before the update) and ``update_ratio/{layer}`` =
      ``||theta_after - theta_before|| / ||theta_before||``. Memory: on those steps the
      pre-step hook keeps a copy of every optimizer parameter until the post-step hook, a
      transient extra 1x the parameters' size (2 bytes per parameter in bf16, 4 in fp32).
    - every ``activation_every`` steps (DETAIL): ``act/{module}/{stat}`` for the stats of
      :func:`~runwatch.agent.activations.activation_stats`, from the first training
      forward of each watched module in the step. Memory: up to three transient float32
      copies of that output while it is reduced.

    Interventions (:mod:`runwatch.agent.interventions`): commands that ``control`` receives are
    applied at the pre-step hook of their ``at_step`` (``lr_scale``, ``clip``, ``skip_step``,
    ``checkpoint``, ``stop``; ``rollback`` at a batch boundary of ``run.data``, which calls
    :meth:`rollback`), and with ``skip_nonfinite`` a step whose global gradient norm is not
    finite is skipped (exactly on the CPU; on an accelerator see that module for the
    trade-off). Both need the global gradient norm, so ranks other than the primary one compute
    it too (without sending it) while ``skip_nonfinite`` is on or a clip is in force. An idle
    step pays one attribute check per hook for them.

    Parameters are named by ``model.named_parameters()``; ``activations`` names modules of
    ``model`` (``"auto"``: see :func:`~runwatch.agent.activations.auto_activation_modules`;
    None: none). An unknown name raises ``ValueError``; nothing else here raises into the
    caller. ``scheduler`` is kept for interventions that must restore a schedule.
    ``checkpointer`` saves and loads checkpoints (commands, ``checkpoint_every``, rollback);
    the time it takes is left out of ``train/step_time``.

    Limits: a step that ``GradScaler`` skips (non-finite gradients) never calls the optimizer
    hooks, so it is measured together with the next one; with sharded parameters (FSDP, ZeRO)
    the norms are those of this rank's shards.

    >>> from runwatch.agent.buffer import PointBuffer
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> buffer = PointBuffer()
    >>> watcher = Watcher(model, optimizer, buffer)
    >>> model(torch.randn(16, 4)).square().mean().backward()
    >>> optimizer.step()
    >>> watcher.step, watcher.activation_modules
    (0, ('0', '1', '2'))
    >>> keys = {key for record in buffer.drain() for key in (record.keys or record.values)}
    >>> sorted(key for key in keys if key.startswith("train/"))
    ['train/grad_norm', 'train/lr', 'train/samples_per_s', 'train/step_time']
    >>> sorted(key for key in keys if key.startswith("act/1/"))
    ['act/1/abs_max', 'act/1/mean', 'act/1/nonfinite_frac', 'act/1/std', 'act/1/zero_frac']
    >>> watcher.remove()
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sink: Sink,
        *,
        scheduler: object | None = None,
        layer_every: int = 10,
        activation_every: int = 10,
        activations: str | Sequence[str] | None = "auto",
        primary: bool = True,
        start_step: int = 0,
        control: Control | None = None,
        skip_nonfinite: bool = True,
        checkpointer: Checkpointer | None = None,
        checkpoint_every: int | None = None,
        faults: Faults = FAULTS,
    ) -> None:
        for label, every in (("layer_every", layer_every), ("activation_every", activation_every)):
            if every < 0:
                raise ValueError(f"{label} must be >= 0 (0 = never), not {every}")
        self.model = model
        self.optimizer = optimizer
        self.sink = sink
        self.scheduler = scheduler
        self.layer_every = layer_every
        self.activation_every = activation_every
        self.activations = activations
        self.primary = primary
        self.start_step = start_step
        self.control = control if control is not None else Control()
        self.skip_nonfinite = skip_nonfinite
        self.faults = faults

        self._step = start_step
        self._done = False
        self._off = {part for part in PARTS if faults.failed(part)}
        if not primary:
            self._off.update((PART_GRAD_NORM, PART_LR, PART_LAYERS, PART_ACTIVATIONS))
        if not layer_every:
            self._off.add(PART_LAYERS)
        self._handles: list[RemovableHandle] = []
        self._index: _ParamIndex | None = None
        # Timing of the current step: host clock at the previous optimizer step and at this
        # step's first training forward; samples and tokens of its forwards.
        self._last_step_t: float | None = None
        self._forward_t: float | None = None
        self._samples = 0
        self._tokens = 0
        # Per-layer statistics between the pre- and post-step hooks of a sampled step.
        self._grad_sq: torch.Tensor | None = None
        self._param_sq: torch.Tensor | None = None
        self._before: list[list[torch.Tensor]] | None = None
        self._layer_index: _ParamIndex | None = None
        # Activation hooks of a sampled step, and the rows they recorded.
        self._act_handles: dict[int, RemovableHandle] = {}
        self._act_rows: list[torch.Tensor] = []
        self._act_slots: list[int] = []
        self.checkpointer = checkpointer
        self._checkpoint_seen = self._checkpoint_seconds()
        """``checkpointer.seconds`` already left out of the timings (or never to be)."""
        self._iv = Interventions(
            optimizer,
            sink,
            self.control,
            primary=primary,
            skip_nonfinite=skip_nonfinite,
            checkpointer=checkpointer,
            checkpoint_every=checkpoint_every,
            start_step=start_step,
        )
        if PART_CONTROL in self._off:
            self._switch_off_control()

        modules = self._select_activations(activations)  # the one error the caller sees
        if not primary or not activation_every:
            modules = []
        self.activation_modules: tuple[str, ...] = tuple(name for name, _ in modules)
        """Names of the modules whose outputs are watched."""
        self._act_modules = [module for _, module in modules]
        self._act_keys = [
            [f"act/{name}/{stat}" for stat in ACTIVATION_STATS] for name in self.activation_modules
        ]
        if not modules or not activation_every:
            self._off.add(PART_ACTIVATIONS)

        with swallow_internal(PART_STEP, faults):
            self._handles.append(
                model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
            )
            self._handles.append(optimizer.register_step_pre_hook(self._before_step))
            self._handles.append(optimizer.register_step_post_hook(self._after_step))
        if PART_GRAD_NORM not in self._off or PART_LAYERS not in self._off:
            with swallow_internal(PART_GRAD_NORM, faults):
                self._index = _ParamIndex(model, optimizer)
            self._check(PART_GRAD_NORM)
        if self._sampled(self.activation_every):
            self._attach_activations()

    @property
    def step(self) -> int:
        """Index of the current iteration: where a value logged now belongs."""
        return self._step

    @property
    def next_step(self) -> int:
        """The step of the next optimizer update: the updates the model holds so far."""
        return self._step + 1 if self._done else self._step

    # -- checkpoints (the training thread, between steps) --------------------------------------
    def checkpoint(self, reason: str) -> str | None:
        """Save the state now (rank 0: the path); raises ``CheckpointError``."""
        return self._iv.save_checkpoint(self.next_step, reason)  # its time: _left_out

    def rollback(self, args: Mapping[str, Any], step: int) -> str:
        """Load ``args["path"]`` and continue from its step; then the rollback's learning rate
        cut. The detail for the ack; raises ``CheckpointError`` with nothing changed."""
        if self.checkpointer is None:
            raise CheckpointError(NO_CHECKPOINTER)
        target = self._load(args["path"])
        self.restart_at(target)
        detail = f"rolled back to step {target}"
        if args.get("checkpoint") is not None:
            detail += f" (checkpoint {args['checkpoint']})"
        factor = args.get("lr_factor", 1.0)
        if factor < 1:
            self._iv.scale_lr(factor, args["lr_steps"])
            detail += f", lr x {factor:g} for {args['lr_steps']} steps"
        if self.primary:
            self.sink.put_scalars(step, {"control/rollback": float(target)}, CRITICAL)
        return detail

    def resume(self, path: str) -> int:
        """Load ``path`` and continue from its step (raises ``CheckpointError``); the step."""
        if self.checkpointer is None:
            raise CheckpointError(NO_CHECKPOINTER)
        step = self._load(path)
        self.restart_at(step)
        if self.primary:
            self.sink.put_scalars(step, {"control/resumed": float(step)}, CRITICAL)
        return step

    def _load(self, path: str) -> int:
        """Load ``path`` into the watched objects (raises ``CheckpointError``); its step.

        First what a step that raised between its pre- and post-step hooks left in force is
        undone (a scaled learning rate): undone after the load, it would overwrite the loaded
        learning rates with stale ones."""
        assert self.checkpointer is not None
        self._iv.cleanup()
        spent = self.checkpointer.seconds
        try:
            return self.checkpointer.load(path)
        finally:  # a load's time is no step's: the step timings start again after it
            self._checkpoint_seen += self.checkpointer.seconds - spent

    def restart_at(self, step: int) -> None:
        """The watched objects now hold ``step`` updates: the next update is ``step``."""
        self._step = step
        self._done = False
        self._forward_t = self._last_step_t = None  # the load's time is not a step's
        self._samples = self._tokens = 0
        self._before = self._grad_sq = self._param_sq = None
        self._detach_activations()
        self._iv.restarted(step)
        if self._sampled(self.activation_every):
            self._attach_activations()

    def remove(self) -> None:
        """Remove every hook and drop what a half-done step holds; idempotent."""
        with swallow_internal("hooks.remove", self.faults):
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._off.update(PARTS)
            self._detach_activations()
            self._before = self._grad_sq = self._param_sq = None
            self._iv.close()

    # -- hooks ----------------------------------------------------------------------------------

    def _before_forward(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Forward pre-hook of the model: advance the counter, time and count the batch."""
        if not torch.is_grad_enabled():  # evaluation: not part of a training step
            return
        if self._done:
            with swallow_internal(PART_COUNTER, self.faults):
                self._advance()
        if PART_STEP in self._off:
            return
        with swallow_internal(PART_STEP, self.faults):
            if self._forward_t is None:
                self._left_out()
                self._forward_t = time.perf_counter()
            batch = _first_tensor(args, kwargs)
            if batch is not None and batch.dim():
                self._samples += batch.shape[0]
                if batch.dim() >= 2 and batch.dtype in _TOKEN_DTYPES:
                    self._tokens += batch.numel()
        self._check(PART_STEP)

    def _before_step(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Optimizer pre-step hook: the parameters have not moved yet.

        Without a closure the gradients are final here. With one (Lightning, LBFGS) the
        forward and backward run inside ``step``, so the closure is wrapped and the
        gradients are measured when it first returns.
        """
        if self._done:
            with swallow_internal(PART_COUNTER, self.faults):
                self._advance()
        if self._step >= self._iv.pre_step_at or self.control.busy:
            with swallow_internal(PART_CONTROL, self.faults):
                self._iv.before_step(self._step)  # its checkpoints' time: see _left_out
            self._check(PART_CONTROL)
        closure = kwargs.get("closure", args[0] if args else None)
        if not callable(closure):
            self._measure_gradients()
            return None
        measured = False

        def closure_then_measure() -> Any:
            nonlocal measured
            loss = closure()
            if not measured:  # LBFGS calls it many times: the first gradients are the step's
                measured = True
                self._measure_gradients()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_measure}
        return (closure_then_measure, *args[1:]), kwargs

    def _measure_gradients(self) -> None:
        with torch.no_grad():
            norm: torch.Tensor | None = None
            measured = False
            if PART_GRAD_NORM not in self._off:
                with swallow_internal(PART_GRAD_NORM, self.faults):
                    norm = self._grad_norm()
                    measured = True
                    if norm is not None:
                        self.sink.put_scalars(self._step, {"train/grad_norm": norm}, CRITICAL)
                self._check(PART_GRAD_NORM)
            iv = self._iv
            if iv.acting or iv.skip_nonfinite:
                with swallow_internal(PART_CONTROL, self.faults):
                    norm = norm if measured else self._grad_norm()
                    iv.on_gradients(self._step, norm, self._grad_lists)
                self._check(PART_CONTROL)
            if PART_LAYERS not in self._off and self._sampled(self.layer_every):
                with swallow_internal(PART_LAYERS, self.faults):
                    self._layers_before()
                self._check(PART_LAYERS)

    def _after_step(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Optimizer post-step hook: iteration ``step`` is done; put what it measured."""
        with torch.no_grad():
            if PART_LR not in self._off:
                with swallow_internal(PART_LR, self.faults):
                    self._record_lr()
                self._check(PART_LR)
            if self._before is not None:
                with swallow_internal(PART_LAYERS, self.faults):
                    self._layers_after()
                self._check(PART_LAYERS)
            if self._act_handles or self._act_rows:
                with swallow_internal(PART_ACTIVATIONS, self.faults):
                    self._record_activations()
                self._check(PART_ACTIVATIONS)
            if self._iv.acting:  # after train/lr: it records the rate the step used
                with swallow_internal(PART_CONTROL, self.faults):
                    self._iv.after_step(self._step)
                self._check(PART_CONTROL)
        if PART_STEP not in self._off:
            with swallow_internal(PART_STEP, self.faults):
                self._record_timing()
            self._check(PART_STEP)
        self._done = True  # outside every part: the counter must move on whatever failed

    def _on_activation(self, slot: int, module: nn.Module, args: Any, output: Any) -> None:
        """Forward hook of a watched module: reduce its output once, then unhook itself."""
        if not torch.is_grad_enabled():
            return
        with swallow_internal(PART_ACTIVATIONS, self.faults):
            handle = self._act_handles.pop(slot, None)
            if handle is not None:
                handle.remove()  # later micro-batches and recomputations pay nothing
            x = first_output(output)
            if x is not None and x.is_floating_point() and x.numel():
                self._act_rows.append(activation_moments(x))
                self._act_slots.append(slot)
        self._check(PART_ACTIVATIONS)

    # -- the work -------------------------------------------------------------------------------

    def _advance(self) -> None:
        """Move the counter onto the next iteration; hook the activations if it is sampled."""
        self._step += 1
        self._done = False
        if self._sampled(self.activation_every):
            self._attach_activations()

    def _checkpoint_seconds(self) -> float:
        return self.checkpointer.seconds if self.checkpointer is not None else 0.0

    def _left_out(self) -> None:
        """Leave the checkpoints saved since the last call out of the step's timings.

        Called once per step at each end of the forward-to-step span (the first training
        forward, the post-step hook): a save before the forward (``run.checkpoint`` between
        steps, the pre-step hook of a closure-driven optimizer) is left out of ``data_wait``
        and ``step_time``, a save after it (the pre-step hook) out of ``step_time`` alone."""
        seconds = self._checkpoint_seconds()
        if seconds != self._checkpoint_seen:
            self._exclude(seconds - self._checkpoint_seen)
            self._checkpoint_seen = seconds

    def _exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (a checkpoint's save) out of the current step's timings."""
        if seconds > 0:
            if self._last_step_t is not None:
                self._last_step_t += seconds
            if self._forward_t is not None:
                self._forward_t += seconds

    def _sampled(self, every: int) -> bool:
        return every > 0 and self._step % every == 0

    def _params(self) -> _ParamIndex:
        """The parameter index, rebuilt when the optimizer gained or lost param groups."""
        index = self._index
        if index is None or len(self.optimizer.param_groups) != index.n_groups:
            index = self._index = _ParamIndex(self.model, self.optimizer)
        return index

    def _grad_norm(self) -> torch.Tensor | None:
        """Global L2 norm of the gradients, a 0-d float32 tensor; None without gradients."""
        index = self._params()
        norms = []
        for group in index.groups:
            grads = index.grads(group)
            if grads:
                norms.append(_norms(grads, index.device))
        if not norms:
            return None
        return torch.linalg.vector_norm(torch.cat(norms) if len(norms) > 1 else norms[0])

    def _grad_lists(self) -> list[list[torch.Tensor]]:
        """The gradients, one list per device and dtype (what one fused call takes)."""
        index = self._params()
        return [grads for grads in map(index.grads, index.groups) if grads]

    def _record_lr(self) -> None:
        groups = self.optimizer.param_groups
        values: dict[str, Any] = {}
        first = _lr_value(groups[0].get("lr")) if groups else None
        if first is not None:
            values["train/lr"] = first
        if len(groups) > 1:
            for i, group in enumerate(groups):
                lr = first if i == 0 else _lr_value(group.get("lr"))
                if lr is not None:
                    values[f"train/lr/{i}"] = lr
        self.sink.put_scalars(self._step, values, CRITICAL)

    def _layers_before(self) -> None:
        """Squared per-layer gradient and parameter norms, and a copy of the parameters."""
        index = self._params()
        grad_sq = torch.zeros(len(index.layers), device=index.device)
        param_sq = torch.zeros(len(index.layers), device=index.device)
        before = []
        for group in index.groups:
            grads = index.grads(group)
            if grads:
                slots = index.grad_slot_index(group, len(grads))
                grad_sq.index_add_(0, slots, _norms(grads, index.device).square())
            param_sq.index_add_(0, group.slot_index, _norms(group.params, index.device).square())
            before.append(torch._foreach_clone(group.params))
        self._grad_sq, self._param_sq, self._before = grad_sq, param_sq, before
        self._layer_index = index

    def _layers_after(self) -> None:
        """Per-layer norm of the update, and the three per-layer vectors into the sink."""
        index, before = self._layer_index, self._before
        self._before = None
        assert index is not None and before is not None
        assert self._grad_sq is not None and self._param_sq is not None
        delta_sq = torch.zeros(len(index.layers), device=index.device)
        for group, copies in zip(index.groups, before, strict=True):
            torch._foreach_sub_(copies, group.params)  # in place: no second copy
            delta_sq.index_add_(0, group.slot_index, _norms(copies, index.device).square())
        param_norm = self._param_sq.sqrt()
        ratio = delta_sq.sqrt() / param_norm.clamp_min(_TINY)  # an all-zero layer that moved: huge
        self.sink.put_vector(self._step, index.grad_keys, self._grad_sq.sqrt(), DETAIL)
        self.sink.put_vector(self._step, index.param_keys, param_norm, DETAIL)
        self.sink.put_vector(self._step, index.ratio_keys, ratio, DETAIL)
        self._grad_sq = self._param_sq = None

    def _record_activations(self) -> None:
        rows, slots = self._act_rows, self._act_slots
        self._detach_activations()
        if rows:
            device = rows[0].device
            stats = finish_activation_stats(torch.stack([row.to(device) for row in rows]))
            keys = [key for slot in slots for key in self._act_keys[slot]]
            self.sink.put_vector(self._step, keys, stats.flatten(), DETAIL)

    def _record_timing(self) -> None:
        now = time.perf_counter()
        self._left_out()
        start = self._last_step_t if self._last_step_t is not None else self._forward_t
        if start is not None:
            elapsed = now - start
            values = {"train/step_time": elapsed}
            if self._last_step_t is not None and self._forward_t is not None:
                values["train/data_wait"] = self._forward_t - self._last_step_t
            if elapsed > 0 and self._samples:
                values["train/samples_per_s"] = self._samples / elapsed
                if self._tokens:
                    values["train/tokens_per_s"] = self._tokens / elapsed
            self.sink.put_scalars(self._step, values, SYSTEM)
        self._last_step_t = now
        self._forward_t = None
        self._samples = self._tokens = 0

    # -- activation hooks -----------------------------------------------------------------------

    def _select_activations(
        self, activations: str | Sequence[str] | None
    ) -> list[tuple[str, nn.Module]]:
        """The watched modules; every rank checks the names, so that all fail alike."""
        if activations is None:
            return []
        modules = dict(self.model.named_modules())
        if activations == "auto":
            names: list[str] = []
            with swallow_internal(PART_ACTIVATIONS, self.faults):
                names = auto_activation_modules(self.model)
        else:
            names = [activations] if isinstance(activations, str) else list(activations)
            unknown = [name for name in names if name not in modules]
            if unknown:
                raise ValueError(
                    f"activations: no module named {', '.join(map(repr, unknown))} in the model"
                )
        return [(name, modules[name]) for name in names]

    def _attach_activations(self) -> None:
        """Hook the watched modules for the current (sampled) step."""
        if PART_ACTIVATIONS in self._off:
            return
        with swallow_internal(PART_ACTIVATIONS, self.faults):
            self._detach_activations()
            for slot, module in enumerate(self._act_modules):
                hook = functools.partial(self._on_activation, slot)
                self._act_handles[slot] = module.register_forward_hook(hook)
        self._check(PART_ACTIVATIONS)

    def _detach_activations(self) -> None:
        for handle in self._act_handles.values():
            handle.remove()
        self._act_handles = {}
        self._act_rows = []
        self._act_slots = []

    # -- faults ---------------------------------------------------------------------------------

    def _check(self, part: str) -> None:
        """Switch ``part`` off once it has failed: stop doing it, drop what it holds."""
        if not self.faults.failed(part):
            return
        self._off.add(part)
        if part == PART_ACTIVATIONS:
            self._detach_activations()
        elif part == PART_LAYERS:
            self._before = self._grad_sq = self._param_sq = None
        elif part == PART_STEP:
            self._forward_t = self._last_step_t = None
        elif part == PART_CONTROL:
            self._switch_off_control()

    def _switch_off_control(self) -> None:
        """Undo what is in force and refuse every command from now on (acked ``failed``)."""
        with swallow_internal("hooks.control.off", self.faults):
            self._iv.close()
        self.control.refuse_all(CONTROL_OFF)


def _lr_value(lr: object) -> Any:
    """A param group's learning rate as the sink takes it: a float, or a copy of a tensor (the
    scheduler changes a tensor lr in place, and the sender reads it later)."""
    if lr is None:
        return None
    if isinstance(lr, torch.Tensor):
        return lr.detach().clone()
    return float(lr)  # type: ignore[arg-type]
