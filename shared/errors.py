"""Domain errors with stable machine codes. Each edge (HTTP, SMTP, TwiML) maps them in one place."""

from __future__ import annotations

from typing import Any

import msgspec


class SwitchboardError(Exception):
    """Base of every error a caller can act on. `code` is stable; `message` is for people."""

    code = "internal_error"
    status = 500

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class InvalidRequest(SwitchboardError):
    code = "invalid_request"
    status = 422


class AddressRequired(InvalidRequest):
    """A conversation on a channel that reaches people at an address (SMS, email) needs one."""

    code = "address_required"


class IdempotencyKeyReused(InvalidRequest):
    """An Idempotency-Key seen before with a different body: a client bug, never a replay."""

    code = "idempotency_key_reused"


class Unauthenticated(SwitchboardError):
    code = "unauthenticated"
    status = 401


class KeyRevoked(Unauthenticated):
    code = "key_revoked"


class KeyExpired(Unauthenticated):
    code = "key_expired"


class Forbidden(SwitchboardError):
    code = "forbidden"
    status = 403


class NotFound(SwitchboardError):
    code = "not_found"
    status = 404


class Conflict(SwitchboardError):
    code = "conflict"
    status = 409


class IllegalTransition(Conflict):
    code = "illegal_transition"


class ConversationClosed(Conflict):
    code = "conversation_closed"


class ConversationExists(Conflict):
    """SMS keeps one open conversation per (end user, our number)."""

    code = "conversation_exists"


class IdempotencyKeyInUse(Conflict):
    """The first request under this Idempotency-Key is still being answered."""

    code = "idempotency_key_in_use"


class IdentityConflict(Conflict):
    """The identifier already belongs to another end user: linking never merges silently."""

    code = "identity_conflict"


class Unavailable(SwitchboardError):
    """A dependency (NATS, Redis, core) did not answer in time; the caller may retry."""

    code = "unavailable"
    status = 503


class RateLimited(SwitchboardError):
    """Too many requests for a key or an end user; `retry_after` (seconds) says when to retry."""

    code = "rate_limited"
    status = 429

    def __init__(self, message: str, *, retry_after: int, details: dict[str, Any] | None = None):
        super().__init__(message, details={**(details or {}), "retry_after": retry_after})
        self.retry_after = retry_after


class TurnTimeout(SwitchboardError):
    """Core accepted the turn but did not answer in time; it will still be applied."""

    code = "turn_timeout"
    status = 504


class Undeliverable(Exception):
    """A bus message that no retry will fix (undecodable, unknown schema version, a permanent
    domain error): its consumer dead-letters it now with `reason`. Not a SwitchboardError: it never
    reaches a caller, only the DEAD stream."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _codes(root: type[SwitchboardError]) -> dict[str, type[SwitchboardError]]:
    table = {root.code: root}
    for sub in root.__subclasses__():
        table.update(_codes(sub))
    return table


def error_from_code(
    code: str, message: str, details: dict[str, Any] | None = None
) -> SwitchboardError:
    """Rebuild a domain error that crossed the bus as (code, message, details)."""
    return _codes(SwitchboardError).get(code, SwitchboardError)(message, details=details)


class ErrorBody(msgspec.Struct, kw_only=True):
    code: str
    message: str
    details: dict[str, Any] = {}


class ErrorResponse(msgspec.Struct, kw_only=True):
    """The one error shape of every HTTP answer and SSE `error` frame:
    `{"error": {"code", "message", "details"}}`."""

    error: ErrorBody


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorBody(code=code, message=message, details=details or {}))


def error_body_of(exc: SwitchboardError) -> ErrorResponse:
    return error_body(exc.code, exc.message, exc.details)
