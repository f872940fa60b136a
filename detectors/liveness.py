"""Liveness: a trainer that stops making steps (a hang) and an agent that stops talking.

Both findings are an *absence* of data, so they are made in :meth:`Liveness.check`, which the
collector calls every few seconds with its clock and each rank's last heartbeat (the time
the collector last received anything from that rank). :meth:`Liveness.update` only learns.

**Progress.** The detector is fed every key (``patterns = ("*",)``): a rank has made
progress when a point arrives whose step differs from that rank's last step and that was
measured later (its agent-side ``wall_time``) than the last progress. Every point counts,
including system samples, because the agent puts those at the trainer's *current* step: a
sample taken after step 1,200 carries 1,200, one taken during a hang carries the same step
again. So a run that logs only ``train/loss`` every 50 steps, without ``watch()`` and its
``train/step_time``, is watched too. A step that goes *back* (a rollback, a resumed run)
measured after the last progress is progress as well; a late point from before (the agent
sends priorities out of order) is not.

**Hang** (``"hang"``, critical): a rank whose heartbeats still arrive has made no progress
for longer than ``timeout = max(min_timeout, factor x interval)``, where ``interval`` is the
longest gap between two progress points seen in this run (any rank). That is the NVIDIA
Resiliency Extension's rule (the heartbeat timeout learned as the observed interval times a
safety factor of 5, DESIGN.md "Published figures"); learning the *longest* gap means that
the pauses a healthy run makes (a validation every few hundred steps, a checkpoint save)
raise the timeout once they have been seen. ``min_timeout`` (300 s) covers the pauses not
yet seen: the first checkpoint save or evaluation of a run would otherwise be a page. It is
half prime-rl's "no step for 600 s": a hung collective is also ended by NCCL's own watchdog
after 10 minutes, so a hang found later than that is found too late. A gap that was
reported as a hang is not learned (a stall that resolved itself, like a file system that
came back, would otherwise make the next one five times slower to find), so a run whose
saves or evaluations take longer than ``min_timeout`` is paged at each one until
``min_timeout`` is raised for it. Until a rank has made its first progress (the gap before
it holds start-up: loading data, compiling the model) its timeout is at least
``startup_timeout`` (30 min; ``None``: no start-up hang is reported), and that first gap is
not learned.

Where the time comes from: progress is measured on the agent's clock (gaps, for learning)
and placed on the collector's clock at the next :meth:`check` (the heartbeat of that moment),
so clocks that disagree between hosts do not shift a timeout; a finding is at most one check
interval late.

**Silent agent** (``"agent_silent"``, critical): no heartbeat from a rank for
``silent_after`` seconds. The agent sends an empty batch every 5 s when it has nothing else
to send, so 30 s is six missed heartbeats (and a slow request or two): the process died,
its host is gone, or the network between them is. A collector that was not checking (it was
restarted, or stalled) gives every agent ``silent_after`` from when it resumes before calling
it silent, since agents back off while the collector is away.

Episodes: a hang of a rank ends at its next progress, a silence at its next heartbeat. One
finding per *incident*: the ranks that begin a hang (or a silence) at the same check are
reported in one anomaly, and ranks that begin one while others are still in it join
without a new one (a collective hang stops every rank within a step; one page, not a
thousand). The anomaly is named after the rank stalled longest, and its message lists the
ranks and their last steps: a rank one step behind the others is the likely culprit.

What it does not do: the collector stops calling :meth:`check` once a run is finished, so a
finished run is never a hang. Between the last step and ``finish()`` (a final evaluation
and save) a run is judged like any other pause, and a rank whose process exits well before
rank 0 marks the run finished is, for that while, a silent agent. Without any heartbeats
for a rank (after a collector restart, before that rank's next batch) nothing is judged.

Cost: every point of the run passes through :meth:`update` (a dict lookup and two
comparisons, ~0.4 us); :meth:`check` is O(ranks), ~0.3 ms for 1,000 ranks. State: a few
numbers per rank.
"""

from __future__ import annotations

import math

from runwatch.detectors.base import Anomaly, RunDetector, check_positive

MAX_LISTED_RANKS = 8
"""Ranks named in one message; the evidence counts them all."""


class _Rank:
    """What the detector knows of one rank's progress."""

    __slots__ = ("at", "hung", "key", "moved", "progressed", "since", "step")

    def __init__(self, step: int, at: float, key: str) -> None:
        self.step = step  # the step of the last progress
        self.at = at  # its wall time (agent clock)
        self.key = key  # the series that showed it
        self.moved = True  # progressed since the last check
        self.since: float | None = None  # collector-clock time of the last progress
        self.progressed = False  # moved past its first step
        self.hung = False  # in a reported hang episode


