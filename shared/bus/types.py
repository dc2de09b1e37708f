"""What the bus hands to handlers and how consumers are told to behave; the errors that decide
whether a message is retried in place, held, or dead-lettered."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import (
    NoStreamResponseError,
    ServiceUnavailableError,
)
from redis import exceptions as redis_errors

from shared.envelopes import DeadLetter, DeadLetterReplay
from shared.errors import Unavailable
from shared.errors import Undeliverable as Undeliverable  # re-exported: consumers raise it

DAY = 24 * 3600.0


class ProviderUnavailable(Exception):
    """The provider behind a consumer (SMTP relay, Twilio, a customer's endpoint) cannot take the
    message now (unreachable, 5xx, 429, SMTP 4xx). Nothing is wrong with the message: a consumer
    with a `Hold` keeps it and tries again later, until the horizon."""

    def __init__(self, provider: str, reason: str) -> None:
        super().__init__(f"{provider}: {reason}")
        self.provider = provider
        self.reason = reason


@dataclass(frozen=True)
class Delivery:
    """What a handler sees of one JetStream message."""

    subject: str
    data: bytes
    headers: dict[str, str]
    attempt: int
    stored_at: float = 0.0  # Unix seconds: when JetStream stored the message


@dataclass(frozen=True)
class Later:
    """A handler's answer "not yet, look again in `seconds`": the message is nak'd with that delay
    — not a failure, nothing logged (e.g. egress voice leaves the webhook a head start)."""

    seconds: float


Handler = Callable[[Delivery], Awaitable[Later | None]]
Backoff = Callable[[int], float]
DeadHook = Callable[[Delivery, str], Awaitable[None]]


@dataclass(frozen=True)
class Hold:
    """How a consumer rides out a provider outage: delays from `base_delay` doubling per delivery,
    capped at `max_delay`, with jitter (×0.5–1, so held messages do not return in one burst),
    until the message is `horizon` seconds old."""

    horizon: float
    base_delay: float = 1.0
    max_delay: float = 300.0

    def delay(self, attempt: int, age: float) -> float:
        raw = min(self.max_delay, self.base_delay * 2.0 ** min(attempt - 1, 40))
        return max(0.0, min(raw * random.uniform(0.5, 1.0), self.horizon - age))


@dataclass(frozen=True)
class DeadLetterEntry:
    """A dead letter as the DEAD stream holds it, and its replay if it had one."""

    seq: int
    letter: DeadLetter
    replay: DeadLetterReplay | None


@dataclass(frozen=True)
class _Policy:
    max_deliver: int
    backoff: Backoff
    hold: Hold | None
    on_dead: DeadHook | None


def short_backoff(attempt: int) -> float:
    """Redelivery delay after `attempt` failures: 0.2 s doubling, capped at 10 s."""
    return float(min(0.2 * 2 ** (attempt - 1), 10.0))


# A JetStream publish that failed this way stored nothing.
NOT_STORED = (
    NatsTimeout,
    NoRespondersError,
    NoStreamResponseError,
    ServiceUnavailableError,
    ConnectionClosedError,
)
# Failures of a dependency, not of the message: retried in place, never dead-lettered.
TRANSIENT: tuple[type[BaseException], ...] = (
    Unavailable,
    *NOT_STORED,
    redis_errors.ConnectionError,  # also BusyLoadingError: Valkey replaying its AOF
    redis_errors.TimeoutError,
    redis_errors.ClusterDownError,  # a Valkey Cluster failing over a primary
    redis_errors.TryAgainError,  # a slot being migrated between primaries
)


def _message_key(msg: Msg) -> tuple[str, str, int]:
    meta = msg.metadata
    return (meta.stream, meta.consumer or "", meta.sequence.stream)


def decode_or_dead(decoder: msgspec.json.Decoder[Any], data: bytes) -> Any:
    """Decode a bus message; an undecodable one is `Undeliverable`, never retried."""
    try:
        return decoder.decode(data)
    # msgspec reports bytes that are not UTF-8 inside a string as UnicodeDecodeError.
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise Undeliverable(f"undecodable: {exc}") from exc
