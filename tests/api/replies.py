"""Checks on API replies that the API tests share."""

from __future__ import annotations

from typing import Any

import httpx

from runwatch.collector.storage.keys import create_key
from tests.conftest import Collector


def ok(reply: httpx.Response, status: int = 200) -> Any:
    """The reply's JSON, once its status is ``status``."""
    assert reply.status_code == status, (reply.request.method, reply.request.url, reply.text)
    return reply.json()


def refused(reply: httpx.Response, status: int, reason: str, fragment: str) -> None:
    """An error reply of the one shape every endpoint uses: ``{"error", "detail"}``."""
    where = f"{reply.request.method} {reply.request.url.path}"
    assert reply.status_code == status, (where, reply.text)
    body = reply.json()
    assert set(body) == {"error", "detail"}, (where, body)
    assert body["error"] == reason, (where, body)
    assert fragment in body["detail"], (where, body)


def key_acting_as(collector: Collector, project: str, scope: str) -> tuple[str, str]:
    """A new key of ``project`` with ``scope``: its secret and the source it acts as."""
    with collector.store.write() as conn:
        secret, info = create_key(conn, project, [scope], name=f"{project}-{scope}")
    return secret, f"api:{info.prefix}"
