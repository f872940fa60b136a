"""HTTP to the collector, with every answer sorted into deliver / retry / drop.

One place decides what a status means for a batch (the alertmanager
``classify_status`` idea): 2xx is delivered (a replay the collector already
holds answers 200 with ``duplicate``), 429 and 5xx and network errors are
worth retrying (429 says how long to wait), 413 and other 4xx never get better
by resending, so the batch is dropped and counted under a reason.
"""

from __future__ import annotations

import email.utils
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from runwatch import wire


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one request: ``ok``, or ``retry`` (after ``wait`` s if known), or a drop."""

    ok: bool
    retry: bool = False
    wait: float | None = None
    reason: str = ""
    """Closed snake_case set: network_error, server_error, rate_limited, payload_too_large,
    unauthorized, unknown_run, rejected."""
    detail: str = ""
    reply: Any = None


DELIVERED = Outcome(ok=True)


def classify(status: int, body: bytes, headers: httpx.Headers) -> Outcome:
    """Sort an HTTP answer; ``detail`` carries the collector's own message."""
    if 200 <= status < 300:
        try:
            reply = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            reply = None
        return Outcome(ok=True, reply=reply)
    detail = _error_detail(body)
    if status == 429:
        return Outcome(False, True, _retry_after(headers), "rate_limited", detail)
    if status >= 500:
        return Outcome(False, True, _retry_after(headers), "server_error", detail)
    reason = {413: "payload_too_large", 401: "unauthorized", 403: "unauthorized"}.get(
        status, "unknown_run" if status == 404 else "rejected"
    )
    return Outcome(False, False, None, reason, f"HTTP {status}: {detail}")


def _error_detail(body: bytes) -> str:
    try:
        doc = orjson.loads(body)
        return str(doc.get("detail") or doc)[:500]
    except (orjson.JSONDecodeError, AttributeError):
        return body[:500].decode("utf-8", "replace")


def _retry_after(headers: httpx.Headers) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


class _QuietSender(logging.Filter):
    """Keep httpx's per-request INFO lines from the sender thread out of the trainer's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName != SENDER_THREAD or record.levelno > logging.INFO


SENDER_THREAD = "runwatch-sender"
logging.getLogger("httpx").addFilter(_QuietSender())


class HttpTransport:
    """The agent's only network client; every call has a timeout and returns an Outcome."""

    def __init__(self, server: str, api_key: str | None, *, timeout: float) -> None:
        headers = {"User-Agent": "runwatch-agent"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(base_url=server, headers=headers, timeout=timeout)

    def create_run(
        self,
        project: str,
        name: str,
        config: dict[str, Any],
        tags: tuple[str, ...],
        world_size: int,
        *,
        timeout: float | None = None,
    ) -> Outcome:
        body = {
            "project": project,
            "name": name,
            "config": config,
            "tags": list(tags),
            "world_size": world_size,
        }
        encoded = orjson.dumps(body, default=str)
        return self._request("POST", "/api/v1/runs", encoded, wire.JSON, timeout)

    def ingest(self, body: bytes, *, timeout: float | None = None) -> Outcome:
        return self._request("POST", "/api/v1/ingest", body, wire.MSGPACK, timeout)

    def ack(
        self, command_id: int, body: dict[str, Any], *, timeout: float | None = None
    ) -> Outcome:
        """Acknowledge a command: ``body`` is ``{run, rank, status, detail, step}``."""
        path = f"/api/v1/commands/{command_id}/ack"
        return self._request("POST", path, orjson.dumps(body), wire.JSON, timeout)

    def register_checkpoint(
        self, run_id: int, body: dict[str, Any], *, timeout: float | None = None
    ) -> Outcome:
        """Register a saved checkpoint; the reply names the checkpoints retention drops."""
        path = f"/api/v1/runs/{run_id}/checkpoints"
        return self._request("POST", path, orjson.dumps(body), wire.JSON, timeout)

    def finish_run(self, run_id: int, state: str, *, timeout: float | None = None) -> Outcome:
        body = orjson.dumps({"state": state})
        return self._request("POST", f"/api/v1/runs/{run_id}/finish", body, wire.JSON, timeout)

    def close(self) -> None:
        self._http.close()

    def _request(
        self, method: str, path: str, body: bytes, content_type: str, timeout: float | None = None
    ) -> Outcome:
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        try:
            response = self._http.request(
                method, path, content=body, headers={"Content-Type": content_type}, **extra
            )
        except httpx.TransportError as exc:  # refused, reset, DNS, timeouts
            return Outcome(False, True, None, "network_error", f"{type(exc).__name__}: {exc}")
        return classify(response.status_code, response.content, response.headers)
