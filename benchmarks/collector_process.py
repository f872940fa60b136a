"""``runwatch server`` as a subprocess for the benchmarks: a free loopback port, a log file,
ready when ``/readyz`` answers, stopped (terminate, then kill) when the block ends."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx

READY_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def collector_process(
    db_url: str, log_path: Path, env: Mapping[str, str] | None = None
) -> Iterator[str]:
    """Start ``python -m runwatch server --db db_url`` with ``env`` added; yield its URL."""
    port = free_port()
    command = [
        sys.executable,
        *("-m", "runwatch", "server", "--db", db_url),
        *("--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"),
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # Ctrl-C reaches only us; we stop it below
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"collector exited ({proc.returncode}):\n{log_path.read_text()}")
            with suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"collector not ready after {READY_TIMEOUT:.0f} s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
