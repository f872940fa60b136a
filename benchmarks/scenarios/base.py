"""What every scenario shares: the :class:`Scenario` record, its :class:`Outcome`, and how a
run is started (:class:`AgentSetup`), so that every run is watched the same way."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runwatch.agent import Run

PROJECT = "scenarios"
SYSTEM_INTERVAL = 0.5
"""Seconds between system samples (``sys/proc_rss_gb``, ...): runs last seconds, not hours."""
HEARTBEAT_INTERVAL = 1.0
PACE_S = 0.025
"""Default wall time of one training step's compute, in seconds (see :func:`~.loop.pace`)."""


@dataclass(frozen=True)
class Outcome:
    """What a finished training run tells the scorer.

    ``onset`` is the ground truth: the first step the fault touched (None for a healthy run).
    Most scenarios know it before they start; ``overfitting`` determines it from the run.
    ``onset_time`` is the wall-clock time (``time.time()``) at the start of that step, for
    anomalies that time-based detectors date by the clock. ``effect`` says, in a few words,
    what the fault did to the run (a sanity check that it was injected at all).
    """

    steps: int
    onset: int | None
    onset_time: float | None
    end_time: float
    effect: str
    notes: dict[str, float | int | str | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Outcome:
        return cls(**data)


@dataclass(frozen=True)
class AgentSetup:
    """How every scenario run is watched; picklable, so spawned ranks can use it too."""

    server: str
    name: str
    spool_dir: str
    project: str = PROJECT

    def init(self) -> Run:
        """``runwatch.init`` with the benchmark's options; a disabled run is an error here."""
        import runwatch
        from runwatch.agent import Run

        run = runwatch.init(
            project=self.project,
            name=self.name,
            server=self.server,
            system_interval=SYSTEM_INTERVAL,
            heartbeat_interval=HEARTBEAT_INTERVAL,
            spool_dir=Path(self.spool_dir),
        )
        if not isinstance(run, Run):
            raise RuntimeError(f"runwatch.init gave a {type(run).__name__} for {self.name!r}")
        return run


Train = Callable[["Run", int], Outcome]
"""``train(run, seed)``: build a model, ``run.watch`` it, train, inject the fault; in-process."""
Launch = Callable[[AgentSetup, int], Outcome]
"""``launch(setup, seed)``: the same for a job of several processes, each calling
``setup.init()`` itself (``slow_rank``)."""


@dataclass(frozen=True)
class Scenario:
    """One kind of run: healthy, or with one fault injected in code at a known step.

    Exactly one of ``train`` (in this process, on a run the caller started and finishes) and
    ``launch`` (processes of its own) is set. ``onset``: the planned fault step, None for a
    healthy run and for a fault whose onset the run determines (``Outcome.onset`` is what is
    scored). ``seeds``: how many seeds the suite runs by default.
    """

    name: str
    summary: str
    steps: int
    onset: int | None
    fault: bool = True
    train: Train | None = None
    launch: Launch | None = None
    seeds: int = 1

    def __post_init__(self) -> None:
        if (self.train is None) == (self.launch is None):
            raise ValueError(f"scenario {self.name!r}: set exactly one of train and launch")
        if self.onset is not None and not 0 < self.onset < self.steps:
            raise ValueError(f"scenario {self.name!r}: onset {self.onset} outside the run")
        if not self.fault and self.onset is not None:
            raise ValueError(f"scenario {self.name!r}: a healthy run has no onset")
