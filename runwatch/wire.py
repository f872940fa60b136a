"""Wire protocol v1: the shapes the agent sends and the collector accepts.

Imported by the agent and the collector alike, so it depends on nothing but
msgpack and orjson. A batch is a mapping::

    {"run": 12, "rank": 0, "seq": 7, "heartbeat": 1764460000.0,
     "points": [[step, wall_time, key, value], ...]}

``value`` is a float; NaN and +/-Inf are values, not errors. msgpack carries
them natively. JSON cannot, so they travel as the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"`` (see :func:`encode_float`).
"""

from __future__ import annotations

import math
import secrets
import time
from typing import Any, NamedTuple

import msgpack
import orjson

MSGPACK = "application/msgpack"
JSON = "application/json"

MAX_KEY_LENGTH = 256
"""Longest metric key accepted; longer keys are almost always a bug (an f-string of a tensor)."""

MAX_INT64 = 2**63 - 1
"""Largest step and seq: both are 64-bit columns."""
MAX_ID = 2**31 - 1
"""Largest run id and rank: both are 32-bit columns."""

NONFINITE_STRINGS: dict[str, float] = {
    "NaN": math.nan,
    "Infinity": math.inf,
    "-Infinity": -math.inf,
}

BATCH_FIELDS = frozenset({"run", "rank", "seq", "points", "heartbeat"})


class Point(NamedTuple):
    """One observation of one series: ``key`` at ``step``, measured at ``wall_time``."""

    step: int
    wall_time: float
    key: str
    value: float


def encode_float(value: float) -> float | str:
    """Return ``value`` as JSON can carry it: finite floats as-is, others as strings."""
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def decode_float(value: object) -> float | None:
    """Inverse of :func:`encode_float`; ``None`` when ``value`` is not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float | int):
        return float(value)
    if isinstance(value, str):
        return NONFINITE_STRINGS.get(value)
    return None


def encode_batch(
    run: int,
    rank: int,
    seq: int,
    points: list[Point] | list[tuple[int, float, str, float]],
    *,
    heartbeat: float | None = None,
    content_type: str = MSGPACK,
) -> bytes:
    """Encode a batch for ``POST /api/v1/ingest`` in the given content type."""
    body: dict[str, Any] = {"run": run, "rank": rank, "seq": seq}
    if content_type == MSGPACK:
        body["points"] = [list(p) for p in points]
    elif content_type == JSON:
        body["points"] = [[s, t, k, encode_float(v)] for s, t, k, v in points]
    else:
        raise ValueError(f"content_type must be {MSGPACK!r} or {JSON!r}, not {content_type!r}")
    if heartbeat is not None:
        body["heartbeat"] = heartbeat
    if content_type == MSGPACK:
        return msgpack.packb(body, use_bin_type=True)
    return orjson.dumps(body)


# -- control channel (v1) -------------------------------------------------------------------
COMMAND_TYPES = ("lr_scale", "clip", "skip_step", "checkpoint", "rollback", "stop")
"""Interventions the agent applies at a step boundary (DESIGN.md, "Interventions")."""
ACK_STATUSES = ("applied", "failed", "expired")
"""What a rank reports about a command: applied, failed (with a reason), or expired (it
reached the rank after its ``at_step`` had passed, so applying it would split the ranks)."""


class Command(NamedTuple):
    """A command as the agent receives it in an ingest reply or from the long poll.

    ``at_step``: the step at whose boundary every rank applies it (None: the next one).
    """

    id: int
    type: str
    args: dict[str, Any]
    at_step: int | None
    source: str


def generated_run_name() -> str:
    """A run name for a run started without one: ``run-YYYYmmdd-HHMMSS-xxxxxx``.

    The collector makes one for an agent that sends none; the agent (rank 0, broadcast to the
    others) and the supervisor make one first when every process or attempt must share it.
    """
    return time.strftime("run-%Y%m%d-%H%M%S-") + secrets.token_hex(3)
