"""The delivery stage: the notification outbox sent with retries, backoff and rate limits.

The dispatcher (:mod:`runwatch.collector.alerts`) writes one ``notifications`` row per
message; here each due row is claimed (compare-and-set ``pending`` -> ``sending`` with a
lease), rendered from its alerts' state *now*, sent by its channel's notifier on a small
worker pool, and finished: ``sent``, ``pending`` again with ``next_attempt_at`` after an
exponential backoff (or the provider's ``Retry-After``), or ``failed`` once the channel's
retries are spent or the error cannot be helped by retrying. Every attempt is logged in
``delivery_attempts`` (the delivery log of ``GET /api/v1/alerts/{id}/deliveries``).

A message asking for attention whose alerts were all acknowledged, resolved or silenced
while it waited is cancelled, not sent. A channel's rate limit defers messages (no attempt
is spent). A worker that dies mid-send leaves its lease to expire, and the row is sent
again: delivery is at least once, with a duplicate only after a crash during a send.
A failing channel never holds up the escalation: the next step's messages are written by
the dispatcher on time whatever became of this one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from urllib.parse import quote

from runwatch.alerting.config import AlertingConfig
from runwatch.alerting.message import STATE_EVENTS, Message
from runwatch.alerting.notifiers.base import DeliveryError, Notifier
from runwatch.alerting.retry import TokenBucket, backoff
from runwatch.alerting.tokens import AckToken, sign_ack
from runwatch.collector.storage import alerts as db
from runwatch.collector.storage import notifications as outbox_db
from runwatch.collector.storage import silences as silence_db
from runwatch.collector.storage.store import Store
from runwatch.collector.telemetry import Telemetry

log = logging.getLogger("runwatch.collector.delivery")

BATCH = 200
"""Notifications claimed per round."""
LEASE_SECONDS = 120.0
"""A claimed notification not finished within this long is taken to be lost with its worker."""
MAX_ERROR_LENGTH = 500
NOTHING_TO_SAY = {
    False: "its alerts were acknowledged, resolved or silenced before it went out",
    True: "the page about its alerts never went out",
}
"""Why a message is cancelled: keyed by whether it reports a change of state."""
ACK_PATH = "/api/v1/hooks/ack"
VOICE_PATH = "/api/v1/hooks/twilio/voice"


class Deliverer:
    """Sends due notifications; :meth:`deliver` is called by the dispatcher's thread."""

    def __init__(
        self,
        store: Store,
        config: AlertingConfig,
        notifiers: Mapping[str, Notifier],
        telemetry: Telemetry,
        *,
        secret: str,
        public_url: str | None,
        clock: Callable[[], float] = time.time,
        workers: int = 4,
    ) -> None:
        self.store = store
        self.config = config
        self.notifiers = dict(notifiers)
        self.telemetry = telemetry
        self.secret = secret
        self.public_url = None if public_url is None else public_url.rstrip("/")
        self.clock = clock
        self.workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="runwatch-notify")
        self._buckets: dict[str, TokenBucket] = {}
        self._in_flight: set[int] = set()

    def deliver(self, *, wait: bool = True) -> int:
        """Claim due notifications and send them. Without ``wait`` (the dispatcher's loop)
        one round, claiming no more than the workers will start on soon, since a claim's
        lease runs from the moment it is taken; with ``wait``, rounds until nothing due is
        left, each waited for. Returns how many were claimed."""
        claimed = 0
        while True:
            room = 2 * self.workers - len(self._in_flight)
            futures = self._claim(room) if room > 0 else []
            claimed += len(futures)
            if not wait:
                return claimed
            wait_all(futures)
            if not futures:
                return claimed

    def _claim(self, room: int) -> list[Future[None]]:
        now = self.clock()
        with self.store.read() as conn:
            due = [
                n
                for n in outbox_db.due_notifications(conn, now, BATCH)
                if n.id not in self._in_flight
            ]
        futures: list[Future[None]] = []
        for n in due:
            if len(futures) >= room:
                break
            with self.store.write() as conn:
                if not outbox_db.claim_notification(conn, n.id, now + LEASE_SECONDS):
                    continue
            self._in_flight.add(n.id)
            futures.append(self._pool.submit(self._send, n))
        return futures

    def _limit(self, channel: str, now: float) -> float:
        """Seconds until ``channel`` may send again (0: now, and the send is counted)."""
        config = self.config.channels.get(channel)
        if config is None or config.rate_limit is None:
            return 0.0
        bucket = self._buckets.get(channel)
        if bucket is None:
            bucket = self._buckets[channel] = TokenBucket(config.rate_limit, now)
        return bucket.take(now)

    def _send(self, n: outbox_db.NotificationRecord) -> None:
        try:
            self._attempt(n)
        except Exception:
            log.exception("notification %d: the delivery stage failed; it is retried", n.id)
        finally:
            self._in_flight.discard(n.id)

    def _attempt(self, n: outbox_db.NotificationRecord) -> None:
        now = self.clock()
        channel = self.config.channels.get(n.channel)
        notifier = self.notifiers.get(n.channel)
        if channel is None or notifier is None:
            self._finish(n, now, 0.0, "failed", f"channel {n.channel!r} is not configured any more")
            return
        message = self._message(n, now)
        if message is None:
            with self.store.write() as conn:
                outbox_db.cancel_notification(conn, n.id, NOTHING_TO_SAY[n.event in STATE_EVENTS])
            self.telemetry.notifications.labels(n.channel_type, "cancelled").inc()
            return
        # The rate limit counts messages that go out, not those cancelled above.
        wait = self._limit(n.channel, now)
        if wait > 0:
            with self.store.write() as conn:
                outbox_db.defer_notification(conn, n.id, now + wait, claimed=True)
            self.telemetry.notifications.labels(n.channel_type, "deferred").inc()
            return
        started = time.monotonic()
        try:
            ref = notifier.send(message, n.target)
        except DeliveryError as exc:
            self._failed(n, channel.retries, channel.backoff, channel.max_backoff, exc, started)
        except Exception as exc:  # a notifier's bug is one failed attempt, not a dead worker
            log.exception("notifier %s raised", n.channel)
            error = DeliveryError(f"{type(exc).__name__}: {exc}", retryable=True)
            self._failed(n, channel.retries, channel.backoff, channel.max_backoff, error, started)
        else:
            self._finish(n, self.clock(), time.monotonic() - started, "sent", None, ref=ref)
            self.telemetry.notifications.labels(n.channel_type, "sent").inc()

    def _failed(
        self,
        n: outbox_db.NotificationRecord,
        retries: int,
        first: float,
        cap: float,
        exc: DeliveryError,
        started: float,
    ) -> None:
        now = self.clock()
        attempt = n.attempts + 1
        error = exc.detail[:MAX_ERROR_LENGTH]
        if exc.retryable and attempt <= retries:
            delay = max(min(exc.retry_after or 0.0, cap), backoff(first, cap, attempt))
            self._finish(n, now, time.monotonic() - started, "pending", error, retry_at=now + delay)
            self.telemetry.notifications.labels(n.channel_type, "retried").inc()
            log.warning(
                "notification %d to %s %s failed (attempt %d, retry in %.0f s): %s",
                n.id,
                n.channel,
                n.target,
                attempt,
                delay,
                error,
            )
        else:
            self._finish(n, now, time.monotonic() - started, "failed", error)
            self.telemetry.notifications.labels(n.channel_type, "failed").inc()
            log.error(
                "notification %d to %s %s failed for good after %d attempt(s): %s",
                n.id,
                n.channel,
                n.target,
                attempt,
                error,
            )

    def _finish(
        self,
        n: outbox_db.NotificationRecord,
        at: float,
        duration: float,
        state: str,
        error: str | None,
        *,
        retry_at: float | None = None,
        ref: str | None = None,
    ) -> None:
        with self.store.write() as conn:
            outbox_db.finish_attempt(
                conn,
                n.id,
                attempt=n.attempts + 1,
                at=at,
                status="sent" if state == "sent" else "failed",
                error=error,
                duration=duration,
                state=state,
                next_attempt_at=retry_at,
                provider_ref=ref,
            )

    def _message(self, n: outbox_db.NotificationRecord, now: float) -> Message | None:
        """The message as the alerts stand now; None when nothing is left to say."""
        attention = n.event not in STATE_EVENTS
        with self.store.read() as conn:
            found = db.get_alerts(conn, n.alert_ids)
            if attention:
                silences = silence_db.active_silences(conn, {a.project_id for a in found}, now)
                found = [
                    a for a in found if a.state == "firing" and not silence_db.holding(silences, a)
                ]
            else:  # told only about alerts this target was paged about (a page sent)
                paged = outbox_db.paged_alerts(conn, [a.id for a in found], n.channel, n.target)
                found = [a for a in found if a.id in paged]
            if not found:
                return None
            ids = tuple(a.id for a in found)
            thread = outbox_db.first_ref(conn, ids, n.channel, n.target)
        ack_url = voice_url = run_url = None
        if self.public_url is not None:
            run_url = f"{self.public_url}/api/v1/runs/{n.run_id}"
            if attention:
                token = quote(sign_ack(self.secret, AckToken(n.id, ids, n.target), now=now))
                ack_url = f"{self.public_url}{ACK_PATH}?token={token}"
                if n.channel_type == "call":
                    voice_url = f"{self.public_url}{VOICE_PATH}?token={token}"
        return Message(
            notification_id=n.id,
            event=n.event,  # type: ignore[arg-type]
            step=n.esc_step,
            alerts=tuple(a.view() for a in found),
            run_url=run_url,
            ack_url=ack_url,
            voice_url=voice_url,
            thread_ref=thread,
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)
