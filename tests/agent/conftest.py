"""Agent fixtures: a collector that can be killed and restarted, a fake collector for the
control channel, and a check that the agent swallowed no internal error a test did not ask
for."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import sqlalchemy as sa

from runwatch.agent.safety import FAULTS

if TYPE_CHECKING:
    from tests.agent.test_control import FakeCollector

STARTUP_TIMEOUT = 30.0


@pytest.fixture(autouse=True)
def no_internal_errors() -> Iterator[None]:
    """The agent swallows its own errors in production; a test must not swallow one silently."""
    before = FAULTS.counts()
    yield
    assert FAULTS.counts() == before, f"agent parts failed during the test: {FAULTS.counts()}"


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def fake() -> Iterator[FakeCollector]:
    """A fake collector on loopback (:class:`tests.agent.test_control.FakeCollector`)."""
    from tests.agent.test_control import serving  # not at the top: that module imports this one

    with serving() as collector:
        yield collector


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class CollectorProcess:
    """``runwatch server`` as its own process on a fixed port, so it can be SIGKILLed and
    started again on the same address and database, as an operator would."""

    def __init__(self, db: Path) -> None:
        self.db_url = f"sqlite:///{db}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> CollectorProcess:
        command = [sys.executable, "-m", "runwatch", "server", "--db", self.db_url]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        self._proc = subprocess.Popen(command)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"collector exited with {self._proc.returncode}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError("collector did not start")

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(10)
        self._proc = None

    def points(self, run_id: int) -> list[tuple[str, int, int, float | None, float]]:
        """Every stored point of the run: (key, rank, step, value, wall_time), in storage order."""
        engine = sa.create_engine(self.db_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    sa.text(
                        "SELECT s.key, s.rank, p.step, p.value, p.wall_time FROM points p "
                        "JOIN series s ON s.id = p.series_id WHERE s.run_id = :run "
                        "ORDER BY p.rowid"
                    ),
                    {"run": run_id},
                ).all()
        finally:
            engine.dispose()
        return [tuple(row) for row in rows]  # type: ignore[misc]


@pytest.fixture
def collector_process(tmp_path: Path) -> Iterator[CollectorProcess]:
    proc = CollectorProcess(tmp_path / "collector.db")
    try:
        yield proc
    finally:
        proc.kill()
