"""What every egress channel is to the worker: a connector that declares the durable consumers it
needs; the bus's one consumer loop (`Bus.consume`) runs them — acks, retries with backoff, holding
through provider outages, dead letters. A channel's provider quirks stay in its own module."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from shared.bus import Backoff, Bus, DeadHook, Handler, Hold, short_backoff
from shared.settings import EgressSettings
from shared.subjects import Subjects


@dataclass(frozen=True)
class Consumer:
    """One durable consumer of a channel: the arguments of `Bus.consume`."""

    stream: str
    durable: str
    filter_subject: str
    handler: Handler
    max_ack_pending: int = 1
    max_deliver: int = 5
    ack_wait: float = 30.0
    batch: int = 1
    workers: int = 1
    backoff: Backoff = short_backoff
    before_batch: Callable[[], Awaitable[None]] | None = None
    hold: Hold | None = None
    on_dead: DeadHook | None = None

    async def start(self, bus: Bus) -> None:
        await bus.consume(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})


@dataclass(frozen=True)
class ChannelContext:
    """What the channels' consumers share: subjects, settings and the hook for a reply that
    finally failed (marked `failed`, `delivery.failed` raised)."""

    subjects: Subjects
    settings: EgressSettings
    on_dead: DeadHook

    def hold(self, horizon: float, base: float | None = None) -> Hold:
        """How a channel's consumer holds its messages through a provider outage."""
        return Hold(
            horizon=horizon,
            base_delay=self.settings.egress_retry_base_seconds if base is None else base,
            max_delay=self.settings.egress_retry_max_delay_seconds,
        )

    def one_at_a_time(
        self,
        durable: str,
        filter_subject: str,
        handler: Handler,
        *,
        max_deliver: int,
        ack_wait: float,
        horizon: float,
    ) -> Consumer:
        """A consumer of replies to a provider that sends one at a time (so they leave in
        order), holds through the provider's outage up to `horizon`, and marks a reply that
        finally failed."""
        return Consumer(
            stream=self.subjects.outbound_stream,
            durable=durable,
            filter_subject=filter_subject,
            handler=handler,
            max_ack_pending=1,
            max_deliver=max_deliver,
            ack_wait=ack_wait,
            hold=self.hold(horizon),
            on_dead=self.on_dead,
        )


class Connector(Protocol):
    def consumers(self, egress: ChannelContext) -> list[Consumer]: ...
