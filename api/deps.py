"""Typed dependencies shared by every router.

They are ``async``: FastAPI runs a plain ``def`` dependency in the thread
pool, a hop that cost more than these lookups themselves on the ingest path.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, Header, Path, Query, Request
from starlette.concurrency import run_in_threadpool

from runwatch.api.auth import KeyCache, Principal, authorize, bearer_secret, lookup_state
from runwatch.collector.alerts import Alerter
from runwatch.collector.control import ControlChannel
from runwatch.collector.pipeline import DetectionPipeline
from runwatch.collector.storage.store import Store
from runwatch.collector.storage.writer import BatchWriter
from runwatch.collector.telemetry import Telemetry
from runwatch.settings import Settings
from runwatch.wire import MAX_ID


async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_telemetry(request: Request) -> Telemetry:
    return request.app.state.telemetry


async def get_writer(request: Request) -> BatchWriter:
    return request.app.state.writer


async def get_pipeline(request: Request) -> DetectionPipeline | None:
    """The detection pipeline; None when detection is switched off."""
    return request.app.state.pipeline


async def get_control(request: Request) -> ControlChannel:
    return request.app.state.control


async def get_alerter(request: Request) -> Alerter:
    """The alerting service: acknowledge, resolve, raise, silence (always present)."""
    return request.app.state.alerter


RunId = Annotated[int, Path(ge=1, le=MAX_ID, description="Run id.")]
Rank = Annotated[
    int, Query(ge=0, le=MAX_ID, description="Rank of the process (0 if not distributed).")
]

StoreDep = Annotated[Store, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
TelemetryDep = Annotated[Telemetry, Depends(get_telemetry)]
WriterDep = Annotated[BatchWriter, Depends(get_writer)]
PipelineDep = Annotated[DetectionPipeline | None, Depends(get_pipeline)]
ControlDep = Annotated[ControlChannel, Depends(get_control)]
AlerterDep = Annotated[Alerter, Depends(get_alerter)]


async def get_key_cache(request: Request) -> KeyCache:
    return request.app.state.key_cache


KeyCacheDep = Annotated[KeyCache, Depends(get_key_cache)]


def _requires(scope: str):  # type: ignore[no-untyped-def]
    async def dependency(
        store: StoreDep,
        settings: SettingsDep,
        cache: KeyCacheDep,
        authorization: Annotated[str | None, Header()] = None,
    ) -> Principal:
        secret = bearer_secret(authorization)
        now = time.monotonic()
        known = cache.get(secret, now)
        if known is None:
            known = await run_in_threadpool(lookup_state, store, secret)
            cache.put(secret, known, now)
        return authorize(known, secret, scope, loopback=settings.is_loopback)

    return Depends(dependency)


IngestAuth = Annotated[Principal, _requires("ingest")]
ReadAuth = Annotated[Principal, _requires("read")]
OperateAuth = Annotated[Principal, _requires("operate")]
