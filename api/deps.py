"""Typed dependencies shared by every router."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Path, Query, Request
from runwatch.api.auth import Principal, authenticate
from runwatch.collector.storage.store import Store
from runwatch.collector.storage.writer import BatchWriter
from runwatch.collector.telemetry import Telemetry

from runwatch.settings import Settings
from runwatch.wire import MAX_ID


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_telemetry(request: Request) -> Telemetry:
    return request.app.state.telemetry


def get_writer(request: Request) -> BatchWriter:
    return request.app.state.writer


RunId = Annotated[int, Path(ge=1, le=MAX_ID, description="Run id.")]
Rank = Annotated[
    int, Query(ge=0, le=MAX_ID, description="Rank of the process (0 if not distributed).")
]

StoreDep = Annotated[Store, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
TelemetryDep = Annotated[Telemetry, Depends(get_telemetry)]
WriterDep = Annotated[BatchWriter, Depends(get_writer)]


def _requires(scope: str):  # type: ignore[no-untyped-def]
    def dependency(
        store: StoreDep,
        settings: SettingsDep,
        authorization: Annotated[str | None, Header()] = None,
    ) -> Principal:
        return authenticate(store, authorization, scope, loopback=settings.is_loopback)

    return Depends(dependency)


IngestAuth = Annotated[Principal, _requires("ingest")]
ReadAuth = Annotated[Principal, _requires("read")]
