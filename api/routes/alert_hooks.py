"""Acknowledging from where the alert reached a person: Slack buttons, a phone keypress, a
link in an e-mail or a text.

None of these requests carries an API key; each proves itself instead. Slack signs its
requests with the app's signing secret and a timestamp (older than 5 minutes: refused);
Twilio signs the URL and form fields with the account's auth token; links carry a token
signed by the collector that names the notification, its alerts and its target, and
expires after ``alerting.link_ttl``. A Slack request or a keypress seen before is refused
as a replay. A link only acknowledges on POST: opening it (as mail scanners and chat
previews do) shows a page with the button.
"""

from __future__ import annotations

import html
from typing import Annotated

from fastapi import APIRouter, Form, Header, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from runwatch.alerting.slack_hooks import parse_slack_action, verify_slack_request
from runwatch.alerting.tokens import AckToken, ForgedRequest, read_ack
from runwatch.alerting.twilio_hooks import (
    SIGNATURE_HEADER,
    cannot_acknowledge,
    gather_reply,
    verify_twilio_request,
)
from runwatch.api.deps import SettingsDep
from runwatch.collector.alerts import Alerter, Replayed
from runwatch.collector.error_handlers import error_body
from runwatch.collector.storage import alerts as db
from runwatch.collector.storage import notifications as outbox_db

router = APIRouter(prefix="/api/v1/hooks", tags=["alert hooks"])


def _alerter(request: Request) -> Alerter:
    return request.app.state.alerter  # type: ignore[no-any-return]


def _refused(status: int, reason: str, detail: str) -> JSONResponse:
    return JSONResponse(error_body(reason, detail), status_code=status)


@router.post(
    "/slack/interactivity",
    summary="Slack's interactivity endpoint: the Acknowledge and Resolve buttons",
    description="Set this URL as the Slack app's Interactivity Request URL. Verifies Slack's "
    "signature and timestamp (RUNWATCH_SLACK_SIGNING_SECRET) before acting; refuses replays.",
    responses={400: {}, 401: {}, 404: {}, 409: {}},
)
async def slack_interactivity(
    request: Request,
    settings: SettingsDep,
    x_slack_request_timestamp: Annotated[str | None, Header()] = None,
    x_slack_signature: Annotated[str | None, Header()] = None,
) -> Response:
    if settings.slack_signing_secret is None:
        return _refused(404, "not_found", "Slack is not configured on this collector")
    alerter = _alerter(request)
    body = await request.body()
    try:
        verify_slack_request(
            body,
            x_slack_request_timestamp,
            x_slack_signature,
            settings.slack_signing_secret.get_secret_value(),
            now=alerter.clock(),
        )
    except ForgedRequest as exc:
        return _refused(401, "unauthorized", f"not a request from Slack: {exc}")
    try:
        action = parse_slack_action(body)
    except ValueError as exc:
        return _refused(400, "bad_request", str(exc))

    def act() -> None:
        change = alerter.acknowledge if action.action == "ack" else alerter.resolve
        change(
            action.alert_ids,
            by=action.user,
            project_id=None,
            strict=False,
            receipt=("slack", x_slack_signature or ""),
        )

    try:
        await run_in_threadpool(act)
    except Replayed:
        return _refused(409, "conflict", "this request was received before (a replay)")
    return Response(status_code=200)


