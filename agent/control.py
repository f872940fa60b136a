"""The control channel of one rank: commands in, acknowledgements out (DESIGN.md, "Interventions").

Two threads share a :class:`Control`, each for a moment under its lock and never waiting on
anything else:

- the sender thread hands it the ``commands`` of every ingest reply (:meth:`Control.receive`)
  and posts the acknowledgements (:meth:`Control.next_ack`) and checkpoint registrations
  (:meth:`Control.next_registration`) it finds queued;
- the training thread, at each optimizer step boundary, takes the commands that are due
  (:meth:`Control.due`) and says what became of each (:meth:`Control.settle`). What a command
  does to the step is :mod:`runwatch.agent.interventions`' business; a ``rollback`` is taken
  at a batch boundary of ``run.data(...)`` instead (:mod:`runwatch.agent.data`), because it
  also moves the data iterator.

Exactly once. The collector repeats a command in every reply until this rank acknowledges it,
so one id arrives many times. An id is applied at most once per process: its outcome is
remembered (the last :data:`REMEMBERED_COMMANDS` ids; ids only grow, so an id at or below the
newest forgotten one is old) and a repeat is answered with the remembered outcome, never
applied again. A process that restarts remembers nothing: a command it applied but could not
acknowledge before it died comes again, and is applied again unless its ``at_step`` has passed.

No torch here: the run creates its control channel before anything imports torch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Collection
from typing import Any, NamedTuple

from runwatch import wire

log = logging.getLogger("runwatch.agent")

REMEMBERED_COMMANDS = 10_000
"""Outcomes kept to answer a redelivered command; about 2 MB at most."""
MAX_WAITING = 1_000
"""Commands held for a later ``at_step``; more are refused (failed)."""
MAX_ACKS = 1_000
"""Acknowledgements queued for the sender; beyond it the oldest is dropped (a redelivery of
its command queues it again)."""
MAX_REGISTRATIONS = 1_000
"""Checkpoint registrations queued for the sender; beyond it the oldest is dropped (counted)."""

AT_DATA = frozenset({"rollback"})
"""Command types applied at a batch boundary of ``run.data`` rather than at the pre-step hook."""
AT_STEP = frozenset(wire.COMMAND_TYPES) - AT_DATA
LR_STEPS = 200
"""Default ``lr_steps`` of a rollback (the collector fills it in; an older one may not)."""
FORGOTTEN = "handled earlier by this process; its outcome is no longer remembered"
TOO_MANY = f"more than {MAX_WAITING} commands are waiting for their step"

ZCLIP_Z = 2.5
ZCLIP_ALPHA = 0.97
ZCLIP_WARMUP = 25
"""Adaptive clipping defaults: ZClip's z threshold, EMA momentum and warm-up steps
(arXiv 2504.02507; DESIGN.md, "Published figures")."""


class Ack(NamedTuple):
    """What became of command ``command`` on this rank, as ``POST /commands/{id}/ack`` says."""

    command: int
    status: str
    """One of :data:`runwatch.wire.ACK_STATUSES`."""
    detail: str
    step: int | None
    """The step it took effect at (or was refused at); None when refused on arrival."""

    def body(self, run: int, rank: int) -> dict[str, Any]:
        return {
            "run": run,
            "rank": rank,
            "status": self.status,
            "detail": self.detail,
            "step": self.step,
        }


class Registration(NamedTuple):
    """A checkpoint to register: ``body`` as ``POST /runs/{id}/checkpoints`` takes it, and what
    to do with the reply (in the sender thread; it deletes the files the collector prunes)."""

    body: dict[str, Any]
    on_reply: Callable[[Any], None] | None = None


class Control:
    """Commands waiting for their step, outcomes of applied ones, acknowledgements to send.

    >>> control = Control()
    >>> control.receive([{"id": 3, "type": "skip_step", "args": {}, "at_step": 5}])
    >>> control.busy, control.due(4), [c.id for c in control.due(5)]
    (True, [], [3])
    >>> control.settle(3, "applied", "step skipped", 5)
    >>> control.receive([{"id": 3, "type": "skip_step", "args": {}, "at_step": 5}])  # again
    >>> control.busy, control.next_ack()
    (False, Ack(command=3, status='applied', detail='step skipped', step=5))
    """

    def __init__(
        self, remembered: int = REMEMBERED_COMMANDS, *, single_process: bool = False
    ) -> None:
        if remembered < 1:
            raise ValueError(f"remembered must be >= 1, not {remembered}")
        self.remembered = remembered
        self.single_process = single_process
        """No other ranks to keep in step: a command whose ``at_step`` has passed is applied
        at once rather than expired (the collector gives such a run its next step)."""
        self.busy = False
        """Whether commands wait to be taken: the training thread's one check per step."""
        self.should_stop = False
        """Set by an applied ``stop``; read by the integrations (and the user)."""
        self.data_boundary = False
        """Set once a ``run.data`` wrapper fetches its first batch: it takes the rollbacks;
        without one, the pre-step hook fails them (nothing could move the data iterator)."""
        self.acks_dropped = 0
        self.registrations_dropped = 0
        self._lock = threading.Lock()
        self._waiting: dict[int, wire.Command] = {}
        self._applying: set[int] = set()
        """Taken by :meth:`due`, not yet settled: a redelivery meanwhile must not queue them
        again (a rollback's step comes round again after it)."""
        self._outcomes: OrderedDict[int, Ack] = OrderedDict()
        self._forgotten = -1
        """The newest id whose outcome was forgotten."""
        self._acks: deque[Ack] = deque()
        self._queued: set[int] = set()
        self._registrations: deque[Registration] = deque()
        self._refusing: str | None = None
        self._warned = False
        self._skipped = 0
        self._skipped_on_device: Any = None

    # -- the sender thread ------------------------------------------------------------------------
    def receive(self, commands: object) -> None:
        """Take the ``commands`` of an ingest reply: new ones wait, known ones are re-acked."""
        if not commands:
            return
        if not isinstance(commands, list):
            self._warn(f"an ingest reply's commands are not a list: {commands!r:.80}")
            return
        with self._lock:
            for raw in commands:
                command = _parse(raw)
                if command is None:
                    self._warn(f"a command without a valid id was ignored: {raw!r:.80}")
                    continue
                known = self._outcomes.get(command.id)
                if known is not None:
                    self._queue(known)  # not acknowledged yet, or the ack crossed this reply
                elif command.id in self._waiting or command.id in self._applying:
                    continue
                elif command.id <= self._forgotten:
                    self._settle(Ack(command.id, "failed", FORGOTTEN, None))
                elif refusal := self._refusing or _refusal(command):
                    self._settle(Ack(command.id, "failed", refusal, None))
                elif len(self._waiting) >= MAX_WAITING:
                    self._settle(Ack(command.id, "failed", TOO_MANY, None))
                else:
                    self._waiting[command.id] = _with_defaults(command)
            self.busy = bool(self._waiting)

    def next_ack(self) -> Ack | None:
        """The oldest acknowledgement to send; it stays queued until :meth:`ack_done`."""
        with self._lock:
            return self._acks[0] if self._acks else None

    def ack_done(self, ack: Ack) -> None:
        """``ack`` was delivered, or refused for good: take it off the queue."""
        with self._lock:
            if self._acks and self._acks[0] is ack:
                self._acks.popleft()
            else:  # dropped meanwhile, or behind a newer one
                try:
                    self._acks.remove(ack)
                except ValueError:
                    return
            self._queued.discard(ack.command)

    def next_registration(self) -> Registration | None:
        """The oldest checkpoint registration to send; queued until :meth:`registration_done`."""
        with self._lock:
            return self._registrations[0] if self._registrations else None

    def registration_done(self, registration: Registration) -> None:
        """``registration`` was delivered, or refused for good: take it off the queue."""
        with self._lock, contextlib.suppress(ValueError):
            self._registrations.remove(registration)

    def has_outgoing(self) -> bool:
        """Whether acknowledgements or checkpoint registrations wait for the sender."""
        return bool(self._acks or self._registrations)

    # -- the training thread --------------------------------------------------------------------
    def due(self, step: int, kinds: Collection[str] | None = None) -> list[wire.Command]:
        """Commands to apply at the boundary of iteration ``step``, oldest first; ``kinds``:
        only commands of these types (the others stay waiting).

        A command whose ``at_step`` has passed is acknowledged ``expired`` instead: applied
        late, on this rank alone, it would split the ranks. A single process has no ranks to
        split and applies it now.
        """
        ready: list[wire.Command] = []
        with self._lock:
            for command in list(self._waiting.values()):
                if kinds is not None and command.type not in kinds:
                    continue
                at = command.at_step
                if at is not None and at > step:
                    continue
                del self._waiting[command.id]
                if at is None or at == step or self.single_process:
                    ready.append(command)
                    self._applying.add(command.id)
                else:
                    detail = f"this rank was at step {step} when it could apply it, past {at}"
                    self._settle(Ack(command.id, "expired", detail, step))
            self.busy = bool(self._waiting)
        ready.sort(key=lambda command: command.id)
        return ready

    def settle(self, command: int, status: str, detail: str, step: int | None) -> None:
        """Remember what became of ``command`` and queue its acknowledgement."""
        with self._lock:
            self._settle(Ack(command, status, detail, step))

    def register(self, registration: Registration) -> None:
        """Queue a checkpoint registration for the sender; never waits (drops the oldest)."""
        with self._lock:
            if len(self._registrations) >= MAX_REGISTRATIONS:
                self._registrations.popleft()
                self.registrations_dropped += 1
            self._registrations.append(registration)

    def refuse_all(self, reason: str) -> None:
        """From now on fail every command with ``reason`` (interventions are switched off)."""
        with self._lock:
            self._refusing = reason
            for command in self._waiting.values():
                self._settle(Ack(command.id, "failed", reason, None))
            for cid in list(self._applying):  # taken when the error struck: never applied
                self._settle(Ack(cid, "failed", reason, None))
            self._waiting.clear()
            self.busy = False

    def count_skip(self, on_device: Any = None) -> None:
        """One step skipped for non-finite gradients; ``on_device``: a 0/1 tensor instead."""
        if on_device is None:
            self._skipped += 1
        elif self._skipped_on_device is None:
            self._skipped_on_device = on_device.long()
        else:
            self._skipped_on_device += on_device

    def steps_skipped(self) -> int:
        """Steps skipped for non-finite gradients (reads a device counter: one sync)."""
        device = self._skipped_on_device
        return self._skipped + (int(device.item()) if device is not None else 0)

    # -- internals ------------------------------------------------------------------------------
    def _settle(self, ack: Ack) -> None:
        self._applying.discard(ack.command)
        self._outcomes[ack.command] = ack
        while len(self._outcomes) > self.remembered:
            old, _ = self._outcomes.popitem(last=False)
            self._forgotten = max(self._forgotten, old)
        self._queue(ack)

    def _queue(self, ack: Ack) -> None:
        if ack.command in self._queued:
            return
        if len(self._acks) >= MAX_ACKS:
            dropped = self._acks.popleft()
            self._queued.discard(dropped.command)
            self.acks_dropped += 1
        self._acks.append(ack)
        self._queued.add(ack.command)

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("runwatch agent: %s (further ones are ignored silently)", message)


