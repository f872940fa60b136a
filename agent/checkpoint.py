"""Checkpoints of the watched objects: :class:`Checkpointer` saves, loads and registers them.

What a checkpoint holds (the *state*, a dict; a user's ``save``/``load`` hooks see the same):
``{"model", "optimizer", "scheduler", "step", "rng"}``: the state dicts of the model (the module
inside a DDP or ``torch.compile`` wrapper, so the keys carry no ``module.`` prefix), the
optimizer and the scheduler (None without one), ``step`` = the number of optimizer updates the
state holds (the step the next update is), and the random generators of the saving process:
torch's CPU generator, every CUDA device's (when CUDA is initialised), Python's ``random`` and
numpy's global generator (when numpy is importable).

Saving. Only rank 0 writes (DDP replicas are identical); the default saver writes
``<checkpoint_dir>/<run name>/step-<step:09d>.pt`` (``...-<n>.pt`` for a step saved again, see
:meth:`Checkpointer.path`) atomically: ``torch.save`` into a temporary
file of the same folder, flush, fsync, ``os.replace``, fsync of the folder, so a reader (another
rank, a restarted trainer) sees the old file or the complete new one, never a partial one. Rank
0 then queues the checkpoint's registration with the collector (sent by the sender thread; the
training thread never waits for the network). A ``save(path, state)`` hook replaces
``torch.save`` (and its atomicity is the hook's business); ``load(path) -> state`` replaces
``torch.load``.

Loading. Every rank reads rank 0's file (a shared filesystem), onto the model's device, with
``torch.load(weights_only=True)``: a checkpoint path comes from the collector, and a pickle
would run code. The state is checked against the watched objects (parameter names and shapes,
optimizer groups) before anything is changed, so a failed load leaves them as they were; one
they refuse all the same (a ``load_state_dict`` that raises) is undone: the model's state is
copied to the CPU before the load for that, a transient extra 1x its size in host memory. The
random generators are restored only on rank 0, whose generators they are: other ranks keep
their own (per-rank generator states are not saved).

Retention. The collector answers a registration with the checkpoints its retention policy
drops; the files among them that this agent's default saver wrote, in its own folder, are
deleted. Files written by a user's ``save`` hook are never deleted by the agent.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import random
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runwatch.agent.control import Control, Registration

log = logging.getLogger("runwatch.agent")

SaveFn = Callable[[str, dict[str, Any]], object]
LoadFn = Callable[[str], dict[str, Any]]

MAX_REASON = 500
"""Longest ``reason`` the collector stores."""
FILE_NAME = re.compile(r"step-\d{9,}(-\d+)?\.pt")
SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


class CheckpointError(Exception):
    """A checkpoint could not be saved or loaded; the message says why, for an ack or a log."""


class Checkpointer:
    """Saves and loads the state of ``model``, ``optimizer`` and ``scheduler``.

    >>> import tempfile
    >>> model = nn.Linear(2, 1)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> folder = tempfile.mkdtemp()
    >>> checkpointer = Checkpointer(model, optimizer, directory=folder)
    >>> saved = checkpointer.save(7, "example")
    >>> saved.endswith("step-000000007.pt"), checkpointer.load(saved)
    (True, 7)
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: object | None = None,
        *,
        directory: str | os.PathLike[str],
        rank: int = 0,
        control: Control | None = None,
        keep: int | None = None,
        save: SaveFn | None = None,
        load: LoadFn | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.directory = Path(directory).absolute()
        self.rank = rank
        self.control = control
        """Where rank 0 queues registrations; None: checkpoints are not registered."""
        self.keep = keep or None
        self.save_fn = save
        self.load_fn = load
        self.seconds = 0.0
        """Time spent saving and loading, so far (the watcher leaves it out of step times)."""
        self._written: set[str] = set()

    @property
    def module(self) -> nn.Module:
        """The model inside its DDP, DataParallel or ``torch.compile`` wrappers."""
        return unwrap(self.model)

    def path(self, step: int) -> Path:
        """Where a checkpoint of ``step`` goes: ``step-<step>.pt``, or ``step-<step>-<n>.pt``
        when this process wrote that name before or a file holds it (a step saved again after a
        rollback or a resume holds another state: it is another checkpoint, registered apart)."""
        path = self.directory / f"step-{step:09d}.pt"
        n = 1
        while str(path) in self._written or path.exists():
            path = self.directory / f"step-{step:09d}-{n}.pt"
            n += 1
        return path

    # -- saving ---------------------------------------------------------------------------------
    def state(self, step: int) -> dict[str, Any]:
        """What a checkpoint at ``step`` holds (references to live tensors: save it at once)."""
        scheduler = self.scheduler
        state_dict = getattr(scheduler, "state_dict", None)
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": state_dict() if callable(state_dict) else None,
            "step": step,
            "rng": rng_state(),
        }

    def save(self, step: int, reason: str = "", command: int | None = None) -> str | None:
        """Save the state at ``step`` (rank 0; other ranks return None) and queue its
        registration; the path. Raises :class:`CheckpointError` when the save failed."""
        if self.rank != 0:
            return None
        started = time.perf_counter()
        path: Path | None = None
        try:
            path = self.path(step)  # stats files: an unreadable folder fails here
            state = self.state(step)
            if self.save_fn is not None:
                self.save_fn(str(path), state)
            else:
                atomic_save(state, path)
            self._written.add(str(path))
        except Exception as exc:
            where = path if path is not None else f"step {step} in {self.directory}"
            raise CheckpointError(f"saving {where} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self.seconds += time.perf_counter() - started
        if self.control is not None:
            body = {
                "step": step,
                "path": str(path),
                "size_bytes": _size(path),
                "wall_time": time.time(),
                "reason": reason[:MAX_REASON],
                "command": command,
                "keep": self.keep,
            }
            self.control.register(Registration(body, self.prune))
        return str(path)

    # -- loading --------------------------------------------------------------------------------
    def read(self, path: str) -> dict[str, Any]:
        """The state in ``path``, checked against the watched objects; nothing is changed.
        Raises :class:`CheckpointError` with the reason."""
        if self.load_fn is None and not os.path.isfile(path):
            raise CheckpointError(f"checkpoint file {path} does not exist")
        try:
            if self.load_fn is not None:
                state = self.load_fn(path)
            else:
                state = torch.load(path, map_location=self._device(), weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
        self._check(path, state)
        return state

    def apply(self, state: dict[str, Any], source: str = "the checkpoint") -> int:
        """Put a :meth:`read` state (of ``source``, for the message) into the watched objects;
        its step. Raises :class:`CheckpointError` when one of them refuses its part, with
        every watched object (and the random generators) put back as it was.

        For that the model's current state is first copied to the CPU (the load writes into
        its tensors); the optimizer's and the scheduler's are kept by reference (their
        ``load_state_dict`` replaces their state rather than writing into it)."""
        try:
            previous = self._snapshot()
        except Exception as exc:  # nothing changed yet
            raise CheckpointError(
                f"cannot load {source}: cannot keep the current state: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            self._apply(state)
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
            try:
                self._apply(previous)
            except Exception as again:
                log.error("runwatch agent: cannot restore the state a load failed on: %r", again)
                problem += f"; restoring the previous state failed too: {again}"
            raise CheckpointError(f"cannot load {source}: {problem}") from exc
        for group in self.optimizer.param_groups:  # a restored state has no gradients yet
            for p in group["params"]:
                p.grad = None
        return int(state["step"])

    def _apply(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        load_scheduler = getattr(self.scheduler, "load_state_dict", None)
        if state.get("scheduler") is not None and callable(load_scheduler):
            load_scheduler(state["scheduler"])
        if self.rank == 0 and state.get("rng") is not None:
            set_rng_state(state["rng"])

    def _snapshot(self) -> dict[str, Any]:
        """What :meth:`apply` puts back when a load fails half-way."""
        model = {
            key: value.detach().to("cpu", copy=True)
            if isinstance(value, torch.Tensor)
            else copy.deepcopy(value)
            for key, value in self.module.state_dict().items()
        }
        state_dict = getattr(self.scheduler, "state_dict", None)
        return {
            "model": model,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": state_dict() if callable(state_dict) else None,
            "rng": rng_state() if self.rank == 0 else None,
        }

    def load(self, path: str) -> int:
        """Read ``path`` and put it into the watched objects; its step."""
        started = time.perf_counter()
        try:
            return self.apply(self.read(path), path)
        finally:
            self.seconds += time.perf_counter() - started

    # -- retention (the sender thread) ------------------------------------------------------
    def prune(self, reply: Any) -> None:
        """Delete the files of a registration reply's ``prune`` list that this agent's default
        saver wrote in its folder; the others are left alone."""
        dropped = reply.get("prune") if isinstance(reply, dict) else None
        for record in dropped or ():
            path = record.get("path") if isinstance(record, dict) else None
            if isinstance(path, str) and self.owns(path):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("runwatch agent: cannot delete pruned checkpoint %s: %s", path, exc)

    def owns(self, path: str) -> bool:
        """Whether ``path`` is a file the default saver writes: its name, in its folder."""
        if self.save_fn is not None:
            return False
        candidate = Path(path)
        return bool(FILE_NAME.fullmatch(candidate.name)) and (
            candidate.parent.absolute() == self.directory
        )

    # -- internals ------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        return torch.device("cpu")

    def _check(self, path: str, state: object) -> None:
        """Refuse a state the watched objects cannot take whole (before anything changes)."""
        if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
            raise CheckpointError(f"{path} holds no model state (a dict with 'model')")
        step = state.get("step")
        if type(step) is not int or step < 0:
            raise CheckpointError(f"{path} holds no step (an integer >= 0)")
        current = self.module.state_dict()
        given = state["model"]
        missing = [key for key in current if key not in given]
        unexpected = [key for key in given if key not in current]
        if missing or unexpected:
            raise CheckpointError(
                f"{path} does not fit the model: missing {_names(missing)}, "
                f"unexpected {_names(unexpected)}"
            )
        for key, value in current.items():
            other = given[key]
            if isinstance(value, torch.Tensor) and (
                not isinstance(other, torch.Tensor) or other.shape != value.shape
            ):
                shape = getattr(other, "shape", type(other).__name__)
                raise CheckpointError(
                    f"{path} does not fit the model: {key} is {tuple(value.shape)} in the model, "
                    f"{tuple(shape) if isinstance(shape, torch.Size) else shape} in the file"
                )
        optimizer = state.get("optimizer")
        if optimizer is not None:
            groups = optimizer.get("param_groups") if isinstance(optimizer, dict) else None
            mine = self.optimizer.param_groups
            if not isinstance(groups, list) or [len(g.get("params", ())) for g in groups] != [
                len(g["params"]) for g in mine
            ]:
                raise CheckpointError(
                    f"{path} does not fit the optimizer: its parameter groups differ"
                )


def folder_name(run_name: str) -> str:
    """The run's folder under ``checkpoint_dir``: its name, or (a name with ``/``, spaces and
    the like) a readable form made unique by a hash of the name."""
    if SAFE_NAME.fullmatch(run_name):
        return run_name
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_name)[:96]
    return f"{readable.lstrip('.')}-{hashlib.sha256(run_name.encode()).hexdigest()[:10]}"


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel (``.module``) and ``torch.compile``
    (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def atomic_save(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` to ``path`` so that no partial file is ever visible there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The rename itself survives a power cut only once the folder is synced.
    with contextlib.suppress(OSError):
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def rng_state() -> dict[str, Any]:
    """The process's random generators, in types ``torch.load(weights_only=True)`` accepts."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy
    except ImportError:
        return state
    name, keys, pos, has_gauss, cached = numpy.random.get_state()
    state["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` took (the parts this process has)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    if state.get("numpy") is not None:
        try:
            import numpy
        except ImportError:
            return
        name, keys, pos, has_gauss, cached = state["numpy"]
        numpy.random.set_state((name, numpy.array(keys, numpy.uint32), pos, has_gauss, cached))


def _size(path: Path) -> int:
    """Bytes at ``path``: a file, or every file under a folder (a user hook may write one)."""
    try:
        if path.is_dir():
            return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        return path.stat().st_size
    except OSError:  # a hook that wrote elsewhere (object storage) under this name
        return 0


def _names(keys: list[str]) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
