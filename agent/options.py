"""Every knob of the agent, with its default and the environment variable behind it.

Keyword arguments to :func:`runwatch.init` win over ``RUNWATCH_*`` variables,
which win over the defaults here. No pydantic: the agent installs into
training environments and imports in milliseconds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_SERVER = "http://127.0.0.1:8000"
DEFAULT_CHECKPOINT_DIR = "runwatch-checkpoints"
RESUME_FROM_ENV = "RUNWATCH_RESUME_FROM"
"""The checkpoint a restarted trainer resumes from (set by ``runwatch supervise``)."""


def resume_from() -> str | None:
    """The checkpoint this process should resume from: ``$RUNWATCH_RESUME_FROM``, else None
    (what ``run.resume_checkpoint()`` says, enabled or not)."""
    return os.environ.get(RESUME_FROM_ENV) or None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def default_spool_dir() -> Path:
    """``$RUNWATCH_SPOOL_DIR``, else ``$XDG_CACHE_HOME/runwatch/spool`` (``~/.cache/...``)."""
    if spool := os.environ.get("RUNWATCH_SPOOL_DIR"):
        return Path(spool)
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "runwatch" / "spool"


@dataclass(frozen=True, slots=True)
class Options:
    """Resolved agent settings; see the README's agent configuration table."""

    project: str
    name: str | None = None
    server: str = DEFAULT_SERVER
    """Collector URL; ``RUNWATCH_SERVER``."""
    api_key: str | None = None
    """Key with the ``ingest`` scope for ``project``; ``RUNWATCH_API_KEY``."""
    config: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    flush_interval: float = 1.0
    """Seconds between sends when fewer than ``batch_points`` points are waiting."""
    batch_points: int = 5_000
    """Most points in one POST; a backlog is sent as several batches."""
    queue_points: int = 200_000
    """In-memory queue capacity, in points; beyond it low-priority points are dropped."""
    heartbeat_interval: float = 5.0
    """An empty batch goes out when nothing else was sent for this long."""
    system_interval: float = 5.0
    """System sampler period in seconds; 0 switches it off."""
    request_timeout: float = 10.0
    retry_window: float = 30.0
    """How long failed batches are retried from memory before they go to the spool."""
    spool_dir: Path | None = None
    """Where batches wait while the collector is away; ``RUNWATCH_SPOOL_DIR``."""
    spool_bytes: int = 256 * 2**20
    """Spool size limit; the oldest batches are dropped (and counted) beyond it."""
    finish_timeout: float = 10.0
    """How long :meth:`Run.finish` waits for the last points to reach the collector."""
    all_ranks: bool = False
    """Send training scalars from every rank, not only rank 0."""
    disabled: bool = False
    """``RUNWATCH_DISABLED=1``: a run that records nothing and costs nothing."""
    checkpoint_dir: Path = Path(DEFAULT_CHECKPOINT_DIR)
    """Where the default saver writes checkpoints, under a folder named after the run;
    ``RUNWATCH_CHECKPOINT_DIR``. Made absolute at ``init``: a later ``chdir`` does not move it."""
    keep_checkpoints: int | None = 3
    """Retention sent with each registration: the collector keeps this many newest good
    checkpoints (and never the newest one, nor one a rollback may need) and the agent deletes
    the files it wrote that the collector drops. 0 or None: keep every checkpoint."""

    def __post_init__(self) -> None:
        if not self.project or not isinstance(self.project, str):
            raise ValueError("project must be a non-empty string")
        positive = ("flush_interval", "heartbeat_interval", "request_timeout", "finish_timeout")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, not {getattr(self, name)!r}")
        for name in ("system_interval", "retry_window"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)!r}")
        for name in ("batch_points", "queue_points", "spool_bytes"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)!r}")
        if self.keep_checkpoints is not None and not (
            type(self.keep_checkpoints) is int and self.keep_checkpoints >= 0
        ):
            raise ValueError(
                f"keep_checkpoints must be an integer >= 0 (0 = keep all), "
                f"not {self.keep_checkpoints!r}"
            )
        if not self.server.startswith(("http://", "https://")):
            raise ValueError(f"server must be an http:// or https:// URL, not {self.server!r}")


def resolve(project: str | None, **given: Any) -> Options:
    """Options from keyword arguments (``None`` = not given), then environment, then defaults."""
    values = {k: v for k, v in given.items() if v is not None}
    project = project or os.environ.get("RUNWATCH_PROJECT")
    if not project:
        raise ValueError("runwatch.init needs project=... (or RUNWATCH_PROJECT)")
    env = {
        "server": os.environ.get("RUNWATCH_SERVER"),
        "api_key": os.environ.get("RUNWATCH_API_KEY"),
        "name": os.environ.get("RUNWATCH_RUN_NAME"),
        "checkpoint_dir": os.environ.get("RUNWATCH_CHECKPOINT_DIR"),
    }
    for key, value in env.items():
        if value and key not in values:
            values[key] = value
    if "disabled" not in values:
        values["disabled"] = _env_flag("RUNWATCH_DISABLED")
    if "tags" in values:
        values["tags"] = tuple(values["tags"])
    if "spool_dir" in values:
        values["spool_dir"] = Path(values["spool_dir"])
    else:
        values["spool_dir"] = default_spool_dir()
    values["checkpoint_dir"] = Path(values.get("checkpoint_dir", DEFAULT_CHECKPOINT_DIR)).absolute()
    values["server"] = values.get("server", DEFAULT_SERVER).rstrip("/")
    return Options(project=project, **values)
