"""``Client``: the query API from Python, for notebooks, scripts and the CLI.

>>> from runwatch.client import Client            # doctest: +SKIP
>>> with Client("http://127.0.0.1:8000") as rw:  # doctest: +SKIP
...     run = rw.runs(project="llm", state="running")[0]
...     loss = rw.metrics(run["id"], "loss", max_points=500)

Server and key default to ``RUNWATCH_SERVER`` and ``RUNWATCH_API_KEY``.
Numbers come back as floats, NaN and infinities included (they travel as
strings in JSON).
"""

from __future__ import annotations

import os
from typing import Any

import httpx

from runwatch import wire

DEFAULT_SERVER = "http://127.0.0.1:8000"


class ClientError(Exception):
    """The server refused the request; ``reason`` is its snake_case error word."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(f"{status} {reason}: {detail}")
        self.status = status
        self.reason = reason
        self.detail = detail


class Client:
    """Thin, typed-enough wrapper over ``/api/v1``; one HTTP connection pool per client."""

    def __init__(
        self,
        server: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.server = (server or os.environ.get("RUNWATCH_SERVER") or DEFAULT_SERVER).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("RUNWATCH_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(
            base_url=self.server, headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- runs ---------------------------------------------------------------
    def create_run(
        self,
        project: str,
        name: str | None = None,
        *,
        config: dict[str, Any] | None = None,
        tags: list[str] | None = None,
        world_size: int | None = None,
    ) -> dict[str, Any]:
        """Create run ``name`` in ``project`` or resume it; ``resumed`` tells which."""
        body = {"project": project, "name": name, "config": config or {}, "tags": tags or []}
        if world_size is not None:
            body["world_size"] = world_size
        return self._call("POST", "/api/v1/runs", json=body)

    def finish_run(self, run_id: int, state: str = "finished") -> dict[str, Any]:
        return self._call("POST", f"/api/v1/runs/{run_id}/finish", json={"state": state})

    def runs(
        self,
        *,
        project: str | None = None,
        name: str | None = None,
        state: str | None = None,
        tag: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        params = {"project": project, "name": name, "state": state, "tag": tag}
        params |= {"limit": limit, "offset": offset}
        return self._call("GET", "/api/v1/runs", params=_present(params))

    def run(self, run_id: int) -> dict[str, Any]:
        return self._call("GET", f"/api/v1/runs/{run_id}")

    def find_run(self, project: str, name: str) -> dict[str, Any]:
        """The run called ``name`` in ``project``; :class:`ClientError` 404 if none."""
        found = self.runs(project=project, name=name, limit=1)
        if not found:
            raise ClientError(404, "not_found", f"unknown run {project}/{name}")
        return found[0]

    # -- metrics ------------------------------------------------------------
    def ingest(
        self,
        run_id: int,
        points: list[wire.Point] | list[tuple[int, float, str, float]],
        *,
        seq: int,
        rank: int = 0,
    ) -> dict[str, Any]:
        """Send one batch (msgpack); safe to repeat with the same ``seq``."""
        body = wire.encode_batch(run_id, rank, seq, points)
        return self._call(
            "POST", "/api/v1/ingest", content=body, headers={"Content-Type": wire.MSGPACK}
        )

    def series(self, run_id: int) -> list[dict[str, Any]]:
        found = self._call("GET", f"/api/v1/runs/{run_id}/series")
        for s in found:
            s["last_value"] = _number(s["last_value"])
        return found

    def latest(
        self, run_id: int, *, rank: int = 0, keys: list[str] | None = None
    ) -> dict[str, Any]:
        """``{key: {"step", "wall_time", "value"}}`` for one rank."""
        params: dict[str, Any] = {"rank": rank}
        if keys:
            params["keys"] = keys
        found = self._call("GET", f"/api/v1/runs/{run_id}/latest", params=params)
        values = found["values"]
        for entry in values.values():
            entry["value"] = _number(entry["value"])
        return values

    def metrics(
        self,
        run_id: int,
        key: str,
        *,
        rank: int = 0,
        x: str = "step",
        start: float | None = None,
        end: float | None = None,
        max_points: int = 1000,
    ) -> dict[str, Any]:
        """Raw ``points`` [step, wall_time, value], or ``buckets`` when downsampled."""
        params = {"key": key, "rank": rank, "x": x, "start": start, "end": end}
        params["max_points"] = max_points
        found = self._call("GET", f"/api/v1/runs/{run_id}/metrics", params=_present(params))
        found["points"] = [[s, t, _number(v)] for s, t, v in found["points"]]
        for bucket in found["buckets"]:
            for field in ("min", "max", "mean"):
                bucket[field] = _number(bucket[field])
        return found

    # -- anomalies ----------------------------------------------------------
    def anomalies(
        self,
        run_id: int,
        *,
        kind: str | None = None,
        severity: str | None = None,
        rank: int | None = None,
        after: int | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Anomalies of the run, oldest first; pass the last one's ``id`` as ``after`` to poll."""
        params = {"kind": kind, "severity": severity, "rank": rank, "after": after}
        params["limit"] = limit
        found = self._call("GET", f"/api/v1/runs/{run_id}/anomalies", params=_present(params))
        for anomaly in found:
            anomaly["evidence"] = {
                name: decoded if (decoded := _number(value)) is not None else value
                for name, value in anomaly["evidence"].items()
            }
        return found

    # -- commands -----------------------------------------------------------
    def issue_command(
        self,
        run_id: int,
        type: str,
        *,
        at_step: int | None = None,
        expires_in: float | None = None,
        **args: Any,
    ) -> dict[str, Any]:
        """Issue ``type`` with ``args`` to every rank of the run (needs the operate scope).

        >>> rw.issue_command(run, "lr_scale", factor=0.5, steps=200)  # doctest: +SKIP
        """
        body: dict[str, Any] = {"type": type, "args": args}
        body |= _present({"at_step": at_step, "expires_in": expires_in})
        return self._call("POST", f"/api/v1/runs/{run_id}/commands", json=body)

    def commands(
        self,
        run_id: int,
        *,
        state: str | None = None,
        after: int | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Commands of the run with every rank's ack, oldest first (the audit log)."""
        params = _present({"state": state, "after": after, "limit": limit})
        return self._call("GET", f"/api/v1/runs/{run_id}/commands", params=params)

    def cancel_command(self, command_id: int) -> dict[str, Any]:
        """Stop delivering a pending or delivered command (needs the operate scope)."""
        return self._call("POST", f"/api/v1/commands/{command_id}/cancel")

    def pending_commands(
        self, run_id: int, *, rank: int = 0, wait: float = 0.0
    ) -> list[dict[str, Any]]:
        """What ``rank`` has not acknowledged; waits up to ``wait`` s for a new command."""
        found = self._call(
            "GET",
            f"/api/v1/runs/{run_id}/commands/pending",
            params={"rank": rank, "wait": wait},
            timeout=self._http.timeout.read + wait if self._http.timeout.read else None,
        )
        return found["commands"]

    def ack_command(
        self,
        command_id: int,
        *,
        run: int,
        rank: int = 0,
        status: str = "applied",
        detail: str = "",
        step: int | None = None,
    ) -> dict[str, Any]:
        """Report what ``rank`` did with the command; ``{"id", "state"}``."""
        body = {"run": run, "rank": rank, "status": status, "detail": detail, "step": step}
        return self._call("POST", f"/api/v1/commands/{command_id}/ack", json=body)

    # -- checkpoints --------------------------------------------------------
    def register_checkpoint(self, run_id: int, **body: Any) -> dict[str, Any]:
        """Register a saved checkpoint (needs the ingest scope); ``{"checkpoint", "prune"}``.

        ``body``: step, path, size_bytes, wall_time, and optionally reason, command, keep.
        """
        return self._call("POST", f"/api/v1/runs/{run_id}/checkpoints", json=body)

    def checkpoints(
        self,
        run_id: int,
        *,
        label: str | None = None,
        include_deleted: bool = False,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Checkpoints of the run with their labels (good, suspect, unverified), newest first."""
        params = _present({"label": label, "include_deleted": include_deleted, "limit": limit})
        found = self._call("GET", f"/api/v1/runs/{run_id}/checkpoints", params=params)
        return found["checkpoints"]

    def last_good_checkpoint(self, run_id: int) -> dict[str, Any] | None:
        """The most recently registered good checkpoint; None when the run has none."""
        try:
            return self._call("GET", f"/api/v1/runs/{run_id}/checkpoints/last-good")
        except ClientError as exc:
            if exc.status == 404 and "has no good checkpoint" in exc.detail:
                return None
            raise

    # -- alerts -------------------------------------------------------------
    def alerts(
        self,
        *,
        state: str | None = None,
        run: int | None = None,
        severity: str | None = None,
        kind: str | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Alerts of the key's project, newest first; pass the last one's ``id`` as ``before``
        for the next page."""
        params = {"state": state, "run": run, "severity": severity, "kind": kind}
        params |= {"before": before, "limit": limit}
        return self._call("GET", "/api/v1/alerts", params=_present(params))

    def alert(self, alert_id: int) -> dict[str, Any]:
        """One alert with ``events``: every transition, who made it and when."""
        return self._call("GET", f"/api/v1/alerts/{alert_id}")

    def alert_deliveries(self, alert_id: int) -> list[dict[str, Any]]:
        """Every message about the alert with its delivery ``log``, oldest first."""
        return self._call("GET", f"/api/v1/alerts/{alert_id}/deliveries")

    def ack_alert(self, alert_id: int) -> dict[str, Any]:
        """Acknowledge an alert, which stops its escalation (needs the operate scope)."""
        return self._call("POST", f"/api/v1/alerts/{alert_id}/ack")

    def resolve_alert(self, alert_id: int) -> dict[str, Any]:
        """Resolve an alert (needs the operate scope)."""
        return self._call("POST", f"/api/v1/alerts/{alert_id}/resolve")

    def raise_alert(self, run: int, kind: str, **body: Any) -> dict[str, Any]:
        """Raise an alert about ``run`` (needs the ingest scope); an open one of the same run,
        kind and key is updated instead.

        ``body``: key, severity (info|warning|critical), summary, step.

        >>> rw.raise_alert(run, "supervisor:restart_loop", severity="critical")  # doctest: +SKIP
        """
        return self._call("POST", "/api/v1/alerts", json={"run": run, "kind": kind, **body})

    # -- silences -----------------------------------------------------------
    def create_silence(
        self,
        matchers: dict[str, str | int],
        *,
        duration: float | str | None = None,
        ends_at: float | None = None,
        starts_at: float | None = None,
        comment: str = "",
        project: str | None = None,
    ) -> dict[str, Any]:
        """Hold back notifications about alerts matching every one of ``matchers`` (run,
        run_id, kind, key, severity; strings are globs) until ``ends_at`` or for ``duration``
        (seconds or text such as ``"2h"``). Needs the operate scope.

        >>> rw.create_silence({"run": "sweep-*", "kind": "hang"}, duration="2h")  # doctest: +SKIP
        """
        body = {"matchers": matchers, "comment": comment}
        body |= _present(
            {"duration": duration, "ends_at": ends_at, "starts_at": starts_at, "project": project}
        )
        return self._call("POST", "/api/v1/silences", json=body)

    def silences(self, active: bool | None = None, *, limit: int = 100) -> list[dict[str, Any]]:
        """Silences, newest first; ``active`` True: in force now, False: not, None: all."""
        params = _present({"active": active, "limit": limit})
        return self._call("GET", "/api/v1/silences", params=params)

    def silence(self, silence_id: int) -> dict[str, Any]:
        return self._call("GET", f"/api/v1/silences/{silence_id}")

    def expire_silence(self, silence_id: int) -> dict[str, Any]:
        """End a silence now (needs the operate scope)."""
        return self._call("DELETE", f"/api/v1/silences/{silence_id}")

    # -- plumbing -----------------------------------------------------------
    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        if response.is_success:
            return response.json()
        try:
            body = response.json()
            reason, detail = body.get("error", "error"), body.get("detail", response.text)
        except ValueError:
            reason, detail = "error", response.text[:500]
        raise ClientError(response.status_code, reason, str(detail))


def _present(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


def _number(value: Any) -> float | None:
    return None if value is None else wire.decode_float(value)
