"""Retries and rate limits of the delivery stage; the only place that waits on a channel."""

from __future__ import annotations

import threading

from runwatch.alerting.config import RateLimit


def backoff(first: float, cap: float, attempt: int) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based): doubling from
    ``first``, at most ``cap``. No jitter: a handful of notifications retry, not a fleet."""
    return min(cap, first * 2 ** (attempt - 1))


class TokenBucket:
    """``limit.count`` sends per ``limit.per`` seconds, in bursts of up to ``count``.

    ``take(now)`` returns 0 when a send may go now (and spends a token), else the seconds
    until one may. Thread-safe; the clock is the caller's.
    """

    def __init__(self, limit: RateLimit, now: float) -> None:
        self.limit = limit
        self._tokens = float(limit.count)
        self._at = now
        self._lock = threading.Lock()

    def take(self, now: float) -> float:
        with self._lock:
            rate = self.limit.per_second
            self._tokens = min(self.limit.count, self._tokens + max(0.0, now - self._at) * rate)
            self._at = max(self._at, now)
            if self._tokens >= 1:
                self._tokens -= 1
                return 0.0
            return (1 - self._tokens) / rate
