"""The in-trainer agent: ``run = runwatch.init(project=...)``, ``run.watch``, ``run.log``.

Installs without the server's dependencies and imports without torch; torch is
imported when :meth:`Run.watch` is called.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from runwatch.agent.distributed import placement
from runwatch.agent.options import Options, resolve, resume_from
from runwatch.agent.run import Run
from runwatch.agent.worker import Stats

__all__ = ["DisabledRun", "Options", "Run", "init"]

log = logging.getLogger("runwatch.agent")

T = TypeVar("T")


def init(
    project: str | None = None,
    name: str | None = None,
    *,
    server: str | None = None,
    api_key: str | None = None,
    config: Mapping[str, Any] | None = None,
    tags: Sequence[str] | None = None,
    flush_interval: float | None = None,
    batch_points: int | None = None,
    queue_points: int | None = None,
    heartbeat_interval: float | None = None,
    system_interval: float | None = None,
    request_timeout: float | None = None,
    retry_window: float | None = None,
    spool_dir: str | Path | None = None,
    spool_bytes: int | None = None,
    finish_timeout: float | None = None,
    all_ranks: bool | None = None,
    disabled: bool | None = None,
    checkpoint_dir: str | Path | None = None,
    keep_checkpoints: int | None = None,
) -> Run | DisabledRun:
    """Start watching a run: create or resume ``name`` in ``project`` on the collector.

    Returns at once; the collector is contacted in the background, and a collector
    that is down costs the trainer nothing (points wait in memory, then on disk).
    Server and key default to ``RUNWATCH_SERVER`` and ``RUNWATCH_API_KEY``; see
    :class:`~runwatch.agent.options.Options` for every option. A bad option raises
    ``ValueError``; anything else that goes wrong gives a :class:`DisabledRun`.

    Checkpoints go to ``checkpoint_dir`` (``RUNWATCH_CHECKPOINT_DIR``, default
    ``./runwatch-checkpoints``), in a folder named after the run; the collector keeps the
    ``keep_checkpoints`` newest good ones (default 3; 0 keeps all) and the agent deletes the
    files it wrote that the collector drops.
    """
    options = resolve(
        project,
        name=name,
        server=server,
        api_key=api_key,
        config=dict(config) if config is not None else None,
        tags=tags,
        flush_interval=flush_interval,
        batch_points=batch_points,
        queue_points=queue_points,
        heartbeat_interval=heartbeat_interval,
        system_interval=system_interval,
        request_timeout=request_timeout,
        retry_window=retry_window,
        spool_dir=spool_dir,
        spool_bytes=spool_bytes,
        finish_timeout=finish_timeout,
        all_ranks=all_ranks,
        disabled=disabled,
        checkpoint_dir=checkpoint_dir,
        keep_checkpoints=keep_checkpoints,
    )
    if options.disabled:
        return DisabledRun(options)
    try:
        return Run(options, placement())
    except Exception:
        log.warning("runwatch agent: init failed; this run is not recorded", exc_info=True)
        return DisabledRun(options)


class DisabledRun:
    """The same surface as :class:`Run`, doing nothing (``RUNWATCH_DISABLED=1``, failed init)."""

    id = None
    step = 0
    should_stop = False

    def __init__(self, options: Options) -> None:
        self.options = options
        self.name = options.name
        self.stats = Stats()

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Do nothing."""

    def watch(self, *args: Any, **kwargs: Any) -> None:
        """Do nothing."""

    def checkpoint(self, reason: str = "manual") -> str | None:
        """Save nothing: None."""
        return None

    def data(self, iterable: Iterable[T]) -> Iterator[T]:
        """The batches, untouched."""
        return iter(iterable)

    def resume_checkpoint(self) -> str | None:
        """``$RUNWATCH_RESUME_FROM``, for a script that loads it itself; else None."""
        return resume_from()

    def resume(self) -> int | None:
        """Load nothing (nothing is watched): None."""
        return None

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def finish(self, state: str = "finished") -> None:
        """Do nothing."""

    def __enter__(self) -> DisabledRun:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None
