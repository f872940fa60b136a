"""The one place where domain errors become HTTP replies.

Every error reply has the same shape: ``{"error": reason, "detail": message}``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException

from runwatch.collector import errors

log = logging.getLogger("runwatch.collector")

STATUS: dict[type[errors.RunwatchError], int] = {
    errors.InvalidInput: 422,
    errors.MalformedBody: 400,
    errors.PayloadTooLarge: 413,
    errors.UnsupportedMediaType: 415,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.Unauthorized: 401,
    errors.Forbidden: 403,
    errors.Unavailable: 503,
}

HTTP_REASONS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid",
}


def error_body(reason: str, detail: str) -> dict[str, str]:
    return {"error": reason, "detail": detail}


def status_of(exc: errors.RunwatchError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 400


def describe_validation(exc: RequestValidationError) -> str:
    """FastAPI's error list as one line: ``body.project: Field required; query.limit: ...``."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


INGEST_PATH = "/api/v1/ingest"


def count_ingest_reject(request: Request, reason: str) -> None:
    """Bump ``runwatch_ingest_rejected_total{reason}`` when the failed request was an ingest."""
    if request.url.path == INGEST_PATH:
        request.app.state.telemetry.rejected.labels(reason).inc()


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""

    @app.exception_handler(errors.RunwatchError)
    async def _domain(request: Request, exc: errors.RunwatchError) -> JSONResponse:
        count_ingest_reject(request, exc.reason)
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, errors.Unauthorized) else None
        return JSONResponse(
            error_body(exc.reason, exc.message), status_code=status_of(exc), headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        if any(err.get("type") == "json_invalid" for err in exc.errors()):
            # Undecodable JSON is a malformed body (400), as on the ingest endpoint.
            count_ingest_reject(request, "malformed_body")
            detail = f"cannot decode application/json body: {describe_validation(exc)}"
            return JSONResponse(error_body("malformed_body", detail), status_code=400)
        count_ingest_reject(request, "invalid")
        return JSONResponse(error_body("invalid", describe_validation(exc)), status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        reason = HTTP_REASONS.get(exc.status_code, "error")
        count_ingest_reject(request, reason)
        detail: Any = exc.detail
        return JSONResponse(
            error_body(reason, str(detail)), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(DataError)
    async def _out_of_range(request: Request, exc: DataError) -> JSONResponse:
        # Inputs are range-checked at the edge; this is the net under that check.
        count_ingest_reject(request, "invalid")
        log.warning("database refused a value: %s", exc.orig)
        return JSONResponse(
            error_body("invalid", "a value is out of range for the database"), status_code=422
        )

    @app.exception_handler(DBAPIError)
    @app.exception_handler(PoolTimeout)
    async def _database_down(request: Request, exc: Exception) -> JSONResponse:
        count_ingest_reject(request, "unavailable")
        log.warning("database unavailable: %s", getattr(exc, "orig", exc))
        return JSONResponse(
            error_body("unavailable", "the database is unavailable; retry later"), status_code=503
        )
