"""``runwatch supervise``: run a trainer, restart it when it crashes or hangs, resume it.

The trainer runs as a child in a process group of its own, so that a ``torchrun`` launcher and
every worker it started are signalled together. The child learns its run from the environment
(``RUNWATCH_PROJECT``, ``RUNWATCH_RUN_NAME``; a name is generated when none is given), so
every attempt resumes the same run on the collector, and the supervisor can follow it there.

**Crash.** A child that exits non-zero or dies of a signal is restarted, after SIGKILL to
whatever is left of its process group (data-loader workers, orphaned ranks). Exit 0 ends the
supervisor with 0.

**Hang.** Every ``poll`` seconds the supervisor asks the collector about the run: a ``hang``
anomaly (the liveness detector's finding: heartbeats arrive but no step completes) stored
after the current child started ends the attempt; so does, with ``hang_timeout``, no new
step for that long once the attempt made its first one. "The step" is that of the newest
point of rank 0 (system samples carry the current step too, so a hung trainer's samples do
not count as progress; a step that goes back, as after a rollback, does). The child's group
gets SIGTERM, then SIGKILL after ``grace`` seconds, and is restarted. A collector that
cannot be reached costs only the hang detection: the supervisor warns once and goes on
restarting crashed children. A hang anomaly is matched against the child's start on the
collector's clock (``created_at``), so clocks that disagree by more than a hang timeout
between hosts would hide one.

**Resume.** Each restart asks the collector for the run's last good checkpoint and passes
its path in ``RUNWATCH_RESUME_FROM``; no good checkpoint: the variable is unset and the
trainer starts from scratch. ``RUNWATCH_RESTART_COUNT`` holds the restarts so far (0 in the
first attempt; never reset, unlike the count that decides when to give up). When the
collector cannot be reached, the checkpoint of the previous attempt (if any) is used again.
The first attempt inherits the supervisor's own ``RUNWATCH_RESUME_FROM``, if set.

**Giving up.** After ``max_restarts`` restarts in a row the supervisor gives up and exits
with the last attempt's status (128 + N for death by signal N). An attempt that ran at
least ``reset_after`` seconds before failing was healthy for a while: the count starts
again from zero. Between restarts it waits ``backoff`` seconds, doubling with each
restart in a row, up to :data:`MAX_BACKOFF`. Giving up is logged at ERROR on the
``runwatch.supervise`` logger and raised as a critical alert of kind
``supervisor_gave_up`` on the run (routed and escalated like every alert), when the
collector knows the run.

**Signals.** SIGINT and SIGTERM are forwarded to the child's group and the supervisor exits
with the child's status, restarting nothing; the group gets SIGKILL if it is still there
``grace`` seconds later, or at once on a second signal.

Everything the supervisor says goes to the ``runwatch.supervise`` logger (INFO: attempts and
exits, WARNING: an unreachable collector, ERROR: giving up); the CLI prints it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from types import FrameType
from typing import Any

import httpx

from runwatch.agent.options import RESUME_FROM_ENV
from runwatch.client import Client, ClientError
from runwatch.wire import generated_run_name

log = logging.getLogger("runwatch.supervise")

MAX_BACKOFF = 60.0
"""Longest wait between two restarts, in seconds."""
GAVE_UP_KIND = "supervisor_gave_up"
"""Kind of the alert the supervisor raises when it gives up on a run."""
ANOMALY_PAGE = 1000
"""Anomalies fetched per request (the API's most)."""
WAIT_SLICE = 0.2
"""Longest the supervisor waits on the child without looking at signals and the clock."""
COLOURS = {logging.WARNING: "yellow", logging.ERROR: "red", logging.CRITICAL: "red"}
"""Colours of :class:`EchoHandler` lines by level."""


class CannotStart(Exception):
    """The training command cannot be started at all (not found, not executable)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt ended: the child's ``returncode`` (negative: killed by that signal)."""

    returncode: int
    seconds: float
    """How long the child ran."""
    hung: bool = False
    """The supervisor killed it because the run hung."""


def exit_status(returncode: int) -> int:
    """A shell's exit status for a child's return code: 128 + N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def describe(returncode: int) -> str:
    if returncode >= 0:
        return f"status {returncode}"
    try:
        return f"signal {signal.Signals(-returncode).name}"
    except ValueError:
        return f"signal {-returncode}"


class Supervisor:
    """Runs ``command`` until it succeeds, restarting it on crashes and hangs.

    ``clock`` (monotonic seconds) and ``poll`` are injectable for tests; ``client`` is made from
    ``server`` and ``api_key`` when not given (and closed by :meth:`run` only then).
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        project: str | None,
        name: str | None = None,
        server: str | None = None,
        api_key: str | None = None,
        max_restarts: int = 3,
        hang_timeout: float | None = None,
        poll: float = 5.0,
        grace: float = 30.0,
        backoff: float = 2.0,
        reset_after: float = 1800.0,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        client: Client | None = None,
    ) -> None:
        if not command:
            raise ValueError("no command to supervise")
        if max_restarts < 0 or poll <= 0 or grace < 0 or backoff < 0 or reset_after <= 0:
            raise ValueError("max_restarts, grace and backoff must be >= 0; poll, reset_after > 0")
        if hang_timeout is not None and hang_timeout <= 0:
            raise ValueError(f"hang_timeout must be > 0, not {hang_timeout}")
        self.command = list(command)
        self.project = project
        self.name = name or generated_run_name()
        self.server = server
        self.api_key = api_key
        self.max_restarts = max_restarts
        self.hang_timeout = hang_timeout
        self.poll = poll
        self.grace = grace
        self.backoff = backoff
        self.reset_after = reset_after
        self.base_env = dict(os.environ if env is None else env)
        self.clock = clock
        self._own_client = client is None
        self._client = client
        self._run_id: int | None = None
        self._anomaly_cursor: int | None = None  # id of the newest hang anomaly looked at
        self._unreachable = False  # warned that the collector cannot be reached
        self._stop = threading.Event()
        self._signals = 0
        self._forwarded = False  # the stop signal reached a child
        self._child: subprocess.Popen[bytes] | None = None

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> int:
        """Supervise until the trainer succeeds, the supervisor gives up or is told to stop;
        returns the exit status for the supervisor. Signal handlers are installed only when
        called from the main thread."""
        handlers = self._install_signals()
        try:
            return self._loop()
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            if self._own_client and self._client is not None:
                self._client.close()

    def _loop(self) -> int:
        where = f"{self.project}/{self.name}" if self.project else self.name
        log.info("supervising run %s: %s", where, " ".join(self.command))
        if not self.project:
            log.warning(
                "no project (--project or RUNWATCH_PROJECT): the run cannot be followed on the "
                "collector, so only crashes are restarted, always from scratch"
            )
        restarts = 0  # in all
        streak = 0  # in a row, without a healthy attempt between
        checkpoint: dict[str, Any] | None = None
        status = 0
        while not self._stop.is_set():
            env = self._child_env(restarts, checkpoint)
            origin = _origin(restarts, checkpoint, env.get(RESUME_FROM_ENV))
            log.info("starting attempt %d/%d%s", streak + 1, self.max_restarts + 1, origin)
            outcome = self._attempt(env)
            status = exit_status(outcome.returncode)
            if self._stop.is_set():
                log.info("trainer stopped with %s", describe(outcome.returncode))
                return status
            if outcome.returncode == 0:
                log.info("trainer finished (status 0) after %s", _duration(outcome.seconds))
                return 0
            if outcome.hung:
                log.info("trainer stopped with %s", describe(outcome.returncode))
            else:
                log.info("trainer exited with %s", describe(outcome.returncode))
            if outcome.seconds >= self.reset_after and streak:
                log.info(
                    "the attempt ran %s (at least %s): restart count reset",
                    _duration(outcome.seconds),
                    _duration(self.reset_after),
                )
                streak = 0
            if streak >= self.max_restarts:
                log.error(
                    "giving up on run %s after %d restart(s) in a row: the last attempt %s with %s",
                    where,
                    streak,
                    "hung and was killed" if outcome.hung else "ended",
                    describe(outcome.returncode),
                )
                self._page(
                    f"gave up after {streak} restart(s) in a row: the last attempt "
                    f"{'hung and was killed' if outcome.hung else 'ended'} with "
                    f"{describe(outcome.returncode)}"
                )
                return status
            delay = min(self.backoff * 2**streak, MAX_BACKOFF)
            streak += 1
            restarts += 1
            if delay > 0:
                log.info("restarting in %s", _duration(delay))
                if self._stop.wait(delay):
                    break
            checkpoint = self._last_good(checkpoint)
        log.info("stopped before the next attempt")
        return status

    def _attempt(self, env: dict[str, str]) -> Outcome:
        started = self.clock()
        started_wall = time.time()
        try:
            child = subprocess.Popen(self.command, env=env, start_new_session=True)
        except OSError as exc:
            raise CannotStart(f"cannot start {self.command[0]!r}: {exc.strerror or exc}") from exc
        self._child = child
        watch = _Progress()
        next_poll = started
        stop_seen_at: float | None = None
        killed = False
        try:
            while True:
                returncode = _wait(child, WAIT_SLICE)
                now = self.clock()
                if returncode is not None:
                    if returncode != 0:
                        _signal_group(child, signal.SIGKILL)  # leftovers of a failed attempt
                    return Outcome(returncode, now - started)
                if self._stop.is_set():
                    if stop_seen_at is None:
                        stop_seen_at = now
                        if not self._forwarded:  # it came before the child was known
                            _signal_group(child, signal.SIGTERM)
                    elif now - stop_seen_at >= self.grace and not killed:
                        log.info(
                            "trainer still running %s after the signal: killing it",
                            _duration(self.grace),
                        )
                        _signal_group(child, signal.SIGKILL)
                        killed = True
                    continue
                if self.project and now >= next_poll:
                    next_poll = now + self.poll
                    reason = self._hung(started_wall, watch, now)
                    if reason:
                        log.info("run hung (%s): stopping it", reason)
                        returncode = self._terminate(child)
                        return Outcome(returncode, self.clock() - started, hung=True)
        finally:
            self._child = None

    def _terminate(self, child: subprocess.Popen[bytes]) -> int:
        """SIGTERM the child's group, SIGKILL it after ``grace`` seconds; the return code."""
        _signal_group(child, signal.SIGTERM)
        try:
            child.wait(timeout=self.grace)
        except subprocess.TimeoutExpired:
            log.info("trainer still running %s after SIGTERM: killing it", _duration(self.grace))
        _signal_group(child, signal.SIGKILL)
        return child.wait()

    def _child_env(self, restarts: int, checkpoint: dict[str, Any] | None) -> dict[str, str]:
        env = dict(self.base_env)
        env["RUNWATCH_RUN_NAME"] = self.name
        env["RUNWATCH_RESTART_COUNT"] = str(restarts)
        if self.project:
            env["RUNWATCH_PROJECT"] = self.project
        if self.server:
            env["RUNWATCH_SERVER"] = self.server
        if self.api_key:
            env["RUNWATCH_API_KEY"] = self.api_key
        if restarts:
            env.pop(RESUME_FROM_ENV, None)
            if checkpoint is not None:
                env[RESUME_FROM_ENV] = checkpoint["path"]
        return env

    # -- signals ----------------------------------------------------------------------------
    def _install_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, self._on_signal)
        return previous

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        """Forward the first signal to the child's group; a second one kills the group."""
        self._signals += 1
        self._stop.set()
        child = self._child
        if child is not None:
            _signal_group(child, signum if self._signals == 1 else signal.SIGKILL)
            self._forwarded = True

    # -- the collector ----------------------------------------------------------------------
    def _hung(self, started_wall: float, watch: _Progress, now: float) -> str | None:
        """Why the run counts as hung now, or None; asks the collector."""
        try:
            run_id = self._find_run()
            if run_id is None:
                return None
            if reason := self._hang_anomaly(run_id, started_wall):
                return reason
            if self.hang_timeout is not None:
                # The step of rank 0's newest point is the trainer's current step.
                latest = self.client.latest(run_id, rank=0).values()
                newest = max(latest, key=lambda v: v["wall_time"], default=None)
                stalled = watch.see(newest["step"] if newest else None, now)
                if stalled is not None and stalled > self.hang_timeout:
                    return f"no step for {stalled:.0f} s"
        except (httpx.HTTPError, ClientError) as exc:
            self._cannot_reach(exc)
            return None
        self._reached()
        return None

    def _hang_anomaly(self, run_id: int, started_wall: float) -> str | None:
        """The first ``hang`` anomaly stored after ``started_wall`` not looked at before."""
        while True:
            found = self.client.anomalies(
                run_id, kind="hang", after=self._anomaly_cursor, limit=ANOMALY_PAGE
            )
            for anomaly in found:
                self._anomaly_cursor = anomaly["id"]
                if anomaly["created_at"] >= started_wall:
                    stalled = anomaly["evidence"].get("stalled_s")
                    if isinstance(stalled, float):
                        return f"no step for {stalled:.0f} s, found by the collector"
                    return f"the collector found a hang at step {anomaly['step']}"
            if len(found) < ANOMALY_PAGE:
                return None

    def _page(self, summary: str) -> None:
        """Raise the give-up as a critical alert; best effort (the log line stays)."""
        try:
            run_id = self._find_run()
            if run_id is None:
                return
            alert = self.client.raise_alert(
                run_id, GAVE_UP_KIND, severity="critical", summary=summary
            )
        except (httpx.HTTPError, ClientError) as exc:
            log.warning("could not raise an alert on the collector: %s", exc)
        else:
            log.info("raised alert %d on the collector", alert["id"])

    def _find_run(self) -> int | None:
        """The run's id once the trainer has created it; None before."""
        if self._run_id is None and self.project:
            try:
                self._run_id = self.client.find_run(self.project, self.name)["id"]
            except ClientError as exc:
                if exc.status != 404:
                    raise
        return self._run_id

    def _last_good(self, previous: dict[str, Any] | None) -> dict[str, Any] | None:
        """The checkpoint the next attempt resumes from (see the module docstring)."""
        if not self.project:
            return None
        try:
            run_id = self._find_run()
            found = self.client.last_good_checkpoint(run_id) if run_id is not None else None
        except (httpx.HTTPError, ClientError) as exc:
            self._cannot_reach(exc)
            if previous is None:
                log.info("no word from the collector: the trainer starts from scratch")
            else:
                log.info("no word from the collector: resuming from the previous checkpoint")
            return previous
        self._reached()
        if found is None:
            log.info("the run has no good checkpoint: the trainer starts from scratch")
        return found

    @property
    def client(self) -> Client:
        if self._client is None:
            # Short timeouts: a collector that does not answer must not delay crash restarts.
            self._client = Client(self.server, self.api_key, timeout=min(10.0, self.poll + 1))
        return self._client

    def _cannot_reach(self, exc: Exception) -> None:
        if not self._unreachable:
            self._unreachable = True
            log.warning(
                "cannot use the collector at %s (%s): hangs are not detected and restarts "
                "may not find the last good checkpoint until it answers; crashes are still "
                "restarted",
                self.client.server,
                exc,
            )

    def _reached(self) -> None:
        if self._unreachable:
            self._unreachable = False
            log.info("the collector at %s answers again", self.client.server)


