"""The JetStream streams: what each holds, how long, how much, and when a message leaves.

The broker is a conveyor, not a store: every message whose durable record lives in Valkey (a turn,
its reply, an event in the audit log) leaves the broker as soon as the consumer of its subject
has acknowledged it.

- `INBOUND` (`gw.in.<channel>.<partition>`), `OUTBOUND` (`gw.out.<channel>…`) and `EVENTS`
  (`gw.evt.<type>`) are **work queues**: exactly one durable consumer per subject (core's
  partition consumers; egress's per-channel and webhook fan-out consumers), and a message is
  deleted when that consumer acks it. A message nobody has consumed yet stays, whether or not its
  consumer exists yet (an egress that is down or not deployed yet loses nothing). A second
  consumer on the same subjects is refused by the server: read events from Valkey's audit log or
  subscribe with core NATS instead.
- `DEAD` (`gw.dead.>`) keeps everything (limits retention): it is what operators list and replay.

Every stream has a byte limit (`SWITCHBOARD_{INBOUND,OUTBOUND,EVENTS,DEAD}_MAX_BYTES`, per
replica) with `discard=new`: when a stream is full the broker refuses the next publish, which
every publisher already treats as "not stored" — ingress answers 503 / SMTP 451 (the sender
retries), core holds the inbound message it is applying until OUTBOUND or EVENTS has room again,
a dead letter waits on its message's redelivery. Nothing acknowledged is ever dropped to make room.
Sizing rule: a stream must hold the backlog of the longest consumer outage it should ride out,
`max_bytes ≥ messages per second × bytes per message × seconds of outage` (README, "Production").
JetStream reserves each stream's `max_bytes` against the server's `max_file_store` when the
stream is created, so their sum (× streams per namespace) must fit there.

Upgrades: JetStream refuses to change a stream's retention to or from work queue. A stream that
an earlier version created with limits retention keeps it (and gets its byte limit) until
`switchboard streams migrate` recreates it, which it does only when every consumer of the stream
has acknowledged everything (stop the ingress services first, let core and egress drain); the
consumers are recreated with their configuration, so running services carry on.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError, ServerError

from shared.settings import CommonSettings
from shared.subjects import Subjects

log = logging.getLogger("switchboard.bus")

DAY = 24 * 3600.0
MIB = 1024 * 1024
# JetStream's error code for "stream configuration update can not change retention policy".
RETENTION_CHANGE_REFUSED = 10052


@dataclass(frozen=True)
class StreamLimits:
    """Bytes each stream may hold (per replica); see the module docstring for the sizing rule."""

    inbound: int = 256 * MIB
    outbound: int = 256 * MIB
    events: int = 256 * MIB
    dead: int = 64 * MIB
    # How long JetStream remembers a Nats-Msg-Id to drop a re-publish. nats-server keeps every id
    # in memory for this long (≈ 0.1–0.2 KB each), so its memory grows with rate × window, then
    # levels off; the store's envelope-id dedupe (7 days) covers anything older.
    duplicate_window: float = 30 * 60.0

    @classmethod
    def of(cls, settings: CommonSettings) -> StreamLimits:
        return cls(
            inbound=settings.inbound_max_bytes,
            outbound=settings.outbound_max_bytes,
            events=settings.events_max_bytes,
            dead=settings.dead_max_bytes,
            duplicate_window=settings.duplicate_window_seconds,
        )


def stream_configs(
    subjects: Subjects, replicas: int, limits: StreamLimits | None = None
) -> list[StreamConfig]:
    limits = limits or StreamLimits()

    # The duplicate window is how long JetStream itself drops a re-published Nats-Msg-Id (it is
    # kept apart from the messages, so it holds after a work queue deleted one); longer provider
    # retry windows are covered by the store's envelope-id dedupe.
    def config(
        name: str, subject: str, max_age: float, max_bytes: int, retention: RetentionPolicy
    ) -> StreamConfig:
        return StreamConfig(
            name=name,
            subjects=[subject],
            retention=retention,
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_age=max_age,
            max_bytes=max_bytes,
            discard=DiscardPolicy.NEW,
            duplicate_window=limits.duplicate_window,
        )

    queue = RetentionPolicy.WORK_QUEUE
    return [
        config(subjects.inbound_stream, subjects.inbound_all, 7 * DAY, limits.inbound, queue),
        config(subjects.outbound_stream, subjects.outbound_all, 7 * DAY, limits.outbound, queue),
        config(subjects.events_stream, subjects.events_all, 7 * DAY, limits.events, queue),
        config(
            subjects.dead_stream,
            subjects.dead_all,
            30 * DAY,
            limits.dead,
            RetentionPolicy.LIMITS,
        ),
    ]


async def ensure_streams(js: JetStreamContext, configs: list[StreamConfig]) -> None:
    """Create or update the streams. Safe to run from every service at every start."""
    for config in configs:
        try:
            await js.add_stream(config)
        except BadRequestError:
            try:
                await js.update_stream(config)
            except ServerError as exc:
                if exc.err_code != RETENTION_CHANGE_REFUSED:
                    raise
                current = (await js.stream_info(str(config.name))).config
                await js.update_stream(dataclasses.replace(config, retention=current.retention))
                log.warning(
                    "stream %s keeps its %s retention until `switchboard streams migrate`",
                    config.name,
                    current.retention,
                    extra={"stream": config.name},
                )


class NotDrained(RuntimeError):
    """A stream still holds messages its consumers have not acknowledged: migrating it now would
    lose them."""


async def migrate_streams(js: JetStreamContext, configs: list[StreamConfig]) -> list[str]:
    """Recreate every stream whose retention differs from `configs`, once it is drained.

    Drained means every consumer of the stream has acknowledged everything on its subjects. Messages
    on subjects no consumer reads (an earlier version's OUTBOUND for API replies) are dropped with
    the old stream: nothing would ever have read them. Returns the names of the streams migrated.
    """
    migrated: list[str] = []
    for config in configs:
        assert config.name is not None
        try:
            info = await js.stream_info(config.name)
        except NotFoundError:
            await js.add_stream(config)
            continue
        if info.config.retention == config.retention:
            continue
        consumers = await js.consumers_info(config.name)
        busy = [
            f"{c.name}: {c.num_pending} not delivered, {c.num_ack_pending} not acknowledged"
            for c in consumers
            if c.num_pending or c.num_ack_pending
        ]
        if busy:
            raise NotDrained(
                f"stream {config.name} is not drained ({'; '.join(busy)}); stop the ingress "
                "services, let core and egress finish, and run this again"
            )
        await js.delete_stream(config.name)
        await js.add_stream(config)
        for consumer in consumers:
            await js.add_consumer(config.name, consumer.config)
        log.info(
            "stream %s migrated to %s retention",
            config.name,
            config.retention,
            extra={"stream": config.name, "consumers": len(consumers)},
        )
        migrated.append(config.name)
    return migrated