@router.post(
    "/twilio/voice",
    summary="Twilio's <Gather> action of an alert call: press 1 to acknowledge",
    description="Twilio calls it with the digit pressed. Verifies Twilio's signature "
    "(RUNWATCH_TWILIO_AUTH_TOKEN) over RUNWATCH_PUBLIC_URL and the form, and the signed "
    "token in the URL; refuses replays. Answers TwiML.",
    responses={401: {}, 403: {}, 404: {}, 409: {}},
)
async def twilio_voice(request: Request, settings: SettingsDep) -> Response:
    if settings.twilio_auth_token is None or settings.public_url is None:
        return _refused(404, "not_found", "Twilio is not configured on this collector")
    alerter = _alerter(request)
    form = await request.form()
    params = {k: str(v) for k, v in form.items()}
    url = f"{settings.public_url}{request.url.path}"
    if request.url.query:
        url += f"?{request.url.query}"
    try:
        verify_twilio_request(
            url,
            params,
            request.headers.get(SIGNATURE_HEADER),
            settings.twilio_auth_token.get_secret_value(),
        )
    except ForgedRequest as exc:
        return _refused(403, "forbidden", f"not a request from Twilio: {exc}")
    try:
        token = read_ack(
            alerter.deliverer.secret,
            request.query_params.get("token", ""),
            alerter.config.link_ttl,
            now=alerter.clock(),
        )
    except ForgedRequest as exc:  # Twilio's own request: answer so that the caller hears why
        return Response(cannot_acknowledge(str(exc)), status_code=403, media_type="text/xml")
    digits = params.get("Digits")
    nonce = f"{params.get('CallSid', '')}:{token.notification_id}:{digits}"

    def act() -> bool:
        if digits != "1":
            with alerter.store.write() as conn:
                if not outbox_db.first_receipt(conn, "twilio", nonce, alerter.clock()):
                    raise Replayed
            return False
        done = alerter.acknowledge(
            token.alert_ids,
            by=f"phone:{token.target}",
            project_id=None,
            strict=False,
            receipt=("twilio", nonce),
        )
        return any(a.state == "acknowledged" for a in done)

    try:
        acknowledged = await run_in_threadpool(act)
    except Replayed:
        return _refused(409, "conflict", "this request was received before (a replay)")
    what = f"{len(token.alert_ids)} alert{'s' if len(token.alert_ids) != 1 else ''}."
    return Response(gather_reply(digits, acknowledged, what), media_type="text/xml")


def _link_token(request: Request, text: str) -> AckToken:
    alerter = _alerter(request)
    return read_ack(alerter.deliverer.secret, text, alerter.config.link_ttl, now=alerter.clock())


def _unusable(exc: ForgedRequest) -> HTMLResponse:
    return _page("This link cannot be used", f"<p>{html.escape(str(exc))}.</p>", 403)


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<meta name='viewport' content='width=device-width'></head><body style='font-family:"
        f"sans-serif;max-width:40em;margin:2em auto'><h1>{html.escape(title)}</h1>{body}"
        "</body></html>",
        status_code=status,
    )


@router.get(
    "/ack",
    response_class=HTMLResponse,
    summary="The page an acknowledge link opens (a button; opening it changes nothing)",
    responses={403: {}},
)
async def ack_page(request: Request, token: Annotated[str, Query()] = "") -> HTMLResponse:
    try:
        found = _link_token(request, token)
    except ForgedRequest as exc:
        return _unusable(exc)
    alerter = _alerter(request)

    def read() -> list[db.AlertRecord]:
        with alerter.store.read() as conn:
            return db.get_alerts(conn, found.alert_ids)

    listed = await run_in_threadpool(read)
    items = "".join(
        f"<li>#{a.id} [{html.escape(a.severity)}] {html.escape(a.project)}/"
        f"{html.escape(a.run_name)}: {html.escape(a.view().headline)} "
        f"<em>({html.escape(a.state)})</em></li>"
        for a in listed
    )
    form = (
        f"<form method='post'><input type='hidden' name='token' value='{html.escape(token)}'>"
        "<button type='submit' style='font-size:1.2em'>Acknowledge</button></form>"
    )
    return _page("Acknowledge alerts", f"<ul>{items}</ul>{form}")


@router.post(
    "/ack",
    response_class=HTMLResponse,
    summary="Acknowledge the alerts of an acknowledge link",
    responses={403: {}},
)
async def ack_link(request: Request, token: Annotated[str, Form()] = "") -> HTMLResponse:
    try:
        found = _link_token(request, token)
    except ForgedRequest as exc:
        return _unusable(exc)
    alerter = _alerter(request)

    def act() -> list[db.AlertRecord]:
        with alerter.store.read() as conn:
            kind = outbox_db.notification_channel_type(conn, found.notification_id) or "link"
        return alerter.acknowledge(
            found.alert_ids, by=f"{kind}:{found.target}", project_id=None, strict=False
        )

    done = await run_in_threadpool(act)
    items = "".join(f"<li>#{a.id}: {html.escape(_state_of(a))}</li>" for a in done)
    title = "Acknowledged" if any(a.state == "acknowledged" for a in done) else "Nothing to do"
    return _page(title, f"<ul>{items}</ul>")


def _state_of(alert: db.AlertRecord) -> str:
    """``acknowledged by slack:ana``, ``resolved by runwatch``, ``firing``."""
    by = {"acknowledged": alert.acknowledged_by, "resolved": alert.resolved_by}.get(alert.state)
    return f"{alert.state} by {by}" if by else alert.state