class Liveness(RunDetector):
    """Hangs (no progress while heartbeats arrive) and silent agents (no heartbeats).

    Parameters
    ----------
    factor
        Safety factor on the longest observed interval between two progress points.
    min_timeout
        Least hang timeout, in seconds.
    startup_timeout
        Least hang timeout, in seconds, before a rank's first progress (``None``: none).
    silent_after
        Seconds without a heartbeat that make an agent silent.

    >>> d = Liveness(min_timeout=10.0, silent_after=15.0)
    >>> for step in range(20):  # one step a second, then stuck at step 19
    ...     _ = d.update("train/loss", 0, step, 1.0, 1000.0 + step)
    >>> # checked every 4 s; the heartbeats stop at 1031
    >>> [(t, a.kind, a.step) for t in range(1019, 1050, 4) for a in d.check(t, {0: min(t, 1031)})]
    [(1031, 'hang', 19), (1047, 'agent_silent', 19)]
    """

    name = "liveness"
    patterns = ("*",)

    def __init__(
        self,
        factor: float = 5.0,
        min_timeout: float = 300.0,
        startup_timeout: float | None = 1800.0,
        silent_after: float = 30.0,
    ) -> None:
        check_positive(factor=factor, min_timeout=min_timeout, silent_after=silent_after)
        if startup_timeout is not None:
            check_positive(startup_timeout=startup_timeout)
        self.factor = factor
        self.min_timeout = min_timeout
        self.startup_timeout = startup_timeout
        self.silent_after = silent_after
        self._reset()

    def _reset(self) -> None:
        self._ranks: dict[int, _Rank] = {}
        self._interval = 0.0  # longest learned gap between two progress points (s)
        self._silent: set[int] = set()  # ranks in a reported silence
        self._last_check: float | None = None
        self._watch_since = -math.inf  # collector time since which checks ran without a gap

    def timeout(self, rank: int | None = None) -> float:
        """Seconds without progress that make ``rank`` (any rank past start-up: None) hung."""
        timeout = max(self.min_timeout, self.factor * self._interval)
        r = self._ranks.get(rank) if rank is not None else None
        if r is not None and not r.progressed and self.startup_timeout is not None:
            timeout = max(timeout, self.startup_timeout)
        return timeout

    def update(
        self, key: str, rank: int, step: int, value: float, wall_time: float
    ) -> Anomaly | None:
        r = self._ranks.get(rank)
        if r is None:
            if math.isfinite(wall_time):
                self._ranks[rank] = _Rank(step, wall_time, key)
            return None
        if step == r.step or not wall_time > r.at:  # same step, or older news (NaN: neither)
            return None
        # The first gap holds start-up, and a reported hang is an incident: neither is a step
        # interval. A gap longer than the timeout that nobody reported (the collector was
        # not checking) counts up to the timeout.
        if r.progressed and not r.hung:
            self._interval = max(self._interval, min(wall_time - r.at, self.timeout()))
        r.step, r.at, r.key = step, wall_time, key
        r.moved = r.progressed = True
        r.hung = False
        return None

    def check(self, now: float, heartbeats: dict[int, float]) -> list[Anomaly]:
        if self._last_check is None or now - self._last_check > self.silent_after:
            self._watch_since = now  # we were not watching: agents get time to come back
        self._last_check = now
        hung: list[tuple[int, float, float]] = []
        silent: list[tuple[int, float]] = []
        for rank, heartbeat in heartbeats.items():
            quiet = now - max(heartbeat, self._watch_since)
            if quiet > self.silent_after:
                if rank not in self._silent:
                    self._silent.add(rank)
                    silent.append((rank, quiet))
                continue  # a stale heartbeat says nothing about progress
            self._silent.discard(rank)
            r = self._ranks.get(rank)
            if r is None:
                continue
            if r.moved or r.since is None:
                r.since, r.moved = heartbeat, False
            stalled = heartbeat - r.since
            timeout = self.timeout(rank)
            if stalled > timeout and not r.hung:
                r.hung = True
                hung.append((rank, stalled, timeout))
        found: list[Anomaly] = []
        # One incident at a time: ranks that stall (or fall silent) while others already do
        # join the incident without a page of their own.
        if hung and len(hung) == sum(r.hung for r in self._ranks.values()):
            found.append(self._hang(hung))
        if silent and len(silent) == len(self._silent):
            found.append(self._silence(silent))
        return found

    def _hang(self, hung: list[tuple[int, float, float]]) -> Anomaly:
        hung.sort(key=lambda h: (-h[1], h[0]))
        rank, stalled, timeout = hung[0]
        r = self._ranks[rank]
        listed = ", ".join(
            f"{k} (step {self._ranks[k].step})" for k, _, _ in hung[:MAX_LISTED_RANKS]
        )
        more = f" and {len(hung) - MAX_LISTED_RANKS} more" if len(hung) > MAX_LISTED_RANKS else ""
        how = (
            f"the longest step interval seen is {self._interval:.3g} s"
            if self._interval > 0
            else "no step interval seen yet"
        )
        return self.anomaly(
            "hang",
            "critical",
            r.key,
            rank,
            r.step,
            stalled / timeout,
            f"no training progress for {stalled:.0f} s on {len(hung)} rank(s): {listed}{more}; "
            f"heartbeats still arrive, so the trainer is alive but stuck (a collective, the "
            f"data loader, I/O). Timeout {timeout:.0f} s ({how})",
            stalled_s=stalled,
            timeout_s=timeout,
            interval_s=self._interval,
            ranks=float(len(hung)),
        )

    def _silence(self, silent: list[tuple[int, float]]) -> Anomaly:
        silent.sort(key=lambda s: (-s[1], s[0]))
        rank, quiet = silent[0]
        r = self._ranks.get(rank)
        listed = ", ".join(str(k) for k, _ in silent[:MAX_LISTED_RANKS])
        more = (
            f" and {len(silent) - MAX_LISTED_RANKS} more" if len(silent) > MAX_LISTED_RANKS else ""
        )
        return self.anomaly(
            "agent_silent",
            "critical",
            "heartbeat",
            rank,
            r.step if r is not None else 0,
            quiet / self.silent_after,
            f"no heartbeat for {quiet:.0f} s from {len(silent)} rank(s): {listed}{more}; "
            "the trainer process, its host or the network to it is gone",
            quiet_s=quiet,
            silent_after_s=self.silent_after,
            ranks=float(len(silent)),
        )