def _parse(raw: object) -> wire.Command | None:
    """A command from the reply's JSON; None without an integer id (nothing to ack)."""
    if not isinstance(raw, dict):
        return None
    cid = raw.get("id")
    if type(cid) is not int or cid < 0:
        return None
    args = raw.get("args")
    at = raw.get("at_step")
    return wire.Command(
        id=cid,
        type=str(raw.get("type")),
        args=args if isinstance(args, dict) else {},
        at_step=at if type(at) is int or at is None else -1,
        source=str(raw.get("source", "")),
    )


def _refusal(command: wire.Command) -> str | None:
    """Why ``command`` cannot be applied, or None when it can."""
    if command.type not in wire.COMMAND_TYPES:
        return f"unknown command type {command.type!r}"
    if command.at_step is not None and command.at_step < 0:
        return "at_step must be a step (an integer >= 0) or null"
    args = command.args
    if command.type == "rollback":
        return _rollback_refusal(args)
    if command.type == "lr_scale":
        if not _positive(args.get("factor")):
            return "lr_scale: factor must be a finite number > 0"
        steps = args.get("steps")
        if type(steps) is not int or steps < 1:
            return "lr_scale: steps must be an integer >= 1"
    elif command.type == "clip":
        mode = args.get("mode", "fixed")
        if mode == "adaptive":
            if not _positive(args.get("z", ZCLIP_Z)):
                return "clip: z must be a finite number > 0"
            alpha = args.get("alpha", ZCLIP_ALPHA)
            if not (_positive(alpha) and alpha < 1):
                return "clip: alpha must be a number in (0, 1)"
            warmup = args.get("warmup", ZCLIP_WARMUP)
            if type(warmup) is not int or warmup < 1:
                return "clip: warmup must be an integer >= 1"
        elif mode != "fixed":
            return f"clip: mode must be 'fixed' or 'adaptive', not {mode!r}"
        elif not _positive(args.get("max_norm")):
            return "clip: max_norm must be a finite number > 0"
    return None


