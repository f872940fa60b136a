"""Running the app under uvicorn: in the foreground (CLI) or in a thread (tests, demo).

uvloop + httptools are used because the plain asyncio loop loses TCP_NODELAY
on keep-alive replies and stalls each one ~40 ms (uvicorn#3149, DESIGN.md).
"""

from __future__ import annotations

import gc
import socket
import threading
import time

import uvicorn
from sqlalchemy.engine import make_url

from runwatch.collector.app import create_app
from runwatch.collector.storage import migrate
from runwatch.collector.storage.keys import any_active_key
from runwatch.collector.storage.store import Store
from runwatch.db import make_engine
from runwatch.settings import Settings

STARTUP_TIMEOUT = 30.0


class RefusedToStart(Exception):
    """The settings would expose an unprotected server."""


def safe_url(url: str) -> str:
    """The database URL without its password, for logs."""
    return make_url(url).render_as_string(hide_password=True)


def check_exposure(settings: Settings) -> bool:
    """Migrate, then refuse a non-loopback bind without keys; True when the server is open."""
    store = Store(make_engine(settings.db))
    try:
        migrate.upgrade(store.engine)
        with store.read() as conn:
            open_server = not any_active_key(conn)
    finally:
        store.dispose()
    if open_server and not settings.is_loopback:
        raise RefusedToStart(
            f"refusing to bind {settings.host}: no API keys are configured, so anyone who can "
            "reach it could read and write every run. Create one with "
            "'runwatch keys create --project P --scope admin', or bind 127.0.0.1."
        )
    return open_server


def uvicorn_config(settings: Settings, **overrides: object) -> uvicorn.Config:
    options: dict[str, object] = {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop",
        "http": "httptools",
        "log_level": settings.log_level,
        "access_log": False,
    }
    options.update(overrides)
    return uvicorn.Config(create_app(settings), **options)  # type: ignore[arg-type]


GC_GEN0_THRESHOLD = 50_000
"""Allocations between young-generation collections (CPython's default is 700)."""


def tune_gc() -> None:
    """Collect garbage less often in the server process.

    Every ingest batch allocates thousands of short-lived tuples, so with the
    default thresholds the collector ran full collections often enough to set
    the tail latency: p99 of a 1,000-point batch fell from ~145 ms to ~50 ms
    (benchmarks/ingest.py, SQLite, 4 clients) with this threshold. Objects
    alive at start-up are frozen out of every collection.
    """
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 50, 100)


class CollectorServer(uvicorn.Server):
    """uvicorn, answering long polls at once when it stops.

    uvicorn waits for every open request before it shuts the app down, so a
    command long poll (up to 30 s) would hold a stopping server that long.
    """

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        state = getattr(self.config.app, "state", None)
        control = getattr(state, "control", None)
        if control is not None:
            control.close()
        await super().shutdown(sockets)


def serve(settings: Settings) -> None:
    """Run in the foreground until interrupted."""
    check_exposure(settings)
    tune_gc()
    CollectorServer(uvicorn_config(settings)).run()


class ServerThread:
    """The collector on a pre-bound loopback socket in a daemon thread.

    Binding first and handing uvicorn the socket avoids the race of picking a
    free port and binding it later.
    """

    def __init__(self, settings: Settings) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((settings.host, settings.port))
        self.host, self.port = self._sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.settings = settings.model_copy(update={"port": self.port})
        config = uvicorn_config(self.settings, log_level="warning")
        self.app = config.app
        self._server = CollectorServer(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def start(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"collector did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
