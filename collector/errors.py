"""Domain errors of the collector and the API.

Domain code raises these; :mod:`runwatch.collector.error_handlers` turns them
into HTTP responses in one place. Each carries a ``reason``, a closed
snake_case word that also labels ``runwatch_ingest_rejected_total``.
"""

from __future__ import annotations


class RunwatchError(Exception):
    """Base class: ``reason`` names the kind of failure, the message says what to fix."""

    reason = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


class InvalidInput(RunwatchError):
    """The request is well-formed transport-wise but its content is wrong."""

    reason = "invalid"


class MalformedBody(RunwatchError):
    """The body cannot be decoded at all (truncated msgpack, broken JSON)."""

    reason = "malformed_body"


class PayloadTooLarge(RunwatchError):
    """The body or the batch is bigger than the configured limits."""

    reason = "payload_too_large"


class UnsupportedMediaType(RunwatchError):
    """The body's content type is not one the endpoint speaks."""

    reason = "unsupported_media_type"


class NotFound(RunwatchError):
    """The object does not exist, or the caller's key may not see it."""

    reason = "not_found"


class Conflict(RunwatchError):
    """The request is valid but the object's state does not allow it now."""

    reason = "conflict"


class Unauthorized(RunwatchError):
    """No key, or a key that is unknown or revoked."""

    reason = "unauthorized"


class Forbidden(RunwatchError):
    """A valid key without the scope the endpoint needs."""

    reason = "forbidden"


class Unavailable(RunwatchError):
    """The database cannot be reached; the client should retry later."""

    reason = "unavailable"