def _rollback_refusal(args: dict[str, Any]) -> str | None:
    """Why a rollback's (collector-resolved) arguments cannot be applied, or None."""
    path = args.get("path")
    if not isinstance(path, str) or not path:
        return (
            "rollback: the command names no checkpoint file (args.path); the collector "
            "resolves 'last_good' or an id to one when the command is issued"
        )
    step = args.get("step")
    if step is not None and (type(step) is not int or step < 0):
        return "rollback: step must be an integer >= 0"
    skip = args.get("skip_batches", 0)
    if type(skip) is not int or skip < 0:
        return "rollback: skip_batches must be an integer >= 0"
    factor = args.get("lr_factor", 1.0)
    if not (_positive(factor) and factor <= 1):
        return "rollback: lr_factor must be a number in (0, 1]"
    lr_steps = args.get("lr_steps", LR_STEPS)
    if type(lr_steps) is not int or lr_steps < 1:
        return "rollback: lr_steps must be an integer >= 1"
    return None


def _with_defaults(command: wire.Command) -> wire.Command:
    """The command with its optional arguments filled in (numbers as floats)."""
    args = dict(command.args)
    if command.type == "lr_scale":
        args["factor"] = float(args["factor"])
    elif command.type == "clip":
        if args.get("mode") == "adaptive":
            args["z"] = float(args.get("z", ZCLIP_Z))
            args["alpha"] = float(args.get("alpha", ZCLIP_ALPHA))
            args.setdefault("warmup", ZCLIP_WARMUP)
        else:
            args["mode"] = "fixed"
            args["max_norm"] = float(args["max_norm"])
    elif command.type == "rollback":
        args["skip_batches"] = args.get("skip_batches", 0)
        args["lr_factor"] = float(args.get("lr_factor", 1.0))
        args["lr_steps"] = args.get("lr_steps", LR_STEPS)
    elif command.type in ("checkpoint", "stop"):
        args["reason"] = str(args.get("reason") or "")
    return command._replace(args=args)


def _positive(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )
