"""``create_app(settings)``: the collector and the query API in one FastAPI process."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import runwatch
from runwatch.alerting.config import AlertingConfig
from runwatch.api.auth import KeyCache
from runwatch.api.routes import (
    alert_hooks,
    alerts,
    anomalies,
    checkpoints,
    commands,
    series,
    silences,
)
from runwatch.api.routes import runs as run_queries
from runwatch.collector import error_handlers
from runwatch.collector.alerts import Alerter
from runwatch.collector.control import ControlChannel
from runwatch.collector.limits import BodyLimit
from runwatch.collector.notifiers import build_notifiers, link_secret
from runwatch.collector.pipeline import DetectionPipeline
from runwatch.collector.policy.engine import PolicyEngine
from runwatch.collector.routes import health, ingest
from runwatch.collector.routes import runs as run_lifecycle
from runwatch.collector.storage import migrate
from runwatch.collector.storage.anomalies import Found
from runwatch.collector.storage.keys import any_active_key
from runwatch.collector.storage.store import Store
from runwatch.collector.storage.writer import BatchWriter
from runwatch.collector.telemetry import Telemetry
from runwatch.db import make_engine
from runwatch.detectors.defaults import default_engine
from runwatch.settings import Settings

log = logging.getLogger("runwatch.collector")

SQLITE_CHECKPOINT_INTERVAL = 1.0
"""Seconds between background WAL checkpoints (SQLite only)."""


def create_app(settings: Settings) -> FastAPI:
    """Build the app; the database is migrated to the newest schema when it starts."""
    telemetry = Telemetry()
    policy = settings.loaded_policy
    alerting = AlertingConfig() if policy is None else policy.alerting

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.db, sqlite_autocheckpoint=False)
        migrate.upgrade(engine)
        store = Store(engine, checkpoint_interval=SQLITE_CHECKPOINT_INTERVAL)
        app.state.store = store
        app.state.writer = writer = BatchWriter(store, observe=telemetry.db_write.observe)
        app.state.control = control = ControlChannel(
            store,
            ttl=settings.command_ttl_seconds,
            checkpoint_window=checkpoints.window_of(settings),
        )
        control.load()
        app.state.alerter = alerter = Alerter(
            store,
            alerting,
            build_notifiers(alerting, settings),
            telemetry,
            secret=link_secret(store, settings),
            public_url=settings.public_url,
            tick_seconds=settings.alert_tick_seconds,
        )
        policy_engine = (
            None if policy is None else PolicyEngine(policy, control, telemetry, alerter)
        )

        def on_anomalies(found: list[Found]) -> None:
            alerter.on_anomalies(found)
            if policy_engine is not None:
                policy_engine.on_anomalies(found)

        app.state.pipeline = pipeline = (
            DetectionPipeline(
                store,
                telemetry,
                engine_factory=functools.partial(
                    default_engine, time_scale=settings.detector_time_scale
                ),
                check_seconds=settings.detector_check_seconds,
                snapshot_seconds=settings.detector_snapshot_seconds,
                on_anomalies=on_anomalies,
            )
            if settings.detection
            else None
        )
        with store.read() as conn:
            open_server = not any_active_key(conn)
        if open_server:
            log.warning(
                "no API keys configured: the server is open to anyone who can reach %s, "
                "which is refused unless it is a loopback address; create keys with "
                "'runwatch keys create'",
                settings.host,
            )
        alerter.start()
        try:
            yield
        finally:
            control.close()
            writer.close()
            if pipeline is not None:  # after the writer: it feeds what the writer committed
                pipeline.close()
            alerter.close()  # after the pipeline: it raises alerts
            store.dispose()

    app = FastAPI(
        title="runwatch",
        version=runwatch.__version__,
        summary="Collector and query API for watched training runs.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.telemetry = telemetry
    app.state.key_cache = KeyCache(settings.key_cache_seconds)
    app.state.pipeline = None
    error_handlers.install(app)

    def count_oversized(path: str) -> None:
        if path == error_handlers.INGEST_PATH:
            telemetry.rejected.labels("payload_too_large").inc()

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, on_reject=count_oversized)
    for router in (
        ingest.router,
        run_lifecycle.router,
        run_queries.router,
        series.router,
        anomalies.router,
        commands.router,
        checkpoints.router,
        alerts.router,
        silences.router,
        alert_hooks.router,
        health.router,
    ):
        app.include_router(router)
    return app