class _Progress:
    """Progress of one attempt as polls see it: the time of the last change of step."""

    def __init__(self) -> None:
        self._step: int | None = None
        self._seen = False  # the first poll only sets the baseline (maybe the previous attempt's)
        self._since: float | None = None  # clock time of the last change seen

    def see(self, step: int | None, now: float) -> float | None:
        """Record ``step`` at ``now``; seconds since the last change (None before the first)."""
        if self._seen and step is not None and step != self._step:
            self._since = now
        self._step = step if step is not None else self._step
        self._seen = True
        return None if self._since is None else now - self._since


def _wait(child: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def _signal_group(child: subprocess.Popen[bytes], signum: int) -> None:
    """Send ``signum`` to the child's process group (its id is the child's pid)."""
    with suppress(ProcessLookupError, PermissionError):  # the group is gone
        os.killpg(child.pid, signum)


def _origin(restarts: int, checkpoint: dict[str, Any] | None, resume: str | None) -> str:
    if checkpoint is not None:
        return f" from checkpoint {checkpoint['path']} (step {checkpoint['step']})"
    if restarts:
        return " from scratch"
    return f" from checkpoint {resume} (RUNWATCH_RESUME_FROM)" if resume else ""


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s" if seconds >= 9.5 else f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class EchoHandler(logging.Handler):
    """Prints the supervisor's log records as one line each on stderr, in colour when a tty."""

    def emit(self, record: logging.LogRecord) -> None:
        import click

        try:
            line = f"runwatch supervise: {record.getMessage()}"
            click.secho(line, err=True, fg=COLOURS.get(record.levelno))
        except Exception:
            self.handleError(record)
