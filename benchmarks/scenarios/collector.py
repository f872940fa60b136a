"""The collector the scenarios report to, and reading back what its detectors found."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx

from benchmarks.collector_process import collector_process
from benchmarks.scenarios.base import PROJECT

READY_TIMEOUT = 60.0
CHECK_SECONDS = "1"
"""``RUNWATCH_DETECTOR_CHECK_SECONDS``: time-based detectors are asked every second."""
TIME_SCALE = "0.01"
"""``RUNWATCH_DETECTOR_TIME_SCALE``: the runs here last seconds with 25 ms steps, so the hang
timeouts meant for real runs (5 min after the last step) shrink a hundredfold (3 s)."""
PAGE = 1000
SETTLE_TIMEOUT = 10.0
SETTLE_QUIET = 2.0
SETTLE_POLL = 0.5

Anomaly = dict[str, Any]


class NoPipeline(Exception):
    """``GET /api/v1/runs/{id}/anomalies`` answered 404 for a run that exists: the collector
    has no detection pipeline (yet)."""


def collector(
    workdir: Path, *, policy: str = "off", name: str = "collector"
) -> AbstractContextManager[str]:
    """``python -m runwatch server`` on a fresh SQLite file and a free loopback port, with
    ``RUNWATCH_DETECTOR_CHECK_SECONDS=1``, ``RUNWATCH_DETECTOR_TIME_SCALE=0.01`` and
    ``RUNWATCH_POLICY=policy``; yields its URL, stops it on the way out."""
    env = {
        "RUNWATCH_DETECTOR_CHECK_SECONDS": CHECK_SECONDS,
        "RUNWATCH_DETECTOR_TIME_SCALE": TIME_SCALE,
        # Off for the scenarios (an intervention would change the run scored); the recovery
        # benchmark runs the default policy too.
        "RUNWATCH_POLICY": policy,
    }
    db = f"sqlite:///{workdir / f'{name}.db'}"
    return collector_process(db, workdir / f"{name}.log", env)


def find_run(url: str, name: str, project: str = PROJECT) -> int | None:
    """The id of run ``name`` in ``project``, or None."""
    params = {"project": project, "name": name}
    reply = httpx.get(f"{url}/api/v1/runs", params=params, timeout=30)
    reply.raise_for_status()
    return next((int(run["id"]) for run in reply.json() if run["name"] == name), None)


def fetch_anomalies(url: str, run_id: int, *, http: httpx.Client | None = None) -> list[Anomaly]:
    """Every anomaly of the run, oldest first (paged with ``after``); raises
    :class:`NoPipeline` on a 404 (call it for a run that exists)."""
    own = http is None
    client = http if http is not None else httpx.Client(timeout=30)
    try:
        out: list[Anomaly] = []
        params: dict[str, int] = {"limit": PAGE}
        while True:
            reply = client.get(f"{url}/api/v1/runs/{run_id}/anomalies", params=params)
            if reply.status_code == 404:
                raise NoPipeline(reply.text)
            reply.raise_for_status()
            page: list[Anomaly] = reply.json()
            out.extend(page)
            if len(page) < PAGE:
                return out
            params["after"] = int(page[-1]["id"])
    finally:
        if own:
            client.close()


def settled_anomalies(
    url: str,
    run_id: int,
    *,
    timeout: float = SETTLE_TIMEOUT,
    quiet: float = SETTLE_QUIET,
    poll: float = SETTLE_POLL,
) -> tuple[list[Anomaly], bool]:
    """The run's anomalies once they stopped changing for ``quiet`` seconds (and at least
    ``quiet`` seconds after the call, so a detector asked on a clock gets a turn), or what
    there is after ``timeout``. Returns (anomalies, settled)."""
    start = time.monotonic()
    with httpx.Client(timeout=30) as http:
        last = fetch_anomalies(url, run_id, http=http)
        changed = start
        while True:
            now = time.monotonic()
            if now - changed >= quiet:
                return last, True
            if now - start >= timeout:
                return last, False
            time.sleep(poll)
            current = fetch_anomalies(url, run_id, http=http)
            if current != last:
                last, changed = current, time.monotonic()
